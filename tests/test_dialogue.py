"""The embedded default's instruction dialogues: what data_modules/synthetic.py writes beside the captions
(draw requests answered <Img>caption</Img>, attribute questions answered with one word, held-out caption
requests), how the instruct stage mixes them in, and how `task=dialogue` scores answers."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.shards import ShardIndexDataset
from data_modules.stage_datamodule import StageDataModule
from data_modules.synthetic import (
    CAPTION_REQUESTS,
    DRAW_REQUESTS,
    QUESTIONS,
    captions_for,
    draw,
    make_synthetic,
)
from data_modules.synthetic_reader import parse_caption
from easygen.llm.templates import IGNORE_INDEX, VQA_SUFFIX

N = 40  # 32 train / 4 val / 4 test pictures


def _members(root: Path, split: str, pattern: str = "*.tar") -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob(pattern)):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, field = m.name.partition(".")
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    make_synthetic(root, n=N, seed=5, shard_size=16)
    return root


def test_dialogues_are_written_beside_the_captions_from_the_same_pictures(synthetic, tmp_path):
    again = tmp_path / "again"
    make_synthetic(again, n=N, seed=5, shard_size=16)
    for split in ("train", "val", "test"):
        assert _members(synthetic / "dialogue", split) == _members(again / "dialogue", split)  # seeded
    manifest = json.loads((synthetic / "dialogue" / "manifest.json").read_text())
    captions = {split: _members(synthetic, split) for split in ("train", "val", "test")}
    kinds_seen = Counter()
    for split in ("train", "val", "test"):
        dialogue = _members(synthetic / "dialogue", split)
        assert manifest["splits"][split]["samples"] == len(dialogue)
        for members in dialogue.values():
            meta = json.loads(members["json"])
            d = meta["dialogue"]
            picture = captions[split][d["picture"]]  # the same split's picture: none crosses the split
            truth = json.loads(picture["json"])["attributes"]
            assert d["attributes"] == truth and meta["split"] == split
            kinds_seen[split, d["type"], meta["kind"]] += 1
            if d["type"] == "draw":
                assert "png" not in members  # a request to draw has no input picture
                (request, answer) = (t["value"] for t in meta["conversations"])
                assert answer == f"<Img>{captions_for(truth)[0]}</Img>"
                assert parse_caption(request) == truth  # the request names every attribute
                assert any(request.startswith(r.split("{")[0]) for r in DRAW_REQUESTS)
            elif d["type"] == "question":
                assert members["png"] == picture["png"]
                answer = truth[d["attribute"]]
                if meta["kind"] == "vqa":
                    question = meta["question"]
                    assert meta["answers"] == [answer]
                else:
                    human, gpt = meta["conversations"]
                    assert human["value"].startswith("<image> ") and gpt["value"] == answer
                    question = human["value"].removeprefix("<image> ")
                assert question in QUESTIONS[d["attribute"]]
            else:
                assert split != "train" and members["png"] == picture["png"]
                assert meta["captions"] == captions_for(truth)
                assert meta["conversations"][0]["value"].removeprefix("<image> ") in CAPTION_REQUESTS
    # every training picture: two draw requests and one question per attribute; held out: one of each kind
    assert sum(n for (s, t, _), n in kinds_seen.items() if (s, t) == ("train", "draw")) == 2 * 32
    assert sum(n for (s, t, _), n in kinds_seen.items() if (s, t) == ("train", "question")) == 5 * 32
    assert sum(n for (s, t, _), n in kinds_seen.items() if (s, t) == ("test", "caption")) == 4
    assert kinds_seen["train", "question", "vqa"] > 0 and kinds_seen["train", "question", "conversation"] > 0
    # the caption set is what it was: the caption shards hold captions only
    assert all(json.loads(m["json"])["kind"] == "caption" for m in captions["train"].values())


def test_tiny_corpus_has_every_dialogue_phrasing():
    from easygen.factories import tiny_caption_corpus, tiny_corpus

    corpus = tiny_corpus()
    for phrasings in QUESTIONS.values():
        assert set(phrasings) <= set(corpus)
    assert set(CAPTION_REQUESTS) <= set(corpus)
    words = " ".join(corpus)
    for request in DRAW_REQUESTS:
        assert request.split("{")[0] in words
    assert not any("draw" in line.lower() for line in tiny_caption_corpus())  # BiDiffuser's text: captions


def test_collator_renders_every_dialogue_kind(synthetic):
    from easygen.factories import tiny_tokenizer
    from easygen.llm.collate import EasyGenCollator

    tok = tiny_tokenizer()
    collator = EasyGenCollator(tok, max_length=96, num_image_tokens=16)
    ds = ShardIndexDataset(str(synthetic / "dialogue" / "train" / "*.tar"), image_size=64)
    samples = [ds[i] for i in range(len(ds))]
    by_id = {s["id"]: s for s in samples}
    for s in samples:
        if s["kind"] != "conversation" or "<image>" in s["conversations"][0]["value"]:
            s["features"] = np.zeros((16, 8), dtype=np.float32)  # as stage=extract adds them
    batch = collator(samples)
    for row, sid in enumerate(batch["ids"]):
        learned = tok.decode([t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX])
        d = by_id[sid]["dialogue"]
        if d["type"] == "draw":
            assert learned.strip() == f"<Img>{captions_for(d['attributes'])[0]}</Img>{tok.eos_token}"
            assert not batch["has_image"][row]
        else:
            assert learned.strip() == f"{d['attributes'][d['attribute']]}{tok.eos_token}"
            assert batch["has_image"][row]
            prompt = tok.decode(batch["input_ids"][row][batch["labels"][row] == IGNORE_INDEX].tolist())
            assert (VQA_SUFFIX.strip() in prompt) == (by_id[sid]["kind"] == "vqa")


def test_instruct_mix_draws_from_the_extra_sources_by_weight(synthetic):
    """`extra_train` joins the weighted mix: caption, draw and question samples come in proportion to the
    weights (webdataset's real pipeline), while `train` (what the standardiser reads) stays the captions."""
    train = [{"urls": str(synthetic / "train" / "*.tar"), "weight": 1.0}]
    extra = [{"urls": str(synthetic / "dialogue" / "train" / "draw-*.tar"), "weight": 0.5},
             {"urls": str(synthetic / "dialogue" / "train" / "question-*.tar"), "weight": 1.5}]
    dm = StageDataModule(train=train, extra_train=extra, batch_size=8, num_workers=0, image_size=64,
                         shuffle_buffer=8, seed=3, load_images=False)
    assert dm.train == train and len(dm.train_sources()) == 3
    counts = Counter()
    for i, batch in enumerate(dm.train_pipeline()):
        counts.update(s.get("dialogue", {}).get("type", "caption") for s in batch)
        if i == 149:
            break
    total = sum(counts.values())
    assert total == 1200
    for kind, weight in (("caption", 1.0), ("draw", 0.5), ("question", 1.5)):
        assert abs(counts[kind] / total - weight / 3.0) < 0.05, counts
    with pytest.raises(ValueError, match="extra train source 0 .* weight 0"):
        StageDataModule(train=train, extra_train=[{**extra[0], "weight": 0}]).train_sources()


def test_extracted_spec_keeps_a_pattern_only_when_it_picks_the_source_alone(tmp_path):
    from easygen.stages.extract import extracted_spec

    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar", "draw-000000.tar"):
        (folder / name).write_bytes(b"")
    caption_urls = ["/data/train/shard-000000.tar", "/data/train/shard-000001.tar"]
    # `*.tar` would also take the dialogue's shard here: the source's shards are listed one by one
    assert extracted_spec("/data/train/*.tar", caption_urls, folder) == "::".join(
        str(folder / n) for n in ("shard-000000.tar", "shard-000001.tar"))
    assert extracted_spec("/data/train/shard-*.tar", caption_urls, folder) == str(folder / "shard-*.tar")
    assert extracted_spec("/d/dialogue/train/draw-*.tar", ["/d/dialogue/train/draw-000000.tar"], folder) == str(
        folder / "draw-*.tar")


# ------------------------------------------------------------------------------------------------------
# task=dialogue scoring, with answers chosen by hand


class _Answers:
    """The model's place in `dialogue_eval`, answering from a table: the scores must follow from it."""

    def __init__(self, answer, picture):
        self.answer, self.picture = answer, picture
        self.collated = []

    def configure_model(self):
        pass

    def eval(self):
        return self

    def modules(self):  # what `loaded_weights` walks: nothing was loaded
        return []

    def eval_collate(self, samples):
        self.collated += samples
        return samples

    def predict_captions(self, samples):
        return {"ids": [s["id"] for s in samples], "predictions": [self.answer(s) for s in samples]}

    def generate_images(self, prompts):
        return [self.picture(p) for p in prompts]


def test_dialogue_scores_follow_from_the_answers(synthetic, tmp_path):
    import random

    from omegaconf import OmegaConf

    from easygen.stages.evaluate import dialogue_eval

    def answer(s):
        d = s["dialogue"]
        if d["type"] == "draw":  # draw requests of the first two test pictures answered with a picture
            return f"<Img>{captions_for(d['attributes'])[0]}</Img>" if d["picture"] in first_two else "a circle"
        if d["type"] == "question":  # colour questions right; positions answered with a picture; others wrong
            return {"colour": d["attributes"]["colour"].upper() + ".", "position": "<Img>x</Img>"}.get(
                d["attribute"], "nothing")
        return captions_for(d["attributes"])[0]  # caption requests: the first reference

    def picture(prompt):  # the synthetic set's own drawing of what the description names, but always red
        named = parse_caption(prompt)
        named["colour"] = "red"
        return draw(named, 64, random.Random(0))

    test = json.loads((synthetic / "manifest.json").read_text())
    pictures = sorted({json.loads(m["json"])["id"] for m in _members(synthetic, "test").values()})
    assert len(pictures) == test["splits"]["test"]["samples"] == 4
    first_two = set(pictures[:2])
    module = _Answers(answer, picture)
    cfg = OmegaConf.create({"data": {"dialogue_test": str(synthetic / "dialogue" / "test" / "*.tar"),
                                     "eval_batch_size": 3},
                            "model": {"image_size": 64}, "stage": {"batch_size": None}})
    res = dialogue_eval(cfg, module, tmp_path)
    m = {k.removeprefix("test/dialogue/"): v for k, v in res["metrics"].items()}
    assert m["num_draw"] == 4 and m["num_question"] == 20 and m["num_caption"] == 4
    assert m["draw_answered"] == 0.5
    truths = [json.loads(m_["json"])["attributes"] for _, m_ in sorted(_members(synthetic, "test").items())]
    drawn = truths[:2]
    assert m["draw_colour"] == sum(t["colour"] == "red" for t in drawn) / 2
    assert m["draw_background"] == m["draw_size"] == m["draw_position"] == 1.0
    assert m["draw_described"] == 1.0
    assert m["short_answer_acc/colour"] == 1.0 and m["short_answer_acc/shape"] == 0.0
    assert m["short_answer_acc"] == pytest.approx(4 / 20)
    assert m["question_img_rate"] == pytest.approx(4 / 20)
    colours = Counter(t["colour"] for t in truths)
    assert m["short_answer_chance/colour"] == max(colours.values()) / 4
    assert m["caption_CIDEr"] > 1.0 and m["caption_img_rate"] == 0.0
    # the pictures' features come from the pixels (as the server computes them), never from the shards
    assert all(s.get("features") is None for s in module.collated)
    assert all(s["image"] is not None for s in module.collated if s["dialogue"]["type"] != "draw")
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert len(rows) == 28 and {"id", "type", "prompt", "answer"} <= set(rows[0])
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    Image.open(io.BytesIO((tmp_path / "images" / next(iter(sorted(
        p.name for p in (tmp_path / "images").glob("*.png"))))).read_bytes())).verify()


def test_a_dialogue_without_its_record_is_one_line_naming_shard_key_and_field(tmp_path):
    from easygen.stages.evaluate import read_dialogues

    shard = tmp_path / "test" / "draw-000000.tar"
    shard.parent.mkdir()
    meta = {"id": "x1", "kind": "conversation",
            "conversations": [{"from": "human", "value": "Draw a cat."}, {"from": "gpt", "value": "no"}]}
    with tarfile.open(shard, "w") as tar:
        data = json.dumps(meta).encode()
        info = tarfile.TarInfo("x1.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"draw-000000.tar: sample 'x1': field 'dialogue' must be"):
        read_dialogues(str(shard), 64)
