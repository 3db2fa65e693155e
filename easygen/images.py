"""Image decoding shared by the data pipeline, feature extraction and chat: encoded bytes -> a float
[3, size, size] tensor in [0, 1], shorter side resized (bicubic) then centre-cropped, as the models'
presets expect."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Decode an encoded image to float [3, size, size] in [0, 1]: shorter side to ``size``, center crop."""
    with Image.open(io.BytesIO(data)) as img:
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly; draft keeps both sides >= size.
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
    width, height = img.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    array = np.array(img, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


def load_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> float [3, size, size] in [0, 1]; a missing file is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    return load_image(p.read_bytes(), size)
