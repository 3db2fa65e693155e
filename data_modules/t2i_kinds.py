"""The kinds of caption sets whose text-to-image pictures can be read back without a model.

A kind is a caption parser (the attributes a prompt names), a pixel reader (the attributes a picture
shows) and the values each attribute takes. ``KINDS`` holds the synthetic shapes
(data_modules/synthetic_reader.py) and the pattern kinds of data_modules/patterns.py. ``kind_for`` tells a
set's kind from its manifest's ``source`` or, failing that, from the prompts (the one kind that reads every
prompt). The stage=eval task=t2i scores (easygen/stages/evaluate.py::t2i_eval) use them.

The pattern readers allow for what a decoder does to a drawing (blur, blocks of one colour, colours off
by some tens of levels), as the synthetic reader does:

- stripes: the orientation is the axis along which the row (or column) means vary most; the colours are
  the two most frequent nearest-palette colours of the middle half of each of the four bands;
- texture: the colour is the palette colour whose direction from white is closest (cosine) to that of the
  pixels farthest from white; the texture is read from the covered fraction (each pixel's coverage: its
  projection onto that direction; plain 1, checkered 0.5, dotted 0.30 as drawn at 64 px), which blur does
  not change, and a half-covered picture is checkered only when its coverage follows the 4x4 board
  (correlation >= 0.5), else no texture is read. Dotted is the covered share alone: the 8-px dots straddle
  the tiny VAE's 8x8 cells, whose decoder draws them as an even tint of that share (its reconstructions
  read back dotted, tests/test_t2i_kinds.py), so their layout is not asked for;
- count: per quarter of the picture, the coverage of the colour over black (as for texture); a quarter
  holding at least half a disc's area counts one disc; the colour as for texture, with black as origin;
- frame: the border's colour is the median of the outer frame (3 px), the centre's the median of the
  middle quarter, each the nearest palette colour.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_modules import patterns, synthetic, synthetic_reader
from data_modules.synthetic_reader import _as_float_rgb
from data_modules.synthetic_reader import (
    attribute_accuracy as attribute_accuracy,  # one implementation for every kind
)


@dataclass(frozen=True)
class Kind:
    name: str
    values: dict[str, tuple[str, ...]]  # attribute -> the values the kind draws
    parse_caption: Callable[[str], dict[str, str | None]]
    read_picture: Callable[[object], dict[str, str | None]]

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.values)


def _palette(names, palette=synthetic.COLOURS) -> tuple[list[str], np.ndarray]:
    names = list(names)
    return names, np.array([palette[n] for n in names], dtype=np.float64) / 255.0


def _nearest(rgb: np.ndarray, names=synthetic.COLOURS) -> str:
    names, cols = _palette(names)
    return names[int(np.argmin(((cols - rgb) ** 2).sum(-1)))]


def _nearest_direction(direction: np.ndarray, origin: np.ndarray, names=synthetic.COLOURS) -> str:
    """The palette colour whose direction from ``origin`` is closest (cosine) to ``direction``."""
    names, cols = _palette(names)
    d = cols - origin
    cos = (d @ direction) / (np.linalg.norm(d, axis=1) * max(float(np.linalg.norm(direction)), 1e-9))
    return names[int(np.argmax(cos))]


def read_stripes(image) -> dict[str, str | None]:
    a = _as_float_rgb(image)
    h, w, _ = a.shape
    rows, cols = a.mean(1), a.mean(0)  # [h, 3]: the mean colour of each row; [w, 3]: of each column
    horizontal = float(rows.var(0).sum()) >= float(cols.var(0).sum())
    profile = rows if horizontal else cols
    n = len(profile)
    bands = []
    for k in range(4):
        lo, hi = round((k + 0.25) * n / 4), round((k + 0.75) * n / 4)
        bands.append(_nearest(profile[lo:hi].mean(0), patterns.STRIPE_COLOURS))
    common = [c for c, _ in Counter(bands).most_common(2)]
    return {
        "colours": patterns.colour_pair(*common) if len(common) == 2 else None,
        "orientation": "horizontal" if horizontal else "vertical",
    }


def _coverage(a: np.ndarray, origin: np.ndarray, names=synthetic.COLOURS) -> tuple[str | None, np.ndarray]:
    """The drawn colour (by direction from ``origin``, the ground) and each pixel's coverage in [0, 1]
    by the drawn colour's own palette entry."""
    dist = np.sqrt(((a - origin) ** 2).sum(-1))
    far = dist >= 0.1
    if not far.any():
        return None, np.zeros(a.shape[:2])
    core = far & (dist >= np.quantile(dist[far], 0.5))
    colour = _nearest_direction(a[core].mean(0) - origin, origin, names)
    direction = np.array(synthetic.COLOURS[colour], dtype=np.float64) / 255.0 - origin
    coverage = np.clip(((a - origin) @ direction) / float((direction**2).sum()), 0.0, 1.0)
    return colour, coverage


