"""What the commands share: the parser that fails in one line, the command base, and the set-up of the
commands that read data through a backbone (flags are declared in `arguments.py`, output in `output.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from autotransfer.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError  # noqa: F401 - re-exported for the commands


class Parser(argparse.ArgumentParser):
    """Usage mistakes print one line that names the fix (the usage is one `--help` away), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class Command:
    """Base: `add_arguments` declares flags, `run` does the work and returns an exit code."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def prepare(args: argparse.Namespace):
    """Load data and backbone, make the output folder, open the activation cache persisted in it.

    Without `--image-size`, small images are also tried upscaled and the size whose features probe best is
    used (see `autotransfer.resolution`); the choice is kept in the output folder.
    """
    from autotransfer.backbones import get_backbone
    from autotransfer.data import data_name, load_data
    from autotransfer.device import configure_threads, pick_device
    from autotransfer.features import ActivationCache
    from autotransfer.resolution import choose_resolution

    pick_device(args.device)  # fail early on --device cuda without a GPU
    configure_threads()
    out = args.out or Path("studies") / (getattr(args, "study_name", None) or data_name(args.data))
    created = not out.exists()
    bounds = dict(seed=args.seed, memory_limit=args.cache_memory, disk_limit=args.cache_disk, spill=out / "cache",
                  unlabeled=getattr(args, "unlabeled", None), val=getattr(args, "val", None),
                  test=getattr(args, "test", None))
    data = load_data(args.data, image_size=args.image_size, **bounds)
    backbone = get_backbone(args.backbone, args.weights)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Output folder {str(out)!r} is not writable ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    if args.image_size is None:
        data, resolution = choose_resolution(data, lambda size: load_data(args.data, image_size=size, **bounds),
                                             backbone, record=out / "resolution.json")
        if resolution.probe_accuracy:
            print(resolution.describe(), flush=True)
    cache = ActivationCache(backbone, data, folder=out / "cache", memory_limit=args.cache_memory,
                            disk_limit=args.cache_disk)
    return backbone, cache, out, created


def writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Output folder {str(folder)!r} cannot be created ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    return folder
