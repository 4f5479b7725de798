"""Image decoding shared by training and inference, with no torch import (the inference image has none)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb_square(img: Image.Image, size: int) -> np.ndarray:
    """Grayscale/RGBA -> RGB, resize the shorter side to `size`, centre-crop to `size` x `size`."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
