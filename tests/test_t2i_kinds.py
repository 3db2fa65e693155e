"""The pattern caption sets (data_modules/patterns.py) and the kind registry the text-to-image evaluation
reads them back with (data_modules/t2i_kinds.py): each reader reads exactly what its generator drew, and
something else for a picture of another value; each parser reads every template; the generator repeats
given its seed; the tiny VAE keeps what the readers read; stage=eval task=t2i reports every attribute."""

from __future__ import annotations

import itertools
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import patterns
from data_modules.t2i_kinds import KINDS, attribute_accuracy, kind_for, manifest_kind
from easygen.bidiffuser.autoencoder import tiny_autoencoder
from easygen.stages.evaluate import attribute_readings
from tests.test_t2i import _reconstruct

SIZE = 64  # the sets' image size (model.image_size of the tiny preset)


def _all_attributes(kind: str):
    """Every attribute combination the kind draws (stripes: both colour orders)."""
    names = list(patterns.ATTRIBUTES[kind])
    for values in itertools.product(*patterns.ATTRIBUTES[kind].values()):
        attrs = dict(zip(names, values))
        if kind == "frame" and attrs["frame"] == attrs["centre"]:
            continue
        if kind == "stripes":
            for first in attrs["colours"].split(" and "):
                yield dict(attrs, first=first)
        else:
            yield attrs


def _truth(kind: str, attrs: dict) -> dict:
    return {a: attrs[a] for a in patterns.ATTRIBUTES[kind]}


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_reader_reads_every_value_of_its_generator(kind):
    for seed in range(3):
        rng = random.Random(seed)
        for attrs in _all_attributes(kind):
            read = KINDS[kind].read_picture(patterns.draw(kind, attrs, SIZE, rng))
            assert read == _truth(kind, attrs), (seed, attrs, read)


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_reader_tells_another_value_apart(kind):
    """A picture drawn with one attribute changed reads as the changed value, not the first picture's."""
    rng = random.Random(3)
    for attrs in itertools.islice(_all_attributes(kind), 0, None, 7):
        for attr, values in patterns.ATTRIBUTES[kind].items():
            for other in values:
                changed = dict(attrs, **{attr: other})
                if other == attrs[attr] or (kind == "frame" and changed["frame"] == changed["centre"]):
                    continue
                if attr == "colours":  # stripes: the first band takes one of the new colours
                    changed["first"] = other.split(" and ")[0]
                read = KINDS[kind].read_picture(patterns.draw(kind, changed, SIZE, rng))
                assert read[attr] == other and read != _truth(kind, attrs), (attrs, changed, read)


