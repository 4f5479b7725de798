"""What the commands share: the parser that fails in one line, the command base, argument types and
the flags and set-up used by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from autotransfer.defaults import DEVICES
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


def int_at_least(name: str, example: int, minimum: int = 1):
    """An argparse type for a count of at least `minimum`; the error shows `example` as a sensible value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}; e.g. {name} {example}")
        return value

    return parse


def add_refit_argument(parser: argparse.ArgumentParser) -> None:
    """`--refit N`: how the exported model is trained (see `autotransfer.refit`)."""
    from autotransfer.defaults import DEFAULT_REFITS

    parser.add_argument("--refit", type=int_at_least("--refit", DEFAULT_REFITS, minimum=0), default=DEFAULT_REFITS,
                        metavar="N", help="train the chosen strategy N times on train+val (seeds seed..seed+N-1) and "
                                          "export the average of their probabilities; 0 exports the trial as "
                                          f"searched, trained on train only (default: {DEFAULT_REFITS})")


def add_max_steps_argument(parser: argparse.ArgumentParser) -> None:
    """`--max-steps N`: a fine-tune's optimizer steps, instead of the data-derived ladder (see `fidelity.py`)."""
    parser.add_argument("--max-steps", type=int_at_least("--max-steps", 300), default=None, metavar="N",
                        help="optimizer steps of a fine-tuning trial (default: from the training set size: at "
                             "least 300 steps of 32 images and 3 epochs, at most 50 epochs)")


def describe_training(metrics: dict) -> str:
    """How an exported model was trained, for the summary line."""
    refits = metrics.get("refits", 0)
    if metrics.get("refit_fallback"):
        return (f"\nrefit on train+val rejected ({metrics['refit_fallback']}); shipped the searched trial's own "
                "model, trained on train")
    if refits:
        return f"  ({refits} refit{'s' if refits > 1 else ''} on train+val)"
    return "  (retrained from its strategy)" if metrics.get("retrained") else ""


def size_argument(name: str):
    def parse(text: str) -> int:
        from autotransfer.features import parse_size

        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name}: {e}") from None

    return parse


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that read data through a backbone (search, recommend)."""
    parser.add_argument("--image-size", type=int_at_least("--image-size", 64), default=None,
                        help="input size in pixels (default: per data set, 64 for digits)")
    parser.add_argument("--cache-memory", type=size_argument("--cache-memory"), default="4G",
                        help="memory for cached activations; beyond it float16, then memory-mapped disk "
                             "(default: 4G)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where trials train; cuda uses bf16 autocast (default: auto)")


def prepare(args: argparse.Namespace):
    """Load data and backbone, make the output folder, open the activation cache persisted in it.

    Without `--image-size`, small images are also tried upscaled and the size whose features probe best is
    used (see `autotransfer.resolution`); the choice is kept in the output folder.
    """
    from autotransfer.backbones import get_backbone
    from autotransfer.data import load_data
    from autotransfer.device import configure_threads, pick_device
    from autotransfer.features import ActivationCache
    from autotransfer.resolution import choose_resolution

    pick_device(args.device)  # fail early on --device cuda without a GPU
    configure_threads()
    data = load_data(args.data, image_size=args.image_size, seed=args.seed)
    backbone = get_backbone(args.backbone, args.weights)
    out = args.out or Path("studies") / (getattr(args, "study_name", None) or data.name)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Output folder {str(out)!r} is not writable ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    if args.image_size is None:
        data, resolution = choose_resolution(data, lambda size: load_data(args.data, image_size=size, seed=args.seed),
                                             backbone, record=out / "resolution.json")
        if resolution.probe_accuracy:
            print(resolution.describe(), flush=True)
    return backbone, ActivationCache(backbone, data, folder=out / "cache", memory_limit=args.cache_memory), out, created


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that find an existing study, with `search`'s defaults (studies/<name>/study.db)."""
    parser.add_argument("--study-name", default=None,
                        help="default: the storage's only study, else 'digits' (search's default)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
    parser.add_argument("--out", type=Path, default=None, help="the study's output folder "
                        "(default: studies/<study-name>, as for search)")


def writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Output folder {str(folder)!r} cannot be created ({e.strerror}); pass --out with a "
                          "folder you can write to.") from None
    return folder


def print_variants(metrics: dict) -> None:
    """One line per fp16/int8 variant in an export's metrics; a degraded one says so."""
    for p, v in metrics.get("variants", {}).items():
        flag = f"  DEGRADED: loses {100 * v['accuracy_drop']:.1f} points (> 1)" if v["degraded"] else ""
        print(f"{p}: {v['file']}  test {v['test_accuracy']:.4f}  top-1 agreement with fp32 "
              f"{v['top1_agreement']:.4f}  {v['size_bytes'] / 1e6:.1f} MB{flag}")
