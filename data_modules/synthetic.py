"""A procedural caption set a tiny model can learn, written as EasyGen shards.

    python -m data_modules.synthetic --out OUT --n 640 --seed 0 [--image-size 64]

Each picture is one shape on a plain background. What is drawn fully determines the captions:
shape (circle, square, triangle, cross), its colour (6), the background colour (3, never the
shape's), its size (small, large) and its position (left, right, top, bottom, center). Five
paraphrase templates give five reference captions per image, all naming every attribute, so
caption metrics (CIDEr etc.) have several references as on COCO. Images and a captions jsonl are
written to a temporary folder and go through the ``captions`` converter, like any user data.
Deterministic given the seed; the split is 80/10/10 (512/64/64 at the default n=640).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_modules.convert import convert

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SIZES = {"small": 0.14, "large": 0.26}  # half-extent of the shape as a fraction of the image side
POSITIONS = {  # shape centre as fractions of (width, height)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a {colour} {shape} {where} of the image, {size}, against {background}",
    "there is a {size} {colour} {shape} {where} of a {background} picture",
    "{background} background with a {size} {colour} {shape} {where}",
    "the picture shows a {size} {shape} in {colour} {where} over {background}",
)
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def captions_for(attributes: dict[str, str]) -> list[str]:
    """The five reference captions of a picture with these attributes."""
    words = dict(attributes, where=POSITION_PHRASES[attributes["position"]])
    return [template.format(**words) for template in TEMPLATES]


def caption_corpus() -> list[str]:
    """Every caption the generator can produce (for training tiny tokenizers)."""
    corpus = set()
    for shape, colour, background, size, position in itertools.product(
        SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS
    ):
        attrs = {
            "shape": shape,
            "colour": colour,
            "background": background,
            "size": size,
            "position": position,
        }
        corpus.update(captions_for(attrs))
    return sorted(corpus)


def draw(attributes: dict[str, str], image_size: int, rng: random.Random) -> Image.Image:
    """Render one picture; a small jitter of centre and extent keeps images distinct."""
    s = image_size
    img = Image.new("RGB", (s, s), BACKGROUNDS[attributes["background"]])
    pen = ImageDraw.Draw(img)
    fx, fy = POSITIONS[attributes["position"]]
    jitter = 0.03 * s
    cx, cy = fx * s + rng.uniform(-jitter, jitter), fy * s + rng.uniform(-jitter, jitter)
    r = SIZES[attributes["size"]] * s * rng.uniform(0.9, 1.1)
    fill = COLOURS[attributes["colour"]]
    shape = attributes["shape"]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        t = r / 3
        pen.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        pen.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img


def sample_attributes(rng: random.Random) -> dict[str, str]:
    colour = rng.choice(list(COLOURS))
    return {
        "shape": rng.choice(SHAPES),
        "colour": colour,
        "background": rng.choice(list(BACKGROUNDS)),
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
    }


def split_counts(n: int) -> dict[str, int]:
    val = max(1, math.floor(n * SPLITS[1][1])) if n >= 3 else 0
    test = max(1, math.floor(n * SPLITS[2][1])) if n >= 3 else 0
    return {"train": n - val - test, "val": val, "test": test}


def make_synthetic(
    out: str | Path,
    n: int = 640,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``n`` synthetic caption samples as shards under ``out``; returns the manifest."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be legible, got {image_size}")
    rng = random.Random(seed)
    counts = split_counts(n)
    splits = [name for name, count in counts.items() for _ in range(count)]
    with tempfile.TemporaryDirectory(prefix="easygen-synthetic-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        lines = []
        for i, split in enumerate(splits):
            attributes = sample_attributes(rng)
            name = f"synth_{i:06d}.png"
            draw(attributes, image_size, rng).save(tmp / "images" / name, format="PNG")
            record = {
                "image": name,
                "id": f"synth_{i:06d}",
                "captions": captions_for(attributes),
                "split": split,
                "attributes": attributes,
            }
            lines.append(json.dumps(record, sort_keys=True))
        (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
        return convert(
            "captions",
            input=tmp / "captions.jsonl",
            images=tmp / "images",
            out=out,
            shard_size=shard_size,
            progress=progress,
            source={"synthetic": {"n": n, "seed": seed, "image_size": image_size}},
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args(argv)
    manifest = make_synthetic(args.out, args.n, args.seed, args.image_size, args.shard_size, progress=True)
    counts = ", ".join(f"{name} {s['samples']}" for name, s in manifest["splits"].items())
    print(f"wrote {manifest['samples']} synthetic samples ({counts}) to {args.out}")
    return manifest


if __name__ == "__main__":
    main()
