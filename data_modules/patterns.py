"""Procedural caption sets of other kinds than the synthetic shapes, written as EasyGen shards.

    python -m data_modules.patterns --kind stripes --out OUT --n 1000 --seed 0 [--image-size 64]

Each kind draws one kind of picture whose captions name everything that varies:

- ``stripes``: four bands of two colours (5 colours, 10 pairs) alternating, horizontal or vertical;
- ``texture``: one colour (6) on white as a texture: plain (the whole picture), checkered (a 4x4 board)
  or dotted (a 4x4 grid of discs);
- ``count``: one to four discs of one colour (6) on black, each in its own quarter of the picture;
- ``frame``: a border of one colour around a centre of another (6 colours, 30 ordered pairs).

The bands, cells, discs and the border are at least 12 px wide at 64 px, i.e. 1.5 cells of the tiny VAE's
8x8 latent grid or more (README.md, "The settings that make the tiny preset learn"). Five paraphrase
templates per kind give five reference captions per picture, all naming every attribute. Images and a
captions jsonl go through the ``captions`` converter, like data_modules/synthetic.py; the manifest's
``source`` records ``{"patterns": {"kind", "n", "seed", "image_size"}}``, from which the text-to-image
evaluation recognises the set (data_modules/t2i_kinds.py, whose pixel readers read these pictures back).
Deterministic given the seed; the split is 80/10/10.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_modules.synthetic import COLOURS, split_counts, write_caption_set

KINDS = ("stripes", "texture", "count", "frame")
STRIPE_COLOURS = ("red", "green", "blue", "yellow", "purple")
ORIENTATIONS = ("horizontal", "vertical")
TEXTURES = ("plain", "checkered", "dotted")
COUNTS = ("one", "two", "three", "four")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
DOT_RADIUS = 0.065  # texture dots: radius as a fraction of the side, on a 4x4 grid (0.30 of the area covered at 64 px)
DISC_RADIUS = 0.12  # count discs: radius as a fraction of the side, one per quarter
FRAME_WIDTH = 0.22  # frame: border width as a fraction of the side

TEMPLATES = {
    "stripes": (
        "{a} and {b} {orientation} stripes",
        "{orientation} stripes of {a} and {b}",
        "a picture of {a} and {b} stripes, {orientation}",
        "stripes in {a} and {b} running {orientation}ly",
        "a pattern of {orientation} {a} and {b} stripes",
    ),
    "texture": (
        "a {colour} {texture} pattern",
        "a {texture} picture in {colour}",
        "{texture} texture, {colour}",
        "the pattern is {texture} and {colour}",
        "a {texture} {colour} surface",
    ),
    "count": (
        "{count} {colour} {disc} on black",
        "a black picture with {count} {colour} {disc}",
        "{colour} {disc}, {count} in all",
        "there {are} {count} {colour} {disc}",
        "{count} {disc} in {colour} on a black background",
    ),
    "frame": (
        "a {frame} frame around a {centre} centre",
        "{centre} inside a {frame} border",
        "a {centre} square framed in {frame}",
        "a picture with a {frame} border and a {centre} middle",
        "{frame} edges, {centre} centre",
    ),
}
# what each kind's captions name, and the values each can take
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "stripes": {
        "colours": tuple(f"{a} and {b}" for a, b in itertools.combinations(sorted(STRIPE_COLOURS), 2)),
        "orientation": ORIENTATIONS,
    },
    "texture": {"colour": tuple(COLOURS), "texture": TEXTURES},
    "count": {"count": COUNTS, "colour": tuple(COLOURS)},
    "frame": {"frame": tuple(COLOURS), "centre": tuple(COLOURS)},
}


def colour_pair(a: str, b: str) -> str:
    """The ``colours`` attribute of stripes: the two colours in alphabetical order (either may come first)."""
    return " and ".join(sorted((a, b)))


def sample_attributes(kind: str, rng: random.Random) -> dict[str, str]:
    """One picture's attributes, plus what drawing and captions need beyond them (``first`` for stripes:
    the colour of the top/left band, named first)."""
    if kind == "stripes":
        a, b = rng.sample(STRIPE_COLOURS, 2)
        return {"colours": colour_pair(a, b), "orientation": rng.choice(ORIENTATIONS), "first": a}
    if kind == "texture":
        return {"colour": rng.choice(list(COLOURS)), "texture": rng.choice(TEXTURES)}
    if kind == "count":
        return {"count": rng.choice(COUNTS), "colour": rng.choice(list(COLOURS))}
    if kind == "frame":
        frame, centre = rng.sample(list(COLOURS), 2)
        return {"frame": frame, "centre": centre}
    raise ValueError(f"unknown pattern kind {kind!r}; expected one of {KINDS}")


def _stripe_pair(attributes: dict[str, str]) -> tuple[str, str]:
    a, b = attributes["colours"].split(" and ")
    first = attributes.get("first", a)
    return (first, b if first == a else a)


def captions_for(kind: str, attributes: dict[str, str]) -> list[str]:
    """The five reference captions of a picture of this kind with these attributes."""
    words = dict(attributes)
    if kind == "stripes":
        words["a"], words["b"] = _stripe_pair(attributes)
    elif kind == "count":
        words["disc"] = "disc" if attributes["count"] == "one" else "discs"
        words["are"] = "is" if attributes["count"] == "one" else "are"
    return [t.format(**words) for t in TEMPLATES[kind]]


def caption_corpus(kind: str) -> list[str]:
    """Every caption the kind can produce."""
    names = list(ATTRIBUTES[kind])
    corpus = set()
    for values in itertools.product(*ATTRIBUTES[kind].values()):
        attrs = dict(zip(names, values))
        if kind == "frame" and attrs["frame"] == attrs["centre"]:
            continue
        if kind == "stripes":
            a, b = attrs["colours"].split(" and ")
            corpus.update(captions_for(kind, dict(attrs, first=b)))
        corpus.update(captions_for(kind, attrs))
    return sorted(corpus)


def _template_regex(template: str) -> re.Pattern:
    """A template as a regular expression with a named group per field (for the caption parsers)."""
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for p in parts:
        if p.startswith("{") and p.endswith("}"):
            name = p[1:-1]
            out.append(rf"(?P<{name}>[a-z]+)")
        else:
            out.append(re.escape(p))
    return re.compile("^" + "".join(out) + "$")


_REGEXES = {kind: [_template_regex(t) for t in templates] for kind, templates in TEMPLATES.items()}


def parse_caption(kind: str, text: str) -> dict[str, str | None]:
    """The attributes a caption of this kind names, read through its templates; every attribute ``None``
    when the caption is none of them (or names a value the kind does not draw)."""
    text = " ".join(text.lower().strip().rstrip(".").split())
    empty: dict[str, str | None] = dict.fromkeys(ATTRIBUTES[kind])
    for regex in _REGEXES[kind]:
        m = regex.match(text)
        if not m:
            continue
        g = m.groupdict()
        if kind == "stripes":
            if g["orientation"] not in ORIENTATIONS or g["a"] == g["b"]:
                continue
            if g["a"] not in STRIPE_COLOURS or g["b"] not in STRIPE_COLOURS:
                continue
            out = {"colours": colour_pair(g["a"], g["b"]), "orientation": g["orientation"]}
        else:
            out = {attr: g.get(attr) for attr in ATTRIBUTES[kind]}
            if kind == "count":
                want = "disc" if out["count"] == "one" else "discs"
                if g.get("disc") != want or ("are" in g and g["are"] != ("is" if want == "disc" else "are")):
                    continue
        if all(out[a] in ATTRIBUTES[kind][a] for a in out):
            return out
    return empty


def draw(kind: str, attributes: dict[str, str], image_size: int, rng: random.Random) -> Image.Image:
    """Render one picture; a small random phase or jitter keeps pictures of the same attributes distinct."""
    s = image_size
    if kind == "stripes":
        a, b = _stripe_pair(attributes)
        img = Image.new("RGB", (s, s), COLOURS[a])
        pen = ImageDraw.Draw(img)
        band = s / 4
        for k in (1, 3):
            lo, hi = round(k * band), round((k + 1) * band) - 1
            box = (0, lo, s - 1, hi) if attributes["orientation"] == "horizontal" else (lo, 0, hi, s - 1)
            pen.rectangle(box, fill=COLOURS[b])
        return img
    if kind == "texture":
        fill = COLOURS[attributes["colour"]]
        texture = attributes["texture"]
        if texture == "plain":
            return Image.new("RGB", (s, s), fill)
        img = Image.new("RGB", (s, s), WHITE)
        pen = ImageDraw.Draw(img)
        cell = s / 4
        parity = rng.randrange(2)
        for i, j in itertools.product(range(4), range(4)):
            if texture == "checkered":
                if (i + j) % 2 == parity:
                    pen.rectangle((round(i * cell), round(j * cell), round((i + 1) * cell) - 1,
                                   round((j + 1) * cell) - 1), fill=fill)
            elif texture == "dotted":
                r = DOT_RADIUS * s
                cx, cy = (i + 0.5) * cell, (j + 0.5) * cell
                pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
        return img
    if kind == "count":
        n = COUNTS.index(attributes["count"]) + 1
        img = Image.new("RGB", (s, s), BLACK)
        pen = ImageDraw.Draw(img)
        r = DISC_RADIUS * s
        jitter = 0.04 * s
        for q in sorted(rng.sample(range(4), n)):
            cx = (0.25 + 0.5 * (q % 2)) * s + rng.uniform(-jitter, jitter)
            cy = (0.25 + 0.5 * (q // 2)) * s + rng.uniform(-jitter, jitter)
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[attributes["colour"]])
        return img
    if kind == "frame":
        img = Image.new("RGB", (s, s), COLOURS[attributes["frame"]])
        w = round(FRAME_WIDTH * s)
        ImageDraw.Draw(img).rectangle((w, w, s - 1 - w, s - 1 - w), fill=COLOURS[attributes["centre"]])
        return img
    raise ValueError(f"unknown pattern kind {kind!r}; expected one of {KINDS}")


def make_patterns(
    kind: str,
    out: str | Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``n`` samples of one kind as shards under ``out``; returns the manifest."""
    if kind not in KINDS:
        raise ValueError(f"unknown pattern kind {kind!r}; expected one of {KINDS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for the patterns to be legible, got {image_size}")
    rng = random.Random(seed)
    counts = split_counts(n)
    splits = [name for name, count in counts.items() for _ in range(count)]
    def samples():
        for i, split in enumerate(splits):
            attributes = sample_attributes(kind, rng)
            image = draw(kind, attributes, image_size, rng)
            yield (f"{kind}_{i:06d}", split, image, captions_for(kind, attributes),
                   {a: attributes[a] for a in ATTRIBUTES[kind]})

    return write_caption_set(samples(), out, shard_size=shard_size, progress=progress,
                             source={"patterns": {"kind": kind, "n": n, "seed": seed, "image_size": image_size}})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args(argv)
    manifest = make_patterns(args.kind, args.out, args.n, args.seed, args.image_size, args.shard_size,
                             progress=True)
    counts = ", ".join(f"{name} {s['samples']}" for name, s in manifest["splits"].items())
    print(f"wrote {manifest['samples']} {args.kind} samples ({counts}) to {args.out}")
    return manifest


if __name__ == "__main__":
    main()
