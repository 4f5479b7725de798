"""What unlabelled target images buy: source-only search vs search with `--unlabeled`, on source -> target pairs.

Each pair has labels only on the source. Its folder is what a user would pass: `train/` and `val/` hold labelled
source images, `test/` labelled target images (the search never reads them; the exported model's test accuracy
is its accuracy on the target), and `unlabeled/` other target images, without labels (DATA's split folders are
train/, val/ and test/ only, so the search reads `unlabeled/` only through `--unlabeled`). Target test and unlabelled
images are disjoint.

Pairs, built from data that installed packages ship:

  digits          sklearn's digits: one half of the images (by a seeded shuffle) is the source as scanned; the
                  other half, inverted (dark on light) and rotated +-45 degrees as `digits_shifted` does, is the
                  target, split per class into unlabelled and test halves
  photo_patches   the suite's photo patches (`suite_data.py`): source = train/val patches, as shot, from one
                  region of each photo; target = the test patches, from the other region under a strong gamma
                  change (half blurred), split per class into unlabelled and test halves

Both searches of a pair run as subprocesses with the same flags (`--budget`, `--refit`, `--seed`); the second adds
`--unlabeled`. The last line is `adapt_gain=<the worst pair's gain in target test accuracy>`. With `--searched-too`
each study is also exported as searched (`autotransfer export --refit 0`: the trial's own model, not a refit on
train+val), and `adapt_gain_searched=` follows: a refit cannot be checked on the unlabelled images' setting, and
on the photo patches pair it lost about 3 points there for both fine-tunes measured (README).

    python benchmarks/adapt.py                        # budget 50 each, both pairs
    python benchmarks/adapt.py --budget 10 --pairs digits --cpus 1
    python benchmarks/adapt.py --pairs digits --cpus 1 --parallel   # both searches at once, one CPU each
    python benchmarks/adapt.py --searched-too                       # and each study's trial as searched
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import suite_data  # noqa: E402

from autotransfer.defaults import DEFAULT_REFITS  # noqa: E402

DEFAULT_WORK = REPO / "benchmarks" / ".data" / "adapt"


def _write(folder: Path, images: list[Image.Image], labels: list[str] | None) -> None:
    """PNG files: `folder/<label>/<n>.png`, or `folder/<n>.png` when there are no labels."""
    for i, img in enumerate(images):
        path = folder / labels[i] / f"{i:05d}.png" if labels is not None else folder / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)


def _halves(labels: np.ndarray, rng: np.random.Generator, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded `fraction` of the indices and the rest."""
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: round(len(idx) * fraction)])
        second.append(idx[round(len(idx) * fraction):])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _shifted_digit(img: Image.Image, angle: float) -> Image.Image:
    inverted = Image.fromarray(255 - np.asarray(img), mode="L").resize((32, 32), Image.BILINEAR)
    return inverted.rotate(angle, resample=Image.BILINEAR, fillcolor=255)


