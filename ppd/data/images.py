"""How this project encodes an image: PNG (lossless, so a pixel measured after a round trip is the pixel drawn).

One encoder for every image we write: the toy world's preference pairs, generated samples, Serve's responses."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (Pillow's defaults: zlib level 6, no optimiser pass; same pixels, same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