TEXTURE_PLAIN_ABOVE = 0.75  # covered fraction: plain 1.0
TEXTURE_CHECKERED_ABOVE = 0.4  # covered fraction: checkered 0.5, dotted 0.30 (as drawn at 64 px)


CHECKERBOARD_MIN_CORRELATION = 0.5  # |Pearson r| of the coverage with a 4x4 checkerboard: 1 as drawn


def checkerboard_correlation(coverage: np.ndarray) -> float:
    """|Pearson r| between the coverage map and a 4x4 board of +-1 cells (either parity)."""
    h, w = coverage.shape
    board = ((np.arange(h)[:, None] * 4 // h + np.arange(w)[None, :] * 4 // w) % 2) * 2.0 - 1.0
    c = coverage - coverage.mean()
    norm = float(np.sqrt((c**2).sum() * ((board - board.mean()) ** 2).sum()))
    return abs(float((c * (board - board.mean())).sum())) / norm if norm > 0 else 0.0


def read_texture(image) -> dict[str, str | None]:
    a = _as_float_rgb(image)
    colour, coverage = _coverage(a, np.ones(3))
    if colour is None:
        return {"colour": None, "texture": None}
    covered = float(coverage.mean())
    if covered > TEXTURE_PLAIN_ABOVE:
        texture = "plain"
    elif covered > TEXTURE_CHECKERED_ABOVE:
        # half covered is checkered only when laid out as the board: otherwise no texture is read
        texture = "checkered" if checkerboard_correlation(coverage) >= CHECKERBOARD_MIN_CORRELATION else None
    else:
        texture = "dotted"
    return {"colour": colour, "texture": texture}


def read_count(image) -> dict[str, str | None]:
    a = _as_float_rgb(image)
    h, w, _ = a.shape
    colour, coverage = _coverage(a, np.zeros(3))
    if colour is None:
        return {"count": None, "colour": None}
    disc = np.pi * (patterns.DISC_RADIUS * h) * (patterns.DISC_RADIUS * w)
    quarters = [coverage[: h // 2, : w // 2], coverage[: h // 2, w // 2 :],
                coverage[h // 2 :, : w // 2], coverage[h // 2 :, w // 2 :]]
    n = sum(float(q.sum()) >= 0.5 * disc for q in quarters)
    return {"count": patterns.COUNTS[n - 1] if n else None, "colour": colour}


FRAME_EDGE = 3  # px of the border read for the frame's colour (the border is 14 px wide at 64 px)


def read_frame(image) -> dict[str, str | None]:
    a = _as_float_rgb(image)
    h, w, _ = a.shape
    e = FRAME_EDGE
    edge = np.concatenate([a[:e].reshape(-1, 3), a[-e:].reshape(-1, 3), a[:, :e].reshape(-1, 3),
                           a[:, -e:].reshape(-1, 3)])
    middle = a[3 * h // 8 : 5 * h // 8, 3 * w // 8 : 5 * w // 8].reshape(-1, 3)
    return {"frame": _nearest(np.median(edge, 0)), "centre": _nearest(np.median(middle, 0))}


def _pattern_kind(name: str, reader) -> Kind:
    return Kind(name, patterns.ATTRIBUTES[name], lambda text: patterns.parse_caption(name, text), reader)


KINDS: dict[str, Kind] = {
    "synthetic": Kind(
        "synthetic",
        {
            "colour": tuple(synthetic.COLOURS),
            "shape": synthetic.SHAPES,
            "size": tuple(synthetic.SIZES),
            "position": tuple(synthetic.POSITIONS),
            "background": tuple(synthetic.BACKGROUNDS),
        },
        synthetic_reader.parse_caption,
        synthetic_reader.read_picture,
    ),
    "stripes": _pattern_kind("stripes", read_stripes),
    "texture": _pattern_kind("texture", read_texture),
    "count": _pattern_kind("count", read_count),
    "frame": _pattern_kind("frame", read_frame),
}


def manifest_kind(root: str | Path | None) -> str | None:
    """The kind a set's ``manifest.json`` records in its ``source`` (None when it names none)."""
    if not root:
        return None
    path = Path(str(root)) / "manifest.json"
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text()).get("source") or {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from e
    if "synthetic" in source:
        return "synthetic"
    kind = (source.get("patterns") or {}).get("kind")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{path}: source.patterns.kind={kind!r} is no known kind ({', '.join(KINDS)})")
    return kind


def names_every_attribute(kind: Kind, prompt: str) -> bool:
    return all(v is not None for v in kind.parse_caption(prompt).values())


def kind_for(prompts: Sequence[str], root: str | Path | None = None) -> Kind | None:
    """The set's kind: the one its manifest names, or else the one kind whose parser reads every prompt
    (None when no kind, or more than one, does)."""
    named = manifest_kind(root)
    if named is not None:
        return KINDS[named]
    if not prompts:
        return None
    fits = [k for k in KINDS.values() if all(names_every_attribute(k, p) for p in prompts)]
    return fits[0] if len(fits) == 1 else None
