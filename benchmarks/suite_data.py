"""The benchmark suite's data sets, built deterministically from data that installed packages ship.

Nothing is downloaded: every image comes from scikit-learn's digits, scikit-image's bundled sample files
(read straight from `skimage/data/` with PIL/numpy, never through pooch), or glyphs rendered with the
fonts matplotlib bundles (`matplotlib/mpl-data/fonts/ttf/`). Each data set is written as class folders of
PNG files in the layout `autotransfer` reads, with its own fixed split:

    benchmarks/.data/<name>/{train,val,test}/<class>/<nnnn>.png   and   <name>/manifest.json

The manifest records, per file, where the image came from (font, source region, lighting), which
`--check` uses to prove that the shifted sets' test images come from sources or conditions train and val
never contain. A set is rebuilt only when its folder is missing or was built by another version of its
builder (written to a temporary folder first, then renamed into place).

    python benchmarks/suite_data.py            # build what is missing, print the table
    python benchmarks/suite_data.py --check    # also assert counts, sizes, disjoint sources; rebuild in a
                                               # temporary folder and compare digests (determinism)
    python benchmarks/suite_data.py --root DIR --only glyphs,textures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DEFAULT_ROOT = Path(__file__).resolve().parent / ".data"
SPLITS = ("train", "val", "test")
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Item:
    split: str
    label: str
    image: Image.Image
    source: dict  # provenance, stored in the manifest (font, region, crop box, condition, index)


@dataclass(frozen=True)
class Spec:
    name: str
    version: int  # bump when the builder's output changes: the cached folder is then rebuilt
    build: Callable[[], Iterator[Item]]
    size: int  # side in pixels of every written image
    kind: str
    shift: str  # "" when test is drawn like train; else what differs
    counts: dict[str, int] | None  # images per class per split when every class has the same count
    shift_key: str | None = None  # manifest source field that must not overlap between train+val and test
    note: str = ""


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).resolve().parent / "data"


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).resolve().parent / "mpl-data" / "fonts" / "ttf"


def _skimage_image(name: str) -> Image.Image:
    """A bundled scikit-image sample as RGB (alpha composited on white) or L, read with PIL."""
    with Image.open(_skimage_dir() / name) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("L") if img.mode in ("L", "I", "I;16", "F", "1") else img.convert("RGB")


def _stratified(labels: np.ndarray, counts: dict[str, int | None], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per class: shuffle, then take counts["val"], counts["test"] (None = the rest) and the rest as train."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = counts["val"](len(idx)) if callable(counts["val"]) else counts["val"]
        n_train = counts["train"](len(idx)) if callable(counts["train"]) else counts["train"]
        if counts.get("test") is None:  # fixed train and val, the rest is test
            out["train"].append(idx[:n_train])
            out["val"].append(idx[n_train:n_train + n_val])
            out["test"].append(idx[n_train + n_val:])
        else:
            n_test = counts["test"](len(idx)) if callable(counts["test"]) else counts["test"]
            out["val"].append(idx[:n_val])
            out["test"].append(idx[n_val:n_val + n_test])
            out["train"].append(idx[n_val + n_test:])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


# --- sklearn digits -----------------------------------------------------------------------------------


def _digit_images() -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((a * (255.0 / 16.0)).round().astype(np.uint8), mode="L") for a in d.images]
    return images, d.target.astype(np.int64)


def build_digits() -> Iterator[Item]:
    """All 1797 digits at their native 8 px, 70/15/15 stratified per class (seed 0)."""
    images, y = _digit_images()
    split = _stratified(y, {"val": lambda n: round(0.15 * n), "test": lambda n: round(0.15 * n), "train": None},
                        np.random.default_rng(0))
    for s in SPLITS:
        for i in split[s]:
            yield Item(s, str(y[i]), images[i], {"index": int(i)})


def build_digits_fewshot() -> Iterator[Item]:
    """15 train and 10 val digits per class; every other digit is test (seed 0)."""
    images, y = _digit_images()
    split = _stratified(y, {"train": 15, "val": 10, "test": None}, np.random.default_rng(0))
    for s in SPLITS:
        for i in split[s]:
            yield Item(s, str(y[i]), images[i], {"index": int(i)})


# --- rendered glyphs: a font (style) shift ------------------------------------------------------------

GLYPH_TRAIN_FONTS = tuple(f"DejaVu{family}{style}.ttf" for family in ("Sans", "SansMono", "Serif")
                          for style in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                                        "-BoldOblique" if family != "Serif" else "-BoldItalic"))
# Times-like STIX and Knuth's Computer Modern: serifs, stroke contrast and italics DejaVu does not have.
GLYPH_TEST_FONTS = ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
                    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmmi10.ttf")
GLYPH_SIZE = 28


def _glyph(font: ImageFont.FreeTypeFont, letter: str, rng: np.random.Generator) -> Image.Image:
    """Black letter on white, its ink box scaled to ~70 % of the side, then a small random affine."""
    big = 4 * GLYPH_SIZE  # render large and downsample: anti-aliased strokes at 28 px
    canvas = Image.new("L", (3 * big, 3 * big), 0)
    ImageDraw.Draw(canvas).text((1.5 * big, 1.5 * big), letter, font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        raise RuntimeError(f"font {font.path} has no ink for {letter!r}")
    ink = canvas.crop(box)
    scale = 0.70 * big / max(ink.size) * rng.uniform(0.9, 1.1)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.LANCZOS)
    out = Image.new("L", (big, big), 0)
    out.paste(ink, ((big - ink.width) // 2, (big - ink.height) // 2))
    angle = rng.uniform(-8, 8)
    dx, dy = rng.uniform(-0.06, 0.06, size=2) * big
    out = out.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=0)
    out = out.resize((GLYPH_SIZE, GLYPH_SIZE), Image.LANCZOS)
    return Image.eval(out, lambda v: 255 - v)


def build_glyphs() -> Iterator[Item]:
    """A-Z: 12 DejaVu fonts x 2 jitters per letter split 18 train / 6 val; test: 10 STIX and Computer
    Modern fonts x 2 jitters. Train and val never see a test font."""
    rng = np.random.default_rng(0)
    fonts = {n: ImageFont.truetype(str(_font_dir() / n), 96) for n in GLYPH_TRAIN_FONTS + GLYPH_TEST_FONTS}
    for letter in LETTERS:
        seen = [(f, j) for f in GLYPH_TRAIN_FONTS for j in range(2)]
        order = rng.permutation(len(seen))
        for rank, k in enumerate(order):
            f, j = seen[k]
            yield Item("train" if rank < 18 else "val", letter, _glyph(fonts[f], letter, rng), {"font": f, "jitter": j})
        for f in GLYPH_TEST_FONTS:
            for j in range(2):
                yield Item("test", letter, _glyph(fonts[f], letter, rng), {"font": f, "jitter": j})


# --- photo patches: a region + lighting shift ---------------------------------------------------------

PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
          "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
PATCH_SIZE = 128


def _regions(w: int, h: int, first: float = 0.6) -> dict[str, tuple[int, int, int, int]]:
    """Split an image along its longer axis: region A = the first 60 %, region B = the rest (boxes l,t,r,b)."""
    if w >= h:
        cut = round(first * w)
        return {"A": (0, 0, cut, h), "B": (cut, 0, w, h)}
    cut = round(first * h)
    return {"A": (0, 0, w, cut), "B": (0, cut, w, h)}


def _crop_in(img: Image.Image, region: tuple[int, int, int, int], side: int, out: int,
             rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    left, t, r, b = region
    side = min(side, r - left, b - t)
    x = int(rng.integers(left, r - side + 1))
    y = int(rng.integers(t, b - side + 1))
    box = (x, y, x + side, y + side)
    return img.crop(box).resize((out, out), Image.BILINEAR), box


def _relight(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Test-only conditions: a strong gamma (darker or washed out), half of them also blurred."""
    gamma = float(rng.uniform(0.45, 0.65) if rng.random() < 0.5 else rng.uniform(1.6, 2.2))
    table = [round(255 * (v / 255) ** gamma) for v in range(256)]
    img = img.point(table * (3 if img.mode == "RGB" else 1))
    blur = rng.random() < 0.5
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    return img, f"gamma {gamma:.2f}{' + blur 1.5' if blur else ''}"