def test_texture_reader_wants_the_board_for_checkered():
    """Half the picture in the colour is checkered only when laid out as the 4x4 board: one half of the
    picture, or a 2x2 board, reads no texture."""
    half = np.full((SIZE, SIZE, 3), 255, np.uint8)
    half[:, : SIZE // 2] = patterns.COLOURS["red"]
    coarse = np.full((SIZE, SIZE, 3), 255, np.uint8)
    coarse[: SIZE // 2, : SIZE // 2] = coarse[SIZE // 2 :, SIZE // 2 :] = patterns.COLOURS["red"]
    for picture in (half, coarse):
        assert KINDS["texture"].read_picture(picture) == {"colour": "red", "texture": None}


def test_readers_read_a_blank_picture_as_no_drawing():
    white, black = np.full((SIZE, SIZE, 3), 255, np.uint8), np.zeros((SIZE, SIZE, 3), np.uint8)
    assert KINDS["texture"].read_picture(white) == {"colour": None, "texture": None}
    assert KINDS["count"].read_picture(black) == {"count": None, "colour": None}


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_parser_reads_every_template(kind):
    parse = KINDS[kind].parse_caption
    for attrs in _all_attributes(kind):
        captions = patterns.captions_for(kind, attrs)
        assert len(set(captions)) == len(patterns.TEMPLATES[kind]) == 5
        for caption in captions:
            assert parse(caption) == _truth(kind, attrs), caption
    # a caption of another kind, or with a value the kind does not draw, names nothing
    assert all(v is None for v in parse("a large red circle on the left on a white background").values())
    assert all(v is None for v in parse(patterns.captions_for(kind, next(_all_attributes(kind)))[0]
                                        .replace("red", "teal").replace("blue", "teal")).values())


@pytest.mark.parametrize("kind", [*patterns.KINDS, "synthetic"])
def test_kind_told_from_the_prompts(kind):
    if kind == "synthetic":
        from data_modules.synthetic import caption_corpus
        corpus = caption_corpus()
    else:
        corpus = patterns.caption_corpus(kind)
    assert kind_for(random.Random(0).sample(corpus, 20)).name == kind
    assert kind_for(["a photo of a dog"]) is None


def _members(root) -> dict[str, bytes]:
    out = {}
    for shard in sorted(root.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[f"{shard.parent.name}/{m.name}"] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_generator_repeats_given_its_seed(kind, tmp_path):
    a = patterns.make_patterns(kind, tmp_path / "a", n=30, seed=4)
    b = patterns.make_patterns(kind, tmp_path / "b", n=30, seed=4)
    patterns.make_patterns(kind, tmp_path / "c", n=30, seed=5)
    assert a["splits"] == b["splits"] and {s: v["samples"] for s, v in a["splits"].items()} == {
        "train": 24, "val": 3, "test": 3}
    ma, mb, mc = _members(tmp_path / "a"), _members(tmp_path / "b"), _members(tmp_path / "c")
    assert ma == mb and len(ma) >= 60
    assert ma != mc
    assert manifest_kind(tmp_path / "a") == kind
    # every sample's captions are its kind's, naming its recorded attributes
    for key, data in ma.items():
        if key.endswith(".json"):
            rec = json.loads(data)
            assert [KINDS[kind].parse_caption(c) for c in rec["captions"]] == [rec["attributes"]] * 5


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_tiny_vae_keeps_what_the_reader_reads(kind):
    """The tiny VAE's reconstructions (8x8 latent grid) read back as drawn: the sets are within what the
    recipe's text-to-image can draw."""
    rng = random.Random(5)
    attrs, pics = [], []
    for _ in range(32):
        a = patterns.sample_attributes(kind, rng)
        attrs.append(_truth(kind, a))
        pics.append(torch.from_numpy(np.array(patterns.draw(kind, a, SIZE, rng))).permute(2, 0, 1) / 255.0)
    rec = _reconstruct(tiny_autoencoder(0), torch.stack(pics))
    acc = attribute_accuracy([KINDS[kind].read_picture(r) for r in rec], attrs, KINDS[kind].attributes)
    for attr in KINDS[kind].attributes:
        assert acc[attr] >= 0.9, (attr, acc)


@pytest.mark.parametrize("kind", patterns.KINDS)
def test_eval_readings_score_right_and_wrong_pictures(kind):
    """t2i_eval's readings (easygen/stages/evaluate.py::attribute_readings): the pictures the prompts
    describe score 1 on every attribute; the same pictures against shifted prompts score below 1."""
    rng = random.Random(8)
    attrs = [patterns.sample_attributes(kind, rng) for _ in range(12)]
    prompts = [patterns.captions_for(kind, a)[0] for a in attrs]
    images = [patterns.draw(kind, a, SIZE, rng) for a in attrs]
    readings = attribute_readings(prompts, images)
    attributes = KINDS[kind].attributes
    assert None not in readings
    acc = attribute_accuracy([r for r, _ in readings], [t for _, t in readings], attributes)
    assert all(acc[a] == 1.0 for a in attributes), acc
    shifted = attribute_readings(prompts[1:] + prompts[:1], images)
    acc = attribute_accuracy([r for r, _ in shifted], [t for _, t in shifted], attributes)
    assert min(acc[a] for a in attributes) < 1.0, acc
    # a prompt that is not one of the kind's captions is not read back (None), the others are
    mixed = attribute_readings([*prompts[:2], "a photo of a dog"], images[:3], KINDS[kind])
    assert mixed[2] is None and mixed[:2] == readings[:2]


@pytest.mark.slow
@pytest.mark.parametrize("kind", patterns.KINDS)
def test_eval_stage_reports_the_attributes_of_each_kind(kind, tmp_path, run_env):
    """stage=eval task=t2i on a tiny set of each kind (random tiny models): results.json has
    test/t2i_attr/<attr> and <attr>_chance for every attribute of the kind, as recomputed here from the
    saved pictures and their prompts."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    patterns.make_patterns(kind, tmp_path / "data", n=30, seed=0)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "run.py", "stage=eval", "task=t2i", "data=captions",
                        f"data.root={tmp_path}/data", "model.bidiffuser.sampler.steps=2", "logger=none",
                        "data.eval_batch_size=4", "model.bidiffuser.weights=null", "model.llm.weights=null",
                        f"paths.data_dir={tmp_path}/cache", f"hydra.run.dir={out}"],
                       cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    res = json.loads((out / "results.json").read_text())
    rows = json.loads((out / "predictions.json").read_text())
    assert res["t2i_kind"] == kind and len(rows) == 3 and res["metrics"]["test/t2i_attr_prompts"] == 3.0
    images = [Image.open(out / row["file"]).convert("RGB") for row in rows]
    expected = attribute_accuracy([KINDS[kind].read_picture(im) for im in images],
                                  [KINDS[kind].parse_caption(row["prompt"]) for row in rows], KINDS[kind].attributes)
    got = {k.removeprefix("test/t2i_attr/"): v for k, v in res["metrics"].items() if k.startswith("test/t2i_attr/")}
    assert got == pytest.approx(expected) and set(KINDS[kind].attributes) < set(got)
