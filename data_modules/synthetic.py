"""A procedural caption set a tiny model can learn, written as EasyGen shards.

    python -m data_modules.synthetic --out OUT --n 640 --seed 0 [--image-size 64]

Each picture is one shape on a plain background. What is drawn fully determines the captions:
shape (circle, square, triangle, cross), its colour (6), the background colour (3, never the
shape's), its size (small, large) and its position (left, right, top, bottom, center). Five
paraphrase templates give five reference captions per image, all naming every attribute, so
caption metrics (CIDEr etc.) have several references as on COCO. Images and a captions jsonl are
written to a temporary folder and go through the ``captions`` converter, like any user data.
Deterministic given the seed; the split is 80/10/10 (512/64/64 at the default n=640).

Beside the captions, ``OUT/dialogue/`` holds the instruction dialogues of the same pictures (same seed, same
split of pictures; ``write_dialogues``), in three kinds the instruct stage learns (conf/data/synthetic.yaml):

- ``draw-*.tar``: a request to draw (``"Please draw a small red circle ..."``), no picture, answered
  ``<Img>caption</Img>`` (the paper's text-to-image through the LLM, section 3): ``conversation`` samples;
- ``question-*.tar``: a question about one attribute of the picture (``"What colour is the shape?"``)
  answered with the attribute's word (``"red"``): half ``vqa`` samples (the paper's short-answer prompt),
  half ``conversation`` samples with the question as a user types it;
- ``caption-*.tar`` (val and test only): a caption request in one of the instruction phrasings, with the
  five reference captions; the training caption requests are the caption set itself.

The val and test dialogues are built from the val and test pictures' attributes only (held out).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_modules.convert import _SplitWriter, convert

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

# ---- the instruction dialogues (write_dialogues)
# what a draw request names: noun phrases naming every attribute (the answer is the first caption template)
DRAW_DESCRIPTIONS = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a {colour} {shape} {where} of the image, {size}, against {background}",
    "a {background} picture with a {size} {colour} {shape} {where}",
)
DRAW_REQUESTS = (
    "Draw {description}.",
    "Please draw {description}.",
    "Can you make a picture of {description}?",
    "Generate an image of {description}.",
    "Draw me {description}, please.",
)
# per attribute: the phrasings of the question, answered with the attribute's own word
QUESTIONS = {
    "colour": ("What colour is the shape?", "What color is the shape?", "Which colour is the shape?",
               "What colour is it?"),
    "shape": ("What shape is it?", "What shape is drawn?", "Which shape is in the picture?",
              "What is the shape?"),
    "background": ("What colour is the background?", "What color is the background?",
                   "What is the background colour?", "Which colour is the background?"),
    "position": ("Where is the shape?", "Where is it?", "Where is the shape in the picture?",
                 "Where is the shape drawn?"),
    "size": ("Is the shape small or large?", "Is it small or large?", "How big is the shape?",
             "Is the shape large or small?"),
}
# the caption requests of the held-out dialogues (training captions are asked by the collator's prompts)
CAPTION_REQUESTS = (
    "Describe the image concisely.",
    "Describe this image briefly.",
    "What is in this picture?",
    "Write a caption for this picture.",
)
DRAWS_PER_PICTURE = 2  # training draw requests per training picture (different phrasings)


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


def image_tag(description: str) -> str:
    """The answer that asks BiDiffuser for a picture (the paper's ``<Img>description</Img>``); the tags'
    spelling is easygen/llm/templates.py's IMG_OPEN / IMG_CLOSE."""
    return f"<Img>{description}</Img>"


def draw_request(attributes: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """(a request to draw a picture with these attributes, its answer ``<Img>first caption</Img>``)."""
    words = dict(attributes, where=POSITION_PHRASES[attributes["position"]])
    description = rng.choice(DRAW_DESCRIPTIONS).format(**words)
    return rng.choice(DRAW_REQUESTS).format(description=description), image_tag(captions_for(attributes)[0])


def dialogue_corpus() -> list[str]:
    """Every dialogue phrasing (requests, questions, answers, one draw request per description template and
    request phrasing), for training tiny tokenizers beside ``caption_corpus``."""
    attrs = {"shape": "circle", "colour": "red", "background": "white", "size": "small", "position": "left"}
    words = dict(attrs, where=POSITION_PHRASES["left"])
    out = [*CAPTION_REQUESTS, *(q for qs in QUESTIONS.values() for q in qs)]
    out += [*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *POSITIONS]
    for request in DRAW_REQUESTS:
        for description in DRAW_DESCRIPTIONS:
            out.append(request.format(description=description.format(**words)))
    out.append(image_tag(captions_for(attrs)[0]))
    return out


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


def pictures(n: int, seed: int, image_size: int):
    """The set's pictures in order: (index, split, attributes, PIL image), deterministic given the seed."""
    rng = random.Random(seed)
    counts = split_counts(n)
    splits = [name for name, count in counts.items() for _ in range(count)]
    for i, split in enumerate(splits):
        attributes = sample_attributes(rng)
        yield i, split, attributes, draw(attributes, image_size, rng)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check(n: int, image_size: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be legible, got {image_size}")


def write_caption_set(samples, out: str | Path, shard_size: int, progress: bool, source: dict) -> dict[str, Any]:
    """Shards under ``out`` from ``(id, split, PIL picture, captions, attributes)`` samples: the pictures and
    a captions jsonl written to a temporary folder, then the ``captions`` converter, like any user data."""
    with tempfile.TemporaryDirectory(prefix="easygen-captions-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        lines = []
        for sid, split, image, captions, attributes in samples:
            image.save(tmp / "images" / f"{sid}.png", format="PNG")
            record = {"image": f"{sid}.png", "id": sid, "captions": captions, "split": split,
                      "attributes": attributes}
            lines.append(json.dumps(record, sort_keys=True))
        (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
        return convert("captions", input=tmp / "captions.jsonl", images=tmp / "images", out=out,
                       shard_size=shard_size, progress=progress, source=source)


def make_synthetic(
    out: str | Path,
    n: int = 640,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``n`` synthetic caption samples as shards under ``out`` and their dialogues under
    ``out/dialogue`` (``write_dialogues``); returns the caption set's manifest."""
    _check(n, image_size)
    manifest = write_caption_set(
        ((f"synth_{i:06d}", split, image, captions_for(attributes), attributes)
         for i, split, attributes, image in pictures(n, seed, image_size)),
        out, shard_size=shard_size, progress=progress,
        source={"synthetic": {"n": n, "seed": seed, "image_size": image_size}},
    )
    write_dialogues(Path(out) / "dialogue", n=n, seed=seed, image_size=image_size, shard_size=shard_size)
    return manifest


def dialogue_samples(n: int, seed: int, image_size: int):
    """The dialogues of the set's pictures: (split, kind, key, json record, PNG bytes or None), where kind is
    the shard group (``draw``, ``question``, ``caption``). Each record's ``dialogue`` field says what it
    asks: ``{"type": "draw"|"question"|"caption", "attributes": {...}}`` plus ``attribute`` for questions."""
    rng = random.Random(f"dialogue-{seed}")  # its own stream: the pictures stay those of the caption set
    for i, split, attributes, image in pictures(n, seed, image_size):
        png, base = _png(image), f"synth_{i:06d}"
        meta = {"attributes": attributes, "picture": base}
        for d in range(DRAWS_PER_PICTURE if split == "train" else 1):
            request, answer = draw_request(attributes, rng)
            record = {"id": f"{base}_draw{d}", "kind": "conversation", "split": split,
                      "conversations": [{"from": "human", "value": request}, {"from": "gpt", "value": answer}],
                      "dialogue": {"type": "draw", **meta}}
            yield split, "draw", record["id"], record, None
        for attribute, phrasings in QUESTIONS.items():
            question, answer = rng.choice(phrasings), attributes[attribute]
            # the picture's captions travel along: caption-as-image training reads them in its place
            record = {"id": f"{base}_{attribute}", "split": split, "captions": captions_for(attributes),
                      "dialogue": {"type": "question", "attribute": attribute, **meta}}
            if rng.random() < 0.5:  # the paper's short-answer prompt (easygen/llm/collate.py)
                record.update(kind="vqa", question=question, answers=[answer])
            else:  # the question as typed in a chat
                record.update(kind="conversation", conversations=[
                    {"from": "human", "value": f"<image> {question}"}, {"from": "gpt", "value": answer}])
            yield split, "question", record["id"], record, png
        if split != "train":
            record = {"id": f"{base}_caption", "kind": "conversation", "split": split,
                      "conversations": [{"from": "human", "value": f"<image> {rng.choice(CAPTION_REQUESTS)}"},
                                        {"from": "gpt", "value": captions_for(attributes)[0]}],
                      "captions": captions_for(attributes), "dialogue": {"type": "caption", **meta}}
            yield split, "caption", record["id"], record, png


def write_dialogues(
    out: str | Path, n: int = 640, seed: int = 0, image_size: int = 64, shard_size: int = 256
) -> dict[str, Any]:
    """Write the dialogues of ``make_synthetic(n, seed, image_size)``'s pictures as shards
    ``out/<split>/<kind>-%06d.tar`` (kind: draw, question, caption) and ``out/manifest.json``."""
    _check(n, image_size)
    out = Path(out)
    writers: dict[tuple[str, str], _SplitWriter] = {}
    try:
        for split, kind, key, record, png in dialogue_samples(n, seed, image_size):
            if (split, kind) not in writers:
                writers[split, kind] = _SplitWriter(out, split, shard_size, prefix=kind)
            members = {"json": json.dumps(record, sort_keys=True).encode()}
            if png is not None:
                members["png"] = png
            writers[split, kind].write(key, members)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    splits: dict[str, dict[str, Any]] = {}
    for (split, _), writer in sorted(writers.items()):
        entry = splits.setdefault(split, {"samples": 0, "shards": {}})
        entry["shards"].update(writer.counts)
        entry["samples"] += sum(writer.counts.values())
    manifest = {
        "format": "synthetic-dialogue",
        "source": {"synthetic": {"n": n, "seed": seed, "image_size": image_size}},
        "shard_size": shard_size,
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "skipped": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


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