def build_digits(folder: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((x * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for x in d.images]
    labels = d.target.astype(str)
    rng = np.random.default_rng(0)
    source, target = _halves(d.target, rng)
    train, val = (source[i] for i in _halves(d.target[source], rng, 0.75))
    unlabeled, test = _halves(d.target[target], rng)
    angles = rng.uniform(-45, 45, size=len(images))
    for split, idx in (("train", train), ("val", val)):
        _write(folder / split, [images[i] for i in idx], list(labels[idx]))
    target_images = {i: _shifted_digit(images[i], float(angles[i])) for i in target}
    _write(folder / "test", [target_images[i] for i in target[test]], list(labels[target[test]]))
    _write(folder / "unlabeled", [target_images[i] for i in target[unlabeled]], None)


def build_photo_patches(folder: Path) -> None:
    suite = suite_data.ensure("photo_patches", quiet=True)
    for split in ("train", "val"):
        shutil.copytree(suite / split, folder / split)
    files = sorted((suite / "test").glob("*/*.png"))
    labels = np.array([f.parent.name for f in files])
    unlabeled, test = _halves(labels, np.random.default_rng(0))
    for i in test:
        (folder / "test" / labels[i]).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[i], folder / "test" / labels[i] / files[i].name)
    (folder / "unlabeled").mkdir(parents=True)
    for i in unlabeled:
        shutil.copy(files[i], folder / "unlabeled" / f"{labels[i]}-{files[i].name}")  # names only, no folders


PAIRS: dict[str, Callable[[Path], None]] = {"digits": build_digits, "photo_patches": build_photo_patches}


def ensure_pair(name: str, work: Path) -> Path:
    """The pair's folder (train/ val/ test/ unlabeled/), built once into a temporary folder, then renamed."""
    folder = work / name / "data"
    if not folder.is_dir():
        tmp = folder.with_name("data.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        PAIRS[name](tmp)
        tmp.rename(folder)
    return folder


def count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def run_search(data: Path, out: Path, args: argparse.Namespace, unlabeled: Path | None, cpu_offset: int = 0) -> dict:
    """One search as a subprocess (on the CPUs from `cpu_offset` on); its exported model's target test accuracy
    and the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "autotransfer", "search", str(data), "--budget", str(args.budget),
           "--seed", str(args.seed), "--refit", str(args.refit), "--out", str(out)]
    if unlabeled is not None:
        cmd += ["--unlabeled", str(unlabeled)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    allowed = sorted(os.sched_getaffinity(0))[cpu_offset:cpu_offset + args.cpus] if args.cpus else None
    pin = (lambda: os.sched_setaffinity(0, allowed)) if allowed else None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=pin)
    seconds = time.perf_counter() - start
    if rc != 0:
        return {"status": f"exit {rc}", "seconds": seconds}
    m = json.loads((out / "best" / "metrics.json").read_text())
    result = {"status": "ok", "test_accuracy": m["test_accuracy"], "val_accuracy": m.get("val_accuracy"),
              "strategy": (out / "best" / "strategy.json").read_text() if (out / "best" / "strategy.json").exists()
              else "", "seconds": seconds}
    if args.searched_too:  # the same trial, its own model (no refit)
        with open(out.parent / f"{out.name}_searched.log", "w") as log:
            rc = subprocess.call([sys.executable, "-m", "autotransfer", "export", "--out", str(out), "--dest",
                                  str(out / "searched"), "--refit", "0"], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=pin)
        result["searched_test_accuracy"] = json.loads((out / "searched" / "metrics.json").read_text())[
            "test_accuracy"] if rc == 0 else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--refit", type=int, default=DEFAULT_REFITS,
                        help=f"refits of the export (default {DEFAULT_REFITS}, the product's: what a user ships)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs each search may use (default: all)")
    parser.add_argument("--parallel", action="store_true",
                        help="run a pair's two searches at once, each on its own --cpus CPUs (default: one after "
                             "the other)")
    parser.add_argument("--searched-too", action="store_true",
                        help="also export each study's trial as searched (--refit 0) and print its figures")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=None, help="also write the results there")
    args = parser.parse_args(argv)
    names = [n for n in args.pairs.split(",") if n]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"--pairs: unknown pair {unknown[0]!r}; choose from {', '.join(PAIRS)}")
    if args.parallel and not args.cpus:
        parser.error("--parallel needs --cpus (each search's share of the CPUs)")
    print(f"adapt benchmark {datetime.date.today()}: budget {args.budget}, refit {args.refit}, seed {args.seed}")
    results, gains, searched_gains = {}, [], []
    for name in names:
        folder = ensure_pair(name, args.work)
        sizes = {s: count(folder / s) for s in ("train", "val", "test", "unlabeled")}
        print(f"{name}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()), flush=True)
        runs = [(args.work / name / "source_only", None), (args.work / name / "unlabeled", folder / "unlabeled")]
        if args.parallel:
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(run_search, folder, out, args, unlabeled, cpu_offset=i * args.cpus)
                           for i, (out, unlabeled) in enumerate(runs)]
                plain, adapted = (f.result() for f in futures)
        else:
            plain, adapted = (run_search(folder, out, args, unlabeled) for out, unlabeled in runs)
        results[name] = {"sizes": sizes, "source_only": plain, "unlabeled": adapted}
        for label, r in (("source only", plain), ("--unlabeled", adapted)):
            figure = f"target test {r['test_accuracy']:.4f}" if r["status"] == "ok" else r["status"]
            if r.get("searched_test_accuracy") is not None:
                figure += f" (as searched, --refit 0: {r['searched_test_accuracy']:.4f})"
            print(f"  {label:12s} {figure}, {r['seconds']:.0f} s", flush=True)
        ok = plain["status"] == "ok" and adapted["status"] == "ok"
        gains.append(adapted["test_accuracy"] - plain["test_accuracy"] if ok else float("nan"))
        print(f"  gain {gains[-1]:+.4f}", flush=True)
        if args.searched_too:
            both = [r.get("searched_test_accuracy") for r in (adapted, plain)]
            searched_gains.append(both[0] - both[1] if ok and None not in both else float("nan"))
            print(f"  gain as searched {searched_gains[-1]:+.4f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"date": str(datetime.date.today()), "budget": args.budget,
                                         "refit": args.refit, "results": results}, indent=1))
    print(f"adapt_gain={min(gains):.4f}")
    if args.searched_too:
        print(f"adapt_gain_searched={min(searched_gains):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