def build_photo_patches() -> Iterator[Item]:
    """Which of 10 photos a 128 px patch is cut from. Train (20) and val (10) per class: random square crops
    inside the first 60 % of the photo's longer axis, as shot; test (30): crops inside the other 40 %, with a
    strong gamma change and, for half, a blur. No test pixel is in a train or val crop."""
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = _skimage_image(name)
        regions = _regions(*img.size)
        label = Path(name).stem
        short = min(img.size)
        for split, n in (("train", 20), ("val", 10), ("test", 30)):
            region = regions["B" if split == "test" else "A"]
            for _ in range(n):
                side = int(rng.integers(max(64, round(0.25 * short)), max(65, round(0.55 * short)) + 1))
                patch, box = _crop_in(img, region, side, PATCH_SIZE, rng)
                condition = "as shot"
                if split == "test":
                    patch, condition = _relight(patch, rng)
                yield Item(split, label, patch, {"region": "B" if split == "test" else "A", "box": box,
                                                 "condition": condition})


# --- grey textures: no shift (test crops from a disjoint region, same conditions) ---------------------

TEXTURES = ("brick.png", "grass.png", "gravel.png", "page.png", "hubble_deep_field.jpg", "ihc.png")
TEXTURE_SIZE = 96


def build_textures() -> Iterator[Item]:
    """6 grey textures (brick, grass, gravel, printed page, star field, tissue stain), 96 px patches with a
    random scale (source side 77-120 px), 90-degree rotation and flip. 240 train and 40 val per class from
    the first 60 % of the source, 50 test from the rest under the same conditions."""
    rng = np.random.default_rng(0)
    for name in TEXTURES:
        img = _skimage_image(name).convert("L")
        regions = _regions(*img.size)
        label = {"page.png": "printed_text", "hubble_deep_field.jpg": "star_field", "ihc.png": "tissue"}.get(
            name, Path(name).stem)
        for split, n in (("train", 240), ("val", 40), ("test", 50)):
            region = regions["B" if split == "test" else "A"]
            for _ in range(n):
                side = int(round(TEXTURE_SIZE * rng.uniform(0.8, 1.25)))
                patch, box = _crop_in(img, region, side, TEXTURE_SIZE, rng)
                k = int(rng.integers(4))
                patch = patch.rotate(90 * k)
                if rng.random() < 0.5:
                    patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
                yield Item(split, label, patch, {"region": "B" if split == "test" else "A", "box": box})


