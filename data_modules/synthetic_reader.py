"""Read the synthetic set's attributes back: from a caption's words, and from a picture's pixels.

The pixel reader judges generated pictures (text-to-image) without any model: the picture is compared
with the palette that ``data_modules/synthetic.py`` draws with. It allows for what a decoder does to a
drawing (blur, blocks of one colour, colours off by some tens of levels):

- background: the median colour of the outer frame (4 px), nearest palette background;
- shape pixels: how far each pixel lies from the background colour towards the shape's colour, as a
  coverage in [0, 1] (a pixel half shape, half background reads 0.5), so that area and centre are right
  for blurred or block-averaged drawings;
- colour: the palette colour nearest to the mean of the clearly covered pixels (coverage >= 0.5);
- position: the coverage-weighted centre, nearest of the five drawn centres;
- size: the covered area against the midpoint of the largest small shape (a small square, 0.095 of the
  picture with its +10 % jitter) and the smallest large one (a large triangle, 0.11 with its -10 %);
- shape: from the covered pixels' bounding box (fill ratio, bottom corners), as the tests read exact
  drawings; reliable on sharp pictures only.

Attributes that cannot be read (no shape pixels) come back as ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from data_modules.synthetic import BACKGROUNDS, COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES

ATTRIBUTES = ("colour", "shape", "size", "position", "background")
FRAME = 4  # px of the border read for the background (a shape reaches at most 0.26 + 0.03 of the side from a
# centre at 0.25, i.e. to 0.0 of it at worst: the frame's median stays background)
MIN_SHAPE_DISTANCE = 0.2  # RGB distance in [0, 1] units from the background below which a pixel is background
# area fractions: small square (2 x 0.14 x 1.1)^2 = 0.095, large triangle 2 x (0.26 x 0.9)^2 = 0.109
SIZE_AREA_THRESHOLD = 0.102


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (any of the templates, or a model's wording with the same words)."""
    words = re.findall(r"[a-z]+", text.lower())
    joined = " ".join(words)

    def find(options) -> str | None:
        hits = [o for o in options if re.search(rf"\b{o}\b", joined)]
        return hits[0] if len(hits) == 1 else None

    position = [p for p, phrase in POSITION_PHRASES.items() if phrase in joined]
    return {
        "colour": find(COLOURS),
        "shape": find(SHAPES),
        "size": find(SIZES),
        "position": position[0] if len(position) == 1 else None,
        "background": find(BACKGROUNDS),
    }


def _as_float_rgb(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # [3, H, W] tensor layout
        a = np.transpose(a, (1, 2, 0))
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"read_picture: expected an RGB picture [H, W, 3] or [3, H, W], got {a.shape}")
    a = a.astype(np.float64)
    return a / 255.0 if np.issubdtype(np.asarray(image).dtype, np.integer) or a.max() > 1.0 else a


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    cols = np.array([palette[n] for n in names], dtype=np.float64) / 255.0
    return names[int(np.argmin(((cols - rgb) ** 2).sum(-1)))]


def read_picture(image) -> dict[str, str | None]:
    """The attributes drawn in a picture (PIL image, uint8 array or float array in [0, 1])."""
    a = _as_float_rgb(image)
    h, w, _ = a.shape
    frame = np.concatenate(
        [
            a[:FRAME].reshape(-1, 3),
            a[-FRAME:].reshape(-1, 3),
            a[:, :FRAME].reshape(-1, 3),
            a[:, -FRAME:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(frame, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.sqrt(((a - bg_rgb) ** 2).sum(-1))
    far = dist >= MIN_SHAPE_DISTANCE
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    out["background"] = background
    if not far.any():
        return out
    # the shape's colour: the pixels farthest from the background (the upper half of the far ones)
    core = far & (dist >= np.quantile(dist[far], 0.5))
    fg_rgb = a[core].mean(0)
    out["colour"] = _nearest(fg_rgb, COLOURS)
    direction = fg_rgb - bg_rgb
    span = float((direction**2).sum())
    if span <= 0:
        return out
    coverage = np.clip(((a - bg_rgb) @ direction) / span, 0.0, 1.0) * far
    mass = float(coverage.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = float((coverage * (xs + 0.5)).sum() / mass / w), float((coverage * (ys + 0.5)).sum() / mass / h)
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    out["size"] = "large" if mass / (h * w) > SIZE_AREA_THRESHOLD else "small"
    mask = coverage >= 0.5
    if mask.any():
        yy, xx = np.nonzero(mask)
        box = mask[yy.min() : yy.max() + 1, xx.min() : xx.max() + 1]
        fill = float(box.mean())
        if fill > 0.93:
            out["shape"] = "square"
        elif fill > 0.7:
            out["shape"] = "circle"
        elif box[-1, 0] and box[-1, -1]:
            out["shape"] = "triangle"  # both bottom corners filled
        else:
            out["shape"] = "cross"
    return out


def attribute_accuracy(
    read: Sequence[dict[str, str | None]],
    truth: Sequence[dict[str, str | None]],
    attributes: Sequence[str] = ATTRIBUTES,
) -> dict[str, float]:
    """Per attribute (the synthetic set's, or another kind's: data_modules/t2i_kinds.py): the fraction of
    pictures read as ``truth`` says (over the pictures whose truth names that attribute), and
    ``<attr>_chance``: the same for always answering the most frequent true value."""
    if len(read) != len(truth):
        raise ValueError(f"attribute_accuracy: {len(read)} readings for {len(truth)} truths")
    out = {}
    for attr in attributes:
        pairs = [(r.get(attr), t[attr]) for r, t in zip(read, truth) if t.get(attr) is not None]
        if not pairs:
            continue
        values = [t for _, t in pairs]
        out[attr] = sum(r == t for r, t in pairs) / len(pairs)
        out[f"{attr}_chance"] = max(values.count(v) for v in set(values)) / len(pairs)
    return out
