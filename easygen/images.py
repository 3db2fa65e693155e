"""Image decoding shared by the data pipeline, feature extraction, chat and serving: encoded bytes -> a
float [3, size, size] tensor in [0, 1], as UniDiffuser's ``center_crop`` prepares every picture for
BiDiffuser (the paper's image-to-text feature and its COCO training set both use it): a square crop of
the shorter side's length at the centre (integer offsets ``(h - s) // 2``, ``(w - s) // 2``), then a PIL
Lanczos resize to ``size x size``, as uint8. The tensor holds those uint8 values / 255; the VAE sees them
as ``2 x - 1`` (= pixels / 127.5 - 1) and CLIP resamples the same uint8 picture with PIL
(easygen/bidiffuser/clip.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """UniDiffuser's ``center_crop``: the centred square of the shorter side, Lanczos-resized to ``size``,
    as a uint8 ``[size, size, 3]`` array."""
    array = np.asarray(img.convert("RGB"))
    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(array[top : top + s, left : left + s], "RGB")
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Decode an encoded image to float [3, size, size] in [0, 1]: ``center_crop`` (the whole picture is
    decoded: a reduced-scale JPEG decode would change the pixels)."""
    with Image.open(io.BytesIO(data)) as img:
        array = center_crop(img, size)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


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