# --- LFW faces vs non-faces ---------------------------------------------------------------------------


def build_faces_lfw() -> Iterator[Item]:
    """scikit-image's lfw_subset: 100 faces then 100 non-face patches, 25 px grey; 60/15/25 per class."""
    patches = np.load(_skimage_dir() / "lfw_subset.npy")
    y = np.array([0] * 100 + [1] * 100)
    names = ("face", "non_face")
    split = _stratified(y, {"val": 15, "test": 25, "train": None}, np.random.default_rng(0))
    for s in SPLITS:
        for i in split[s]:
            img = Image.fromarray((np.clip(patches[i], 0, 1) * 255).round().astype(np.uint8), mode="L")
            yield Item(s, names[y[i]], img, {"index": int(i)})


# --- drawn shapes: a filled -> outline (sketch) shift -------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
SHAPE_SIZE = 64


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n):
            a = angle + offset + 2 * math.pi * i / n
            rad = radii[i % len(radii)]
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "star":
        return ring(10, [r, 0.42 * r], -math.pi / 2)
    if shape == "cross":
        w = 0.33 * r
        base = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
                (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(shape)


def _shape(shape: str, outline: bool, rng: np.random.Generator) -> Image.Image:
    k = 4  # supersampling
    n = SHAPE_SIZE * k
    bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
    fg = tuple(int(v) for v in rng.integers(0, 120, size=3))
    img = Image.new("RGB", (n, n), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * n
    cx, cy = rng.uniform(r + 2 * k, n - r - 2 * k, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    width = int(rng.integers(2, 4)) * k
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=None if outline else fg, outline=fg, width=width if outline else 1)
    else:
        pts = _polygon(shape, cx, cy, r, angle)
        if outline:
            draw.line(pts + pts[:1], fill=fg, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=fg)
    return img.resize((SHAPE_SIZE, SHAPE_SIZE), Image.LANCZOS)


def build_shapes() -> Iterator[Item]:
    """6 drawn shapes, random size/position/rotation/colours, 64 px. Train (12) and val (8) per class are
    filled; test (30) are outlines only, a style train never shows."""
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for split, n in (("train", 12), ("val", 8), ("test", 30)):
            outline = split == "test"
            for _ in range(n):
                yield Item(split, shape, _shape(shape, outline, rng), {"style": "outline" if outline else "filled"})


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("digits", 1, build_digits, 8, "grey scans of handwriting (tiny)", "",
         None, note="1797 images; per class about 70/15/15"),
    Spec("digits_fewshot", 1, build_digits_fewshot, 8, "grey scans of handwriting (tiny)", "",
         {"train": 15, "val": 10}, note="test = every digit not in train/val"),
    Spec("glyphs", 1, build_glyphs, GLYPH_SIZE, "rendered letters", "test fonts (STIX, Computer Modern) unseen",
         {"train": 18, "val": 6, "test": 20}, shift_key="font"),
    Spec("photo_patches", 1, build_photo_patches, PATCH_SIZE, "natural photographs (colour and grey)",
         "test region unseen + gamma/blur", {"train": 20, "val": 10, "test": 30}, shift_key="region"),
    Spec("textures", 1, build_textures, TEXTURE_SIZE, "grey textures", "",
         {"train": 240, "val": 40, "test": 50}, shift_key="region",
         note="test crops from a disjoint region, same conditions"),
    Spec("faces_lfw", 1, build_faces_lfw, 25, "grey face / non-face photo patches", "",
         {"train": 60, "val": 15, "test": 25}),
    Spec("shapes", 1, build_shapes, SHAPE_SIZE, "drawn shapes (colour)", "filled in train, outlines in test",
         {"train": 12, "val": 8, "test": 30}, shift_key="style"),
)}


