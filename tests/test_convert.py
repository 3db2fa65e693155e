"""Converters on small files in the exact public formats, with broken records, and the synthetic set."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules.convert import convert, main
from data_modules.shards import read_manifest
from data_modules.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    caption_corpus,
    make_synthetic,
)


def _image_bytes(fmt: str, size=(40, 30), colour=(200, 50, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _read_shards(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _skipped_reasons(manifest: dict) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in manifest["skipped"]}


@pytest.fixture
def coco_karpathy(tmp_path: Path):
    images = tmp_path / "coco"
    jpg = _write(images / "val2014" / "COCO_val2014_000000000042.jpg", _image_bytes("JPEG"))
    _write(images / "train2014" / "COCO_train2014_000000000007.jpg", _image_bytes("JPEG", colour=(1, 2, 3)))
    _write(images / "train2014" / "COCO_train2014_000000000008.png", _image_bytes("PNG"))
    truncated = _image_bytes("JPEG", size=(64, 64))
    _write(images / "train2014" / "COCO_train2014_000000000009.jpg", truncated[: len(truncated) // 2])

    def image(cocoid, filepath, filename, split, sentences):
        return {
            "filepath": filepath,
            "filename": filename,
            "cocoid": cocoid,
            "imgid": cocoid,
            "split": split,
            "sentids": list(range(len(sentences))),
            "sentences": [
                {"raw": s, "tokens": s.lower().split(), "imgid": cocoid, "sentid": i}
                for i, s in enumerate(sentences)
            ],
        }

    data = {
        "dataset": "coco",
        "images": [
            image(
                42,
                "val2014",
                "COCO_val2014_000000000042.jpg",
                "test",
                ["A cat.", "A cat on a mat.", "Cat sitting."],
            ),
            image(7, "train2014", "COCO_train2014_000000000007.jpg", "restval", ["A dog runs.", "Dog."]),
            image(8, "train2014", "COCO_train2014_000000000008.png", "train", ["A red square."]),
            image(9, "train2014", "COCO_train2014_000000000009.jpg", "train", ["Truncated."]),
            image(10, "train2014", "COCO_train2014_000000000010.jpg", "train", ["Missing file."]),
            image(11, "val2014", "COCO_val2014_000000000042.jpg", "val", ["ok", "   "]),
        ],
    }
    source = tmp_path / "dataset_coco.json"
    source.write_text(json.dumps(data))
    return source, images, jpg


@pytest.mark.parametrize("workers", [1, 2])
def test_coco_karpathy(tmp_path: Path, coco_karpathy, workers: int):
    source, images, jpg = coco_karpathy
    out = tmp_path / f"out{workers}"
    manifest = convert(
        "coco-karpathy", input=source, images=images, out=out, shard_size=1, workers=workers, progress=False
    )

    assert manifest["splits"]["train"]["samples"] == 2  # restval joins train; two broken records dropped
    assert manifest["splits"]["test"]["samples"] == 1
    assert "val" not in manifest["splits"]  # its only record has an empty caption
    assert manifest["splits"]["train"]["shards"] == {"train/shard-000000.tar": 1, "train/shard-000001.tar": 1}
    assert read_manifest(out) == manifest
    reasons = _skipped_reasons(manifest)
    assert set(reasons) == {"coco_9", "coco_10", "coco_11"}
    assert "unreadable image" in reasons["coco_9"] and "missing image" in reasons["coco_10"]
    assert "empty caption at index 1" in reasons["coco_11"]

    test = _read_shards(out, "test")
    assert list(test) == ["coco_42"]
    assert test["coco_42"]["jpg"] == jpg.read_bytes()  # copied byte for byte
    meta = json.loads(test["coco_42"]["json"])
    assert meta["kind"] == "caption" and meta["id"] == "42" and meta["split"] == "test"
    assert meta["captions"] == ["A cat.", "A cat on a mat.", "Cat sitting."]
    train = _read_shards(out, "train")
    assert set(train) == {"coco_7", "coco_8"}
    assert set(train["coco_8"]) == {"png", "json"}
    assert not list(out.rglob("*.tmp"))


def test_resize_reencodes_only_large_images(tmp_path: Path):
    _write(tmp_path / "img" / "big.jpg", _image_bytes("JPEG", size=(120, 80)))
    small = _write(tmp_path / "img" / "small.png", _image_bytes("PNG", size=(20, 30)))
    _write(tmp_path / "img" / "pic.bmp", _image_bytes("BMP", size=(20, 20)))
    lines = [
        {"image": "big.jpg", "captions": ["big"]},
        {"image": str(small), "captions": ["small"], "split": "val"},  # absolute path
        {"image": "pic.bmp", "captions": ["bitmap"]},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    manifest = convert(
        "captions",
        input=tmp_path / "c.jsonl",
        images=tmp_path / "img",
        out=tmp_path / "out",
        resize=40,
        progress=False,
    )
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["val"]["samples"] == 1
    train = _read_shards(tmp_path / "out", "train")
    assert Image.open(io.BytesIO(train["big"]["jpg"])).size == (60, 40)
    assert Image.open(io.BytesIO(train["pic"]["jpg"])).format == "JPEG"  # BMP re-encoded
    assert _read_shards(tmp_path / "out", "val")["small"]["png"] == small.read_bytes()


def test_llava(tmp_path: Path):
    images = tmp_path / "coco"
    _write(images / "train2017" / "000000033471.jpg", _image_bytes("JPEG"))
    good = [
        {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ]
    data = [
        {"id": "000000033471", "image": "train2017/000000033471.jpg", "conversations": good},
        # The same image id again (LLaVA has several conversation types per image): unique key.
        {"id": "000000033471", "image": "train2017/000000033471.jpg", "conversations": good[:2]},
        {
            "id": "text.only",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
        {"id": "bad_order", "image": "train2017/000000033471.jpg", "conversations": [good[1], good[0]]},
        {"id": "odd", "image": "train2017/000000033471.jpg", "conversations": good[:3]},
        {"id": "no_marker", "image": "train2017/000000033471.jpg", "conversations": good[2:]},
        {"id": "no_image_file", "image": "train2017/missing.jpg", "conversations": good[:2]},
    ]
    source = tmp_path / "llava_instruct_80k.json"
    source.write_text(json.dumps(data))
    manifest = convert("llava", input=source, images=images, out=tmp_path / "out", progress=False)

    assert manifest["splits"]["train"]["samples"] == 3
    reasons = _skipped_reasons(manifest)
    assert set(reasons) == {"llava_bad_order", "llava_odd", "llava_no_marker", "llava_no_image_file"}
    assert all(
        "malformed conversation" in reasons[k] for k in ("llava_bad_order", "llava_odd", "llava_no_marker")
    )
    samples = _read_shards(tmp_path / "out", "train")
    assert set(samples) == {"llava_000000033471", "llava_000000033471_1", "llava_text_only"}
    assert all("." not in key for key in samples)
    assert set(samples["llava_text_only"]) == {"json"}
    meta = json.loads(samples["llava_000000033471"]["json"])
    assert (
        meta["kind"] == "conversation"
        and meta["conversations"] == good
        and meta["source_id"] == "000000033471"
    )
    assert "<image>" in meta["conversations"][0]["value"]


def test_vqav2(tmp_path: Path):
    images = tmp_path / "val2014"
    _write(images / "COCO_val2014_000000000042.jpg", _image_bytes("JPEG"))
    _write(images / "000000000043.jpg", _image_bytes("JPEG"))  # plain COCO 2017-style name
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {},
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "What color is the cat?", "question_id": 42000},
            {"image_id": 43, "question": "How many dogs?", "question_id": 43000},
            {"image_id": 44, "question": "Where is it?", "question_id": 44000},
            {"image_id": 42, "question": "Is it day?", "question_id": 42001},
        ],
    }
    answers = ["black"] * 7 + ["dark", "black and white", "gray"]

    def annotation(qid, image_id, answers):
        return {
            "question_id": qid,
            "image_id": image_id,
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": answers[0],
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
        }

    annotations = {
        "info": {},
        "data_subtype": "val2014",
        "annotations": [
            annotation(42000, 42, answers),
            annotation(43000, 43, [str(i) for i in range(10)]),
            annotation(44000, 44, answers),
            annotation(42001, 42, ["yes"] * 9),  # nine answers: malformed
        ],
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "out"
    manifest = main(
        [
            "vqav2",
            "--input",
            str(tmp_path / "q.json"),
            "--annotations",
            str(tmp_path / "a.json"),
            "--images",
            str(images),
            "--out",
            str(out),
        ]
    )

    assert manifest["splits"]["val"]["samples"] == 2
    reasons = _skipped_reasons(manifest)
    assert set(reasons) == {"vqa_44000", "vqa_42001"}
    assert "missing image" in reasons["vqa_44000"] and "10 string answers" in reasons["vqa_42001"]
    samples = _read_shards(out, "val")
    meta = json.loads(samples["vqa_42000"]["json"])
    assert meta["answers"] == answers and meta["question"] == "What color is the cat?"
    assert (meta["kind"], meta["question_id"], meta["image_id"], meta["id"]) == ("vqa", 42000, 42, "42000")
    assert json.loads(samples["vqa_43000"]["json"])["answers"] == [str(i) for i in range(10)]


def test_captions_jsonl_bad_lines(tmp_path: Path):
    _write(tmp_path / "img" / "a.b.jpg", _image_bytes("JPEG"))
    lines = [
        json.dumps({"image": "a.b.jpg", "captions": ["one", "two"], "split": "test"}),
        "{not json",
        json.dumps({"image": "a.b.jpg", "captions": []}),
        json.dumps({"captions": ["no image"]}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    manifest = convert(
        "captions", input=tmp_path / "c.jsonl", images=tmp_path / "img", out=tmp_path / "out", progress=False
    )
    assert manifest["samples"] == 1 and len(manifest["skipped"]) == 3
    assert [s["record"] for s in manifest["skipped"]] == [1, 2, 3]
    assert list(_read_shards(tmp_path / "out", "test")) == ["a_b"]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        convert("captions", input=tmp_path / "nope.jsonl", out=tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        convert("coco", input=tmp_path / "c.jsonl", out=tmp_path / "o3")


# --------------------------------------------------------------------------------------------------
# synthetic set


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _analyse(image: np.ndarray) -> dict[str, str]:
    """Recover the attributes from the pixels alone."""
    size = image.shape[0]
    corner = tuple(int(v) for v in image[0, 0])
    background = next(name for name, rgb in BACKGROUNDS.items() if rgb == corner)
    mask = np.any(image != np.array(corner), axis=-1)
    ys, xs = np.nonzero(mask)
    colours = {name: np.sum(np.all(image[mask] == np.array(rgb), axis=-1)) for name, rgb in COLOURS.items()}
    colour = max(colours, key=colours.get)
    cx, cy = xs.mean() / size, ys.mean() / size
    position = min(
        {
            "left": (0.25, 0.5),
            "right": (0.75, 0.5),
            "top": (0.5, 0.25),
            "bottom": (0.5, 0.75),
            "center": (0.5, 0.5),
        }.items(),
        key=lambda item: (item[1][0] - cx) ** 2 + (item[1][1] - cy) ** 2,
    )[0]
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    extent = max(x1 - x0, y1 - y0) + 1
    size_name = "large" if extent > 0.4 * size else "small"
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    fill = box.mean()
    if fill > 0.93:
        shape = "square"
    elif fill > 0.7:
        shape = "circle"
    elif box[-1, 0] and box[-1, -1]:
        shape = "triangle"  # both bottom corners filled
    else:
        shape = "cross"
    return {
        "shape": shape,
        "colour": colour,
        "background": background,
        "size": size_name,
        "position": position,
    }


def test_synthetic_deterministic_and_captions_match_pixels(tmp_path: Path):
    manifest = make_synthetic(tmp_path / "a", n=60, seed=3, shard_size=16)
    make_synthetic(tmp_path / "b", n=60, seed=3, shard_size=16)
    make_synthetic(tmp_path / "c", n=60, seed=4, shard_size=16)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")

    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 48, "val": 6, "test": 6}
    assert manifest["skipped"] == []
    corpus = set(caption_corpus())
    seen_shapes = set()
    for split in ("train", "val", "test"):
        samples = _read_shards(tmp_path / "a", split)
        assert len(samples) == manifest["splits"][split]["samples"]
        for sample in samples.values():
            meta = json.loads(sample["json"])
            assert meta["split"] == split and len(meta["captions"]) == 5 and len(set(meta["captions"])) == 5
            pixels = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            assert pixels.shape == (64, 64, 3)
            found = _analyse(pixels)
            assert found == meta["attributes"], meta["id"]
            for caption in meta["captions"]:
                assert caption in corpus
                words = caption.replace(",", "").split()
                assert found["shape"] in words and found["colour"] in words and found["size"] in words
                assert found["background"] in words and POSITION_PHRASES[found["position"]] in caption
            seen_shapes.add(found["shape"])
    assert seen_shapes == set(SHAPES)
    assert len(corpus) == 5 * len(SHAPES) * len(COLOURS) * len(BACKGROUNDS) * len(SIZES) * len(
        POSITION_PHRASES
    )


def test_synthetic_default_split_sizes(tmp_path: Path):
    from data_modules.synthetic import split_counts

    assert split_counts(640) == {"train": 512, "val": 64, "test": 64}


# --------------------------------------------------------------------------------------------------
# the command line on what users get wrong: one line (no traceback), reasons printed, exit status


def _cli(*args: str):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "data_modules.convert", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help_shows_record_formats_and_cites_no_local_document():
    r = _cli("--help")
    assert r.returncode == 0
    assert "SPEC" not in r.stdout
    assert "usage: python -m data_modules.convert" in r.stdout
    # an example record of each format
    assert '{"image": "cat.jpg", "captions": ["a cat on a mat"' in r.stdout
    assert '"conversations": [{"from": "human"' in r.stdout
    assert '"question_id": 42000' in r.stdout and '"sentences": [{"raw":' in r.stdout


def test_cli_caption_instead_of_captions_prints_reasons_and_fails(tmp_path: Path):
    for name in "abcdef":
        _write(tmp_path / "img" / f"{name}.jpg", _image_bytes("JPEG"))
    lines = [json.dumps({"image": f"{n}.jpg", "caption": "a red thing"}) for n in "abcdef"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    r = _cli(
        "captions",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--images",
        str(tmp_path / "img"),
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "6 x no 'captions' field (found 'caption' instead)" in r.stdout
    assert (
        "line 1: no 'captions' field (found 'caption'; the field is 'captions', a list of strings)"
        in r.stdout
    )
    assert "line 5:" in r.stdout and "line 6:" not in r.stdout and "1 more in manifest.json" in r.stdout
    assert "error: none of the 6 records" in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["where"] for s in manifest["skipped"]] == [f"line {i}" for i in range(1, 7)]


def test_cli_mixed_reasons_counted_by_kind_and_exit_zero_when_some_written(tmp_path: Path):
    _write(tmp_path / "img" / "a.jpg", _image_bytes("JPEG"))
    lines = [
        json.dumps({"image": "a.jpg", "captions": ["fine"]}),
        json.dumps({"image": "gone1.jpg", "captions": ["x"]}),
        "",
        json.dumps({"image": "gone2.jpg", "captions": ["y"]}),
        "{oops",
        json.dumps({"image": "a.jpg", "captions": "one string"}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    r = _cli(
        "captions",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--images",
        str(tmp_path / "img"),
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote 1 samples (train 1)" in r.stdout and "skipped 4 of 5 records:" in r.stdout
    assert "  2 x missing image" in r.stdout and "  1 x not valid json" in r.stdout
    assert f"line 2: missing image {tmp_path / 'img' / 'gone1.jpg'}" in r.stdout
    assert "line 4: missing image" in r.stdout and "line 5: not valid json" in r.stdout
    assert "line 6: 'captions' must be a list of strings, found one string" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["captions", "--input", "{tmp}/nope.jsonl"], "error: input file {tmp}/nope.jsonl does not exist"),
        (
            ["captions", "--input", "{tmp}/c.jsonl", "--images", "{tmp}/noimg"],
            "error: images folder {tmp}/noimg does not exist",
        ),
        (
            ["coco-karpathy", "--input", "{tmp}/dataset_coco.json", "--images", "{tmp}/img"],
            "error: input file {tmp}/dataset_coco.json does not exist",
        ),
        (["coco-karpathy", "--input", "{tmp}/c.jsonl"], "error: format 'coco-karpathy' needs --images"),
        (
            ["llava", "--input", "{tmp}/llava.json", "--images", "{tmp}/coco"],
            "error: images folder {tmp}/coco does not exist",
        ),
        (
            ["llava", "--input", "{tmp}/c.jsonl"],
            "error: {tmp}/c.jsonl: expected a list of {{id, image, conversations}}",
        ),
        (
            ["vqav2", "--input", "{tmp}/q.json", "--images", "{tmp}/img"],
            "error: input file {tmp}/q.json does not",
        ),
        (
            ["vqav2", "--input", "{tmp}/c.jsonl", "--images", "{tmp}/img", "--annotations", "{tmp}/a.json"],
            "error: annotations file {tmp}/a.json does not exist",
        ),
    ],
)
def test_cli_missing_inputs_one_line(tmp_path: Path, capsys, args, message):
    """In-process `main()` (the module's entry point) for each case; the subprocess test below checks one."""
    _write(tmp_path / "img" / "a.jpg", _image_bytes("JPEG"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.jpg", "captions": ["x"]}) + "\n")
    (tmp_path / "llava.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        main([*[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1, err


def test_cli_missing_input_subprocess_no_traceback(tmp_path: Path):
    r = _cli(
        "vqav2", "--input", str(tmp_path / "q.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert r.returncode == 2 and r.stderr == f"error: input file {tmp_path / 'q.json'} does not exist\n"


def test_cli_empty_jsonl_fails(tmp_path: Path):
    (tmp_path / "c.jsonl").write_text("\n\n")
    r = _cli("captions", "--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and f"error: {tmp_path / 'c.jsonl'} holds no records" in r.stderr
