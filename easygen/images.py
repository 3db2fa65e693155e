"""Image decoding shared by the data pipeline, feature extraction and chat: encoded bytes -> a float
[3, size, size] tensor in [0, 1], shorter side resized (bicubic) then centre-cropped, as the models'
presets expect."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


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


class ImageFileError(ValueError):
    """A file that is not a picture PIL can decode (or is cut short); the message names the file."""


def load_image_file(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> float [3, size, size] in [0, 1]. A missing file is a `FileNotFoundError`, a file that
    does not decode (not a picture, truncated, unreadable) an `ImageFileError`; both messages name the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    if not p.is_file():
        raise ImageFileError(f"{p} is not a picture: it is a folder")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageFileError(f"{p} cannot be read: {exc.strerror or exc}") from None
    try:
        return load_image(data, size)
    except UnidentifiedImageError:
        raise ImageFileError(
            f"{p} is not a picture PIL can read (not an image file, or an unknown format)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{p} is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports a file cut short as OSError("image file is truncated ...") / "Truncated File Read"
        raise ImageFileError(f"{p} is a damaged or truncated picture ({exc})") from None