# --- building and caching -----------------------------------------------------------------------------


def _write(spec: Spec, folder: Path) -> dict:
    folder.mkdir(parents=True)
    counters: Counter = Counter()
    sources: dict[str, dict] = {}
    for item in spec.build():
        if item.image.size != (spec.size, spec.size):
            raise RuntimeError(f"{spec.name}: image of size {item.image.size}, expected {spec.size}")
        n = counters[(item.split, item.label)]
        counters[(item.split, item.label)] += 1
        rel = f"{item.split}/{item.label}/{n:04d}.png"
        (folder / item.split / item.label).mkdir(parents=True, exist_ok=True)
        item.image.save(folder / rel, format="PNG", optimize=False)
        sources[rel] = item.source
    counts = {s: {c: counters[(s, c)] for (s2, c) in sorted(counters) if s2 == s} for s in SPLITS}
    manifest = dict(name=spec.name, version=spec.version, size=spec.size, kind=spec.kind, shift=spec.shift,
                    classes=sorted({c for _, c in counters}), counts=counts, sources=sources)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=list) + "\n")
    return manifest


def manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def ensure(name: str, root: Path = DEFAULT_ROOT, *, quiet: bool = False) -> Path:
    """The folder of data set `name` under `root`, built first if it is missing or from another version."""
    spec = SPECS[name]
    folder = root / name
    m = manifest(folder)
    if m is not None and m.get("version") == spec.version:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        if not quiet:
            print(f"building {name} in {folder} ...", file=sys.stderr, flush=True)
        _write(spec, tmp / name)
        if folder.exists():  # stale version: move aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=root))
            folder.rename(old / name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            (tmp / name).rename(folder)
        except OSError:  # another process built it meanwhile
            if manifest(folder) is None or manifest(folder).get("version") != spec.version:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_all(root: Path = DEFAULT_ROOT, names: list[str] | None = None) -> dict[str, Path]:
    return {n: ensure(n, root) for n in (names or list(SPECS))}


def describe(root: Path = DEFAULT_ROOT, names: list[str] | None = None):
    """A table: name, classes, train/val/test image counts, size, kind, shift."""
    import pandas as pd

    rows = []
    for name in names or list(SPECS):
        spec, m = SPECS[name], manifest(ensure(name, root))
        total = {s: sum(m["counts"][s].values()) for s in SPLITS}
        per = {s: sorted(set(m["counts"][s].values())) for s in SPLITS}
        rows.append(dict(name=name, classes=len(m["classes"]), train=total["train"], val=total["val"],
                         test=total["test"], per_class="/".join("-".join(map(str, (p[0], p[-1])))
                                                                if p[0] != p[-1] else str(p[0])
                                                                for p in per.values()),
                         px=m["size"], kind=spec.kind, shift=f"yes: {spec.shift}" if spec.shift else "no"))
    return pd.DataFrame(rows)


# --- checks -------------------------------------------------------------------------------------------


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.png")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check(name: str, root: Path = DEFAULT_ROOT) -> list[str]:
    """Assert one data set's properties; returns the lines it proved."""
    spec = SPECS[name]
    folder = ensure(name, root)
    m = manifest(folder)
    said = []
    # files on disk match the manifest, and every image has the set's size
    found: Counter = Counter()
    for s in SPLITS:
        for f in (folder / s).rglob("*.png"):
            with Image.open(f) as img:
                assert img.size == (spec.size, spec.size), f"{f}: {img.size} != {spec.size}"
            found[(s, f.parent.name)] += 1
    for s in SPLITS:
        for c in m["classes"]:
            assert found[(s, c)] == m["counts"][s].get(c, 0), f"{name} {s}/{c}: {found[(s, c)]} files"
            assert found[(s, c)] > 0, f"{name} {s}/{c} is empty"
    if spec.counts:
        for s, n in spec.counts.items():
            assert set(m["counts"][s].values()) == {n}, f"{name} {s}: per-class counts {m['counts'][s]} != {n}"
    said.append(f"{sum(found.values())} PNGs of {spec.size} px, per-class counts as specified")
    # the product reads it with the same split
    from autotransfer.data import load_data

    data = load_data(str(folder), image_size=max(16, spec.size))
    for s in SPLITS:
        assert len(data.split[s]) == sum(m["counts"][s].values()), f"{name}: load_data {s} size differs"
    assert data.classes == tuple(sorted(m["classes"])), f"{name}: classes differ"
    said.append("load_data keeps the split")
    # shift: test sources never appear in train or val
    src = m["sources"]
    seen = [v for k, v in src.items() if not k.startswith("test/")]
    test = [v for k, v in src.items() if k.startswith("test/")]
    if spec.shift_key:
        a = {str(v[spec.shift_key]) for v in seen}
        b = {str(v[spec.shift_key]) for v in test}
        assert not a & b, f"{name}: {spec.shift_key} shared by train/val and test: {a & b}"
        def show(v: set[str]) -> str:
            return f"{len(v)} ({', '.join(sorted(v)[:3])}{', ...' if len(v) > 3 else ''})"

        said.append(f"{spec.shift_key}s disjoint: train+val {show(a)}, test {show(b)}")
    if "box" in (test[0] if test else {}):  # crop boxes: no test pixel inside a train/val crop of that class
        for k, v in src.items():
            if k.startswith("test/"):
                label = k.split("/")[1]
                for k2, v2 in src.items():
                    if not k2.startswith("test/") and k2.split("/")[1] == label:
                        assert not _overlap(v["box"], v2["box"]), f"{name}: {k} overlaps {k2}"
        said.append("no test crop overlaps a train/val crop")
    if name == "photo_patches":
        assert all(v["condition"] == "as shot" for v in seen) and all(v["condition"] != "as shot" for v in test)
        said.append("train/val as shot, every test patch relit")
    if name == "digits_fewshot" or name == "digits":
        idx = [v["index"] for v in src.values()]
        assert len(idx) == len(set(idx)) == 1797, f"{name}: digits not each used once"
        said.append("each of the 1797 digits used once")
    # determinism: a rebuild in a temporary folder gives identical files
    with tempfile.TemporaryDirectory() as tmp:
        _write(spec, Path(tmp) / name)
        assert _digest(Path(tmp) / name) == _digest(folder), f"{name}: a rebuild differs from {folder}"
    said.append("rebuild is byte-identical")
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"cache folder (default: {DEFAULT_ROOT})")
    parser.add_argument("--only", default=None, help="comma-separated data set names (default: all)")
    parser.add_argument("--check", action="store_true", help="assert counts, sizes, shifts and determinism")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; known: {', '.join(SPECS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    table = describe(args.root, names)
    print(table.to_markdown(index=False))
    if args.check:
        for n in names:
            for line in check(n, args.root):
                print(f"{n}: {line}")
        print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
