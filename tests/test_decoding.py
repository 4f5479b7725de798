"""Decoding a real photo collection: EXIF orientation, 16-bit and float images, transparency, CMYK,
decompression bombs, JPEG draft mode and CSVs with a byte-order mark, the same in training and predict.

Every image is written to disk by the test and every assertion is on decoded pixel values.
"""

import itertools
import logging
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import autotransfer.images as images
from autotransfer.data import _decode, load_data
from autotransfer.errors import DataError
from autotransfer.images import open_image, to_rgb_square
from autotransfer.predict import load_images

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _predict_pixels(path, size):
    """What `predict` feeds the model, back in 0..255: mean 0 and std 1 leave x = pixels / 255."""
    x = load_images([path], size, [0, 0, 0], [1, 1, 1])[0]
    return np.rint(x.transpose(1, 2, 0) * 255).astype(np.uint8)


def _decoded_both_ways(path, size):
    """Training's and predict's pixels for one file; they must be identical."""
    train = _decode(str(path), size)
    assert train is not None and train.dtype == np.uint8 and train.shape == (size, size, 3)
    np.testing.assert_array_equal(_predict_pixels(path, size), train)
    return train


# --- EXIF orientation -------------------------------------------------------------------------------

def _quadrants(w=96, h=64):
    """Upright picture: top-left red, top-right blue, bottom-left green, bottom-right white."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2:] = RED, BLUE
    a[h // 2:, : w // 2], a[h // 2:, w // 2:] = GREEN, WHITE
    return a


# How a camera stores the upright picture U for each EXIF orientation, written from the EXIF spec's
# definition of tag 0x0112 ("row 0 is the visual ..., column 0 is the visual ..."), not from PIL's table.
_STORED = {
    2: lambda u: u[:, ::-1],  # row 0 top, column 0 right: mirrored
    3: lambda u: u[::-1, ::-1],  # row 0 bottom, column 0 right: upside down
    4: lambda u: u[::-1],  # row 0 bottom, column 0 left
    5: lambda u: u.transpose(1, 0, 2),  # row 0 left, column 0 top
    6: lambda u: np.rot90(u, 1),  # row 0 right, column 0 top: the phone was turned clockwise
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
    8: lambda u: np.rot90(u, -1),  # row 0 left, column 0 bottom
}


def _assert_quadrants(pixels, tol=40):
    s = pixels.shape[0]
    q, r = s // 4, 3 * s // 4
    for (y, x), colour in {(q, q): RED, (q, r): BLUE, (r, q): GREEN, (r, r): WHITE}.items():
        assert np.abs(pixels[y, x].astype(int) - colour).max() <= tol, (y, x, pixels[y, x], colour)


@pytest.mark.parametrize("orientation", sorted(_STORED))
def test_exif_orientation_is_applied_in_training_and_predict(tmp_path, orientation):
    stored = np.ascontiguousarray(_STORED[orientation](_quadrants()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    _assert_quadrants(_decoded_both_ways(path, 32))


def test_an_image_without_orientation_is_left_as_stored(tmp_path):
    path = tmp_path / "upright.png"
    Image.fromarray(_quadrants()).save(path)
    _assert_quadrants(_decoded_both_ways(path, 32), tol=0)


# --- 16-bit and float images ------------------------------------------------------------------------

# One 4x4 grey ramp in 16-bit terms: 0, full scale, half and a quarter, each a 2x2 block.
_RAMP16 = np.kron(np.array([[0, 65535], [32768, 16384]]), np.ones((2, 2))).astype(np.uint16)
_RAMP8 = np.kron(np.array([[0, 255], [128, 64]]), np.ones((2, 2))).astype(np.uint8)  # x * 255 / 65535, rounded


def _png16_rgb(path, rgb16):
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write_wide(path, fmt, mode):
    if mode == "F":
        Image.fromarray(_RAMP16.astype(np.float32) / 65535, mode="F").save(path, fmt)
    elif mode == "I":
        Image.fromarray(_RAMP16.astype(np.int32)).save(path, fmt)
    else:  # frombytes, since PIL's convert clips I;16 -> I;16B to 0..255
        Image.frombytes(mode, (4, 4), _RAMP16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()).save(path, fmt)


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("TIFF", "I"),
                                       ("TIFF", "F")])
def test_16_bit_and_float_grey_fill_0_to_255_and_become_rgb(tmp_path, fmt, mode):
    path = tmp_path / f"wide.{fmt.lower()}"
    _write_wide(path, fmt, mode)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really is the wide mode under test
    pixels = _decoded_both_ways(path, 4)
    for c in range(3):  # grey on all three channels, the full 16-bit range on the full 8-bit range
        np.testing.assert_array_equal(pixels[..., c], _RAMP8)


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1] = _RAMP16, 65535 - _RAMP16
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    pixels = _decoded_both_ways(tmp_path / "rgb16.png", 4)
    np.testing.assert_allclose(pixels[..., 0], _RAMP8, atol=1)
    np.testing.assert_allclose(pixels[..., 1], 255 - _RAMP8.astype(int), atol=1)
    assert (pixels[..., 2] == 0).all()


# --- transparency -----------------------------------------------------------------------------------

def _half_transparent(mode):
    """8x8, left half fully transparent (black underneath), right half opaque red (or grey for grey modes)."""
    if mode in ("RGBA", "LA"):
        img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
        img.paste((255, 0, 0, 255), (4, 0, 8, 8))
        return img.convert(mode), {}
    if mode in ("P-index", "P-bytes", "PA", "GIF"):
        img = Image.new("P", (8, 8), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
        img.paste(1, (4, 0, 8, 8))
        if mode == "PA":
            pa = img.convert("PA")
            alpha = np.zeros((8, 8), np.uint8)
            alpha[:, 4:] = 255
            pa.putalpha(Image.fromarray(alpha))
            return pa, {}
        return img, {"transparency": 0 if mode != "P-bytes" else bytes([0, 255])}
    if mode == "RGB":
        img = Image.new("RGB", (8, 8), (0, 0, 0))
        img.paste(RED, (4, 0, 8, 8))
        return img, {"transparency": (0, 0, 0)}
    if mode == "L":
        img = Image.new("L", (8, 8), 0)
        img.paste(100, (4, 0, 8, 8))
        return img, {"transparency": 0}
    assert mode == "I;16"
    a = np.zeros((8, 8), np.uint16)
    a[:, 4:] = 25700  # 25700 * 255 / 65535 = 100
    return Image.fromarray(a), {"transparency": 0}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P-index", "P-bytes", "GIF", "RGB", "L", "I;16"])
def test_transparent_pixels_become_white_in_every_mode(tmp_path, mode):
    img, params = _half_transparent(mode)
    if mode == "PA":  # no common format stores PA: decode it in memory, as data.py does embedded images
        pixels = to_rgb_square(img, 8)
    else:
        path = tmp_path / ("t.gif" if mode == "GIF" else "t.png")
        img.save(path, **params)
        with Image.open(path) as check:  # the file carries its transparency the way the case says
            assert check.mode == img.mode and ("transparency" in check.info) == bool(params)
        pixels = _decoded_both_ways(path, 8)
    opaque = {"LA": (76, 76, 76), "L": (100, 100, 100), "I;16": (100, 100, 100)}.get(mode, RED)  # LA: 0.299 * red
    assert (pixels[:, :4] == WHITE).all(), pixels[:, :4].reshape(-1, 3)[:3]
    assert (pixels[:, 4:] == opaque).all(), pixels[:, 4:].reshape(-1, 3)[:3]


def test_half_transparent_red_is_blended_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "half.png")
    np.testing.assert_allclose(_decoded_both_ways(tmp_path / "half.png", 4), np.full((4, 4, 3), (255, 127, 127)),
                               atol=1)


# --- CMYK -------------------------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_the_right_rgb(tmp_path):
    """PIL writes CMYK JPEGs the Adobe way (inverted, APP14 marker); decoded, cyan must be cyan, not red."""
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[:16, :16] = (0, 255, 255, 0)  # magenta + yellow = red
    cmyk[:16, 16:] = (255, 255, 0, 0)  # cyan + magenta = blue
    cmyk[16:, :16] = (255, 0, 255, 0)  # cyan + yellow = green
    cmyk[16:, 16:] = (0, 0, 0, 0)  # no ink = white
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, mode="CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK" and "adobe" in check.info
    _assert_quadrants(_decoded_both_ways(path, 32))


# --- decompression bombs ----------------------------------------------------------------------------

def _bomb_filters_left():
    return [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning and f[0] == "error"]


@pytest.mark.parametrize("side", [120, 150], ids=["warns-above-limit", "errors-above-twice-limit"])
def test_a_decompression_bomb_is_skipped_in_training_and_refused_in_predict(tmp_path, monkeypatch, caplog, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 120 px: PIL warns, 150 px: PIL raises
    for label in "ab":
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (64, 64), RED if label == "a" else BLUE).save(tmp_path / label / f"{i}.png")
    Image.new("RGB", (side, side), RED).save(tmp_path / "a" / "bomb.png")

    with pytest.raises(Image.DecompressionBombError):
        open_image(tmp_path / "a" / "bomb.png", 16)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, "autotransfer.data"):
        warnings.simplefilter("always")
        data = load_data(str(tmp_path), image_size=16)
    assert len(data.labels) == 6  # the bomb is dropped, the six good images are kept
    assert [r.getMessage() for r in caplog.records] == [
        f"Skipping unreadable image {tmp_path / 'a' / 'bomb.png'} (DecompressionBombError)"]
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not _bomb_filters_left()  # decoding in threads did not leave the error filter installed
    with pytest.raises(DataError, match=r"^Image '.*bomb\.png' cannot be decoded; pass PNG/JPEG"):
        load_images([tmp_path / "a" / "0.png", tmp_path / "a" / "bomb.png"], 16, [0] * 3, [1] * 3)
    assert (_predict_pixels(tmp_path / "a" / "0.png", 16) == RED).all()  # good files still decode


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """catch_warnings swaps process-wide state: two threads overlapping in it, the first leaving first, would
    leave the 'error' filter installed for good. Image.open is slowed so that, unguarded, they do overlap."""
    Image.new("RGB", (8, 8), RED).save(tmp_path / "x.png")
    real_open, calls = Image.open, itertools.count()
    first_in, second_in = threading.Event(), threading.Event()

    def overlapping_open(*args, **kwargs):
        if next(calls) == 0:
            first_in.set()
            second_in.wait(timeout=0.5)  # guarded, the second thread cannot get in: go on after the timeout
        else:
            second_in.set()
            time.sleep(0.1)  # leave after the first thread
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", overlapping_open)
    before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=2) as pool:
        decoded = list(pool.map(lambda _: open_image(tmp_path / "x.png", 8), range(2)))
    assert all((d == RED).all() for d in decoded)
    assert warnings.filters == before and not _bomb_filters_left()


# --- JPEG draft mode --------------------------------------------------------------------------------

def test_a_large_jpeg_is_decoded_at_reduced_scale_with_the_same_picture(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((1024, 768), Image.BICUBIC).save(tmp_path / "big.jpg", quality=95)
    seen = []
    real_to_rgb = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda img: seen.append(img.size) or real_to_rgb(img))

    pixels = open_image(tmp_path / "big.jpg", 64)
    assert seen == [(128, 96)]  # libjpeg decoded at 1/8: 768 // 64 = 12 -> 8, both sides still >= 64 px
    with Image.open(tmp_path / "big.jpg") as img:
        img.load()  # full decode, no draft
        full = to_rgb_square(img, 64)
    assert np.abs(pixels.astype(int) - full).mean() < 3  # the same picture, not a cropped or shifted one


# --- CSV --------------------------------------------------------------------------------------------

def test_a_csv_with_a_utf8_byte_order_mark_and_crlf_is_read(tmp_path):
    rows = ["path,label"]
    for i in range(6):
        Image.new("RGB", (16, 16), RED if i % 2 else BLUE).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'red' if i % 2 else 'blue'}")
    (tmp_path / "excel.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))  # Excel's CSV UTF-8
    data = load_data(str(tmp_path / "excel.csv"), image_size=16)
    assert data.classes == ("blue", "red")
    colours = data.images[:, :, 0, 0].numpy()
    assert [tuple(c) for c in colours] == [BLUE if i % 2 == 0 else RED for i in data.source_index.tolist()]


def test_a_csv_that_is_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("path,label\nx.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_data(str(tmp_path / "latin1.csv"), image_size=16)


def test_images_module_does_not_import_torch():
    code = "import sys, autotransfer.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "False"
