"""Memory, disk and time of a search as the data grows: folders of photo-sized JPEGs, 1k to 8k images.

    python benchmarks/scale.py [--sizes 1000,2000,8000] [--cpus 1] [--max-steps 9] [--cache-memory 512M]

Data: `benchmarks/.data/scale/<n>/<class>/*.jpg`, generated once (reused when present) from the photographs
that installed packages ship (scikit-image's astronaut, coffee, chelsea, rocket, Hubble deep field,
immunohistochemistry and retina; sklearn's china and flower): one class per photograph, each image a random
crop of it (a quarter to three quarters of its shorter side), rotated +-30 degrees, colour-shifted, saved at
256..480 px as JPEG quality 90.

Per size, in a subprocess of its own (so `getrusage(RUSAGE_CHILDREN).ru_maxrss` is that size's search alone):
`python -m autotransfer search DIR --budget 10 --max-steps N --refit 1` with the default backbone (Lite0) at
224 px, `--cpus` CPUs (the affinity mask, which sets PyTorch's threads). `--max-steps` is small so a size
finishes in minutes: fine-tunes are short and their accuracy is not the point here. Wall time per phase
comes from the time each line of the search's output arrives: start-up and decoding (up to its first
line), the activation pass (the seconds it prints), prior, trials, refit + export. Then the same command
runs again with `--refit 0` (a resumed, complete study: it must load the cache, not compute it), and in the
same process the images are decoded and put through a plain `torch.no_grad()` eval forward pass of the
whole backbone, side by side with the search's activation pass (target: pass <= 1.3x plain).

Last line: rss_growth=<peak RSS at the largest size / at the smallest> time_growth=<wall at largest / smallest>
(targets for 1k -> 8k: rss_growth <= 1.5, time_growth <= 9.6).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".data" / "scale"
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photographs() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in SOURCES}
    for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        photos[name] = image
    return photos


def generate(n: int, seed: int = 0) -> Path:
    """`n` JPEGs in one folder per photograph (reused when complete)."""
    from PIL import Image, ImageEnhance

    folder = DATA / str(n)
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(seed)
    photos = {k: Image.fromarray(v) for k, v in photographs().items()}
    names = sorted(photos)
    for i in range(n):
        name = names[i % len(names)]
        photo = photos[name]
        side = min(photo.size) * rng.uniform(0.25, 0.75)
        x, y = rng.uniform(0, photo.size[0] - side), rng.uniform(0, photo.size[1] - side)
        crop = photo.crop((int(x), int(y), int(x + side), int(y + side))).rotate(rng.uniform(-30, 30))
        out = int(rng.integers(256, 481))
        crop = crop.resize((out, int(out * rng.uniform(0.75, 1.0))), Image.BILINEAR)
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        (folder / name).mkdir(parents=True, exist_ok=True)
        crop.save(folder / name / f"{i:06d}.jpg", quality=90)
    done.write_text("")
    return folder


def timed_lines(cmd: list[str], log: Path) -> tuple[int, list[tuple[float, str]], float]:
    """Run `cmd`, stamping each output line (stdout and stderr) with the seconds since the start."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc, \
            open(log, "w") as f:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
            f.write(f"{lines[-1][0]:8.1f} {line}")
    return proc.returncode, lines, time.perf_counter() - start


def first(lines: list[tuple[float, str]], pattern: str) -> tuple[float, re.Match] | tuple[None, None]:
    for t, line in lines:
        m = re.search(pattern, line)
        if m:
            return t, m
    return None, None


def phases(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    t_first, _ = first(lines, r"^autotransfer \S+: ")
    t_act, m_act = first(lines, r"^activations: ")
    t_refit, _ = first(lines, r"^training the best strategy")
    t_top, _ = first(lines, r"^Top 10 strategies")
    m = re.search(r"forward pass ([\d.]+)s", m_act.string) if m_act else None
    pass_s = float(m.group(1)) if m else 0.0
    return {"startup_decode": t_first, "activation_pass": pass_s, "prior": t_act - t_first - pass_s,
            "trials": t_refit - t_act, "refit_export": t_top - t_refit, "wall": wall}


def plain_forward(folder: Path, image_size: int) -> tuple[float, float, int]:
    """(decode seconds, seconds of one no_grad eval forward pass of the whole backbone, images)."""
    import torch

    from autotransfer.backbones import get_backbone
    from autotransfer.data import load_data
    from autotransfer.preprocess import normalise

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_data(str(folder), image_size=image_size, memory_limit=2**30, spill=Path(tmp))
        decode = time.perf_counter() - start
        backbone = get_backbone("efficientnet_lite0")
        groups = backbone.groups.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(data.images), 128):
                h = normalise(data.images[i:i + 128], backbone.mean, backbone.std)
                for group in groups:
                    h = group(h)
        return decode, time.perf_counter() - start, len(data.images)


def one(n: int, args: argparse.Namespace) -> dict:
    """One size: the search, its peak RSS and cache bytes, the resumed run, the plain forward pass."""
    folder = generate(n)
    work = ROOT / ".work" / "scale" / str(n)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    base = [sys.executable, "-m", "autotransfer", "search", str(folder), "--out", str(work / "study"), "--budget",
            "10", "--max-steps", str(args.max_steps), "--cache-memory", args.cache_memory, "--cache-disk",
            args.cache_disk, "--device", "cpu"]
    rc, lines, wall = timed_lines([*base, "--refit", "1"], work / "search.log")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    cache_bytes = sum(f.stat().st_size for f in (work / "study" / "cache").rglob("*") if f.is_file())
    result = {"images": n, "rc": rc, "peak_rss": rss, "cache_disk_bytes": cache_bytes, **phases(lines, wall)}
    _, storage = first(lines, r"^activations: (.*)$")
    result["storage"] = storage.group(1) if storage else "?"
    rc2, lines2, wall2 = timed_lines([*base, "--refit", "0"], work / "resume.log")
    _, loaded = first(lines2, r"^activations: .* loaded from ")
    result.update(resume_rc=rc2, resume_wall=wall2, resume_loaded=loaded is not None)
    result["decode"], result["plain_forward"], _ = plain_forward(folder, 224)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,8000")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each search may use (default: 1)")
    parser.add_argument("--max-steps", type=int, default=9)
    parser.add_argument("--cache-memory", default="512M")
    parser.add_argument("--cache-disk", default="50G")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--max-steps", str(args.max_steps), "--cache-memory",
               args.cache_memory, "--cache-disk", args.cache_disk]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{n} images: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"{n} images: rc {r['rc']}, wall {r['wall']:.1f}s (start-up+decode {r['startup_decode']:.1f}s, "
              f"activation pass {r['activation_pass']:.1f}s, prior {r['prior']:.1f}s, trials {r['trials']:.1f}s, "
              f"refit+export {r['refit_export']:.1f}s); peak RSS {r['peak_rss'] / 2**30:.2f} GiB; cache on disk "
              f"{r['cache_disk_bytes'] / 2**30:.2f} GiB ({r['storage']}); decode alone {r['decode']:.1f}s; plain "
              f"no_grad forward {r['plain_forward']:.1f}s, pass/plain {r['activation_pass'] / r['plain_forward']:.2f}x;"
              f" resumed run rc {r['resume_rc']} in {r['resume_wall']:.1f}s, cache reused: {r['resume_loaded']}",
              flush=True)
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(f"rss_growth={large['peak_rss'] / small['peak_rss']:.2f} time_growth={large['wall'] / small['wall']:.2f}")


if __name__ == "__main__":
    main()
