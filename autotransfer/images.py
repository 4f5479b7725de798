"""Image decoding shared by training and inference, with no torch import (the inference image has none).

`open_image` is the one path from a file to pixels: training (`data._decode`) and `predict` both call it, so
a model sees at inference exactly what it was trained on. It refuses decompression bombs, lets libjpeg
downscale large JPEGs while decoding (draft mode), applies the EXIF orientation, scales 16-bit and float
images to 0..255, composites transparency on white and converts CMYK, then resizes and centre-crops.
"""

from __future__ import annotations

import threading
import warnings
from os import PathLike

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Modes holding more than 8 bits per sample: scaled to 0..255 with numpy, since PIL's convert clips them.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_TRANSPOSING_ORIENTATIONS = range(2, 9)  # EXIF 0x0112: 1 is upright, 2..8 flip and/or rotate
_WARNINGS_LOCK = threading.Lock()  # warnings.catch_warnings swaps process-wide state; data.py decodes in threads


def open_image(path: str | PathLike, size: int) -> np.ndarray:
    """Decode an image file into uint8 [size, size, 3] RGB, as `to_rgb_square` does for an open image.

    Raises Image.DecompressionBombError for an image over Image.MAX_IMAGE_PIXELS (PIL only warns up to twice
    that), and what PIL raises for unreadable files (UnidentifiedImageError, OSError, ValueError).
    """
    with open(path, "rb") as f:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(f)  # reads the header only: the lock is held for microseconds
            except Image.DecompressionBombWarning as w:
                raise Image.DecompressionBombError(str(w)) from None
        with img:
            if img.format in ("JPEG", "MPO"):
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping both sides >= size: a 12-MP photo
                # decodes to 224 px several times faster, and the resize below still has the final say.
                img.draft("RGB", (size, size))
            return to_rgb_square(img, size)


def to_rgb_square(img: Image.Image, size: int) -> np.ndarray:
    """Upright RGB, shorter side resized to `size` (bilinear), centre-cropped to `size` x `size`: uint8 HxWx3."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, turned upright by its EXIF orientation, transparency composited on white."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS:
        img = ImageOps.exif_transpose(img)
    key = img.info.get("transparency")
    if img.mode in _WIDE_MODES:
        return _wide_to_rgb(img, key)
    if img.mode in _ALPHA_MODES or img.mode == "P" or (key is not None and img.mode in ("1", "L", "RGB")):
        # P: convert applies a tRNS palette transparency (or an RGBA palette); 1/L/RGB: the tRNS colour key
        # becomes alpha 0. Either way the alpha is composited on white, never left to show black or the
        # palette colour behind it.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    # CMYK: PIL's JPEG reader already undoes Adobe's inverted CMYK ("CMYK;I"), so convert is right for the
    # CMYK JPEGs Photoshop and PIL write. YCbCr, 1 and L convert directly.
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_to_rgb(img: Image.Image, key: object) -> Image.Image:
    """16-bit, 32-bit int and float grayscale -> RGB, scaled (not clipped) so the nominal range fills 0..255.

    I;16* and I within 0..65535 are 16-bit: 65535 -> 255. F within 0..1 is 0..1, within 0..255 is 8-bit,
    within 0..65535 is 16-bit. Anything else (negative or wider values) is stretched from its min to its max.
    A tRNS colour key (compared with the raw values) is painted white.
    """
    a = np.asarray(img)
    x = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        top = 1.0
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        top = 255.0
    elif lo >= 0 and hi <= 65535:
        top = 65535.0  # integer data in 0..255 is still 16-bit data, only dark: no data-dependent stretch
    else:
        x, top = x - lo, max(hi - lo, 1e-12)
    grey = np.rint(np.clip(x * (255.0 / top), 0, 255)).astype(np.uint8)
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        grey[a == key] = 255
    return Image.fromarray(grey).convert("RGB")
