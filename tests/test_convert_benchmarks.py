"""The benchmark converters (`python -m data_modules.convert nocaps|okvqa|gqa|textvqa|mmbench`) on small
files in the public formats, with broken records."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from data_modules.convert import MMBENCH_INSTRUCTION, main
from tests.benchmark_files import (
    jpeg_bytes,
    write_gqa,
    write_mmbench,
    write_nocaps,
    write_textvqa,
    write_vqa_format,
)


def _samples(root: Path, split: str) -> dict[str, dict]:
    out = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {k: {**json.loads(v["json"]), "_members": sorted(v)} for k, v in out.items()}


def test_nocaps_val_with_domains_and_test_without_captions(tmp_path):
    path, images = write_nocaps(tmp_path)
    data = json.loads(path.read_text())
    data["images"][5]["domain"] = "far-domain"  # broken record
    path.write_text(json.dumps(data))
    m = main(["nocaps", "--input", str(path), "--images", str(images), "--out", str(tmp_path / "val")])
    got = _samples(tmp_path / "val", "val")
    assert m["splits"]["val"]["samples"] == 5 and len(m["skipped"]) == 1
    assert "'domain' must be" in m["skipped"][0]["reason"]
    s = got["nocaps_1"]
    assert s["domain"] == "near-domain" and s["kind"] == "caption" and len(s["captions"]) == 10
    assert s["captions"][3] == "a picture number 1 variant 3" and s["_members"] == ["jpg", "json"]
    path, images = write_nocaps(tmp_path / "t", test=True)
    m = main(["nocaps", "--input", str(path), "--images", str(images), "--out", str(tmp_path / "test")])
    assert m["splits"]["test"]["samples"] == 6
    assert all(s["captions"] == [] for s in _samples(tmp_path / "test", "test").values())


def test_okvqa_keeps_answer_types(tmp_path):
    q, a, images = write_vqa_format(tmp_path, answer_types=("other",))
    m = main(["okvqa", "--input", str(q), "--annotations", str(a), "--images", str(images), "--out", str(tmp_path / "o")])
    got = _samples(tmp_path / "o", "val")
    assert m["splits"]["val"]["samples"] == 6 and set(got) == {f"okvqa_{1000 + k}" for k in range(6)}
    s = got["okvqa_1001"]
    assert s["answers"] == ["yes"] * 6 + ["no"] * 4 and s["answer_type"] == "other" and s["question_id"] == 1001


def test_vqav2_test_dev_questions_only(tmp_path):
    q, _, images = write_vqa_format(tmp_path, subtype="test-dev2015", annotations=False)
    m = main(["vqav2", "--input", str(q), "--images", str(images), "--out", str(tmp_path / "o")])
    got = _samples(tmp_path / "o", "test")
    assert m["splits"]["test"]["samples"] == 6 and all(s["answers"] == [] for s in got.values())


def test_gqa(tmp_path):
    path, images = write_gqa(tmp_path)
    data = json.loads(path.read_text())
    data["20000005"]["imageId"] = "missing"
    path.write_text(json.dumps(data))
    m = main(["gqa", "--input", str(path), "--images", str(images), "--out", str(tmp_path / "o")])
    got = _samples(tmp_path / "o", "testdev")
    assert m["splits"]["testdev"]["samples"] == 5 and "missing image" in m["skipped"][0]["reason"]
    s = got["gqa_20000001"]
    assert s["answers"] == ["table"] and s["types"]["structural"] == "query" and s["isBalanced"] is True
    assert s["imageId"] == "n00000" and s["question"] == "Is there a thing number 1?"


def test_textvqa(tmp_path):
    path, images = write_textvqa(tmp_path)
    data = json.loads(path.read_text())
    data["data"][2]["answers"] = data["data"][2]["answers"][:9]
    path.write_text(json.dumps(data))
    m = main(["textvqa", "--input", str(path), "--images", str(images), "--out", str(tmp_path / "o")])
    got = _samples(tmp_path / "o", "val")
    assert m["splits"]["val"]["samples"] == 5 and "10 string answers" in m["skipped"][0]["reason"]
    assert got["textvqa_34601"]["answers"] == ["Coca-Cola"] * 4 + ["coke"] * 6


def test_mmbench_one_sample_per_rotation(tmp_path):
    path = write_mmbench(tmp_path)
    with open(path, "a") as f:  # a broken row: the answer is no option letter
        f.write("\t".join(["9", "q?", "nan", "x", "y", "", "", "E", "c", "s", "l", "nan", "dev",
                           base64.b64encode(jpeg_bytes(9)).decode()]) + "\n")  # fmt: skip
    m = main(["mmbench", "--input", str(path), "--out", str(tmp_path / "o")])
    got = _samples(tmp_path / "o", "dev")
    # four options -> 4 passes (questions 0, 2), three options -> 3 passes (questions 1, 3)
    assert m["splits"]["dev"]["samples"] == 4 + 3 + 4 + 3 and len(m["skipped"]) == 1
    assert "not one of the 2 option letters" in m["skipped"][0]["reason"]
    r0, r1 = got["mmbench_0_0"], got["mmbench_0_1"]
    assert r0["options"] == {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"} and r0["answer"] == "B"
    assert r1["options"] == {"A": "a dog", "B": "a bird", "C": "a fish", "D": "a cat"} and r1["answer"] == "A"
    assert r0["conversations"][0]["value"] == (
        "<image>\nA hint.\nWhich thing is shown in picture 0?\nA. a cat\nB. a dog\nC. a bird\nD. a fish\n"
        + MMBENCH_INSTRUCTION
    )
    assert got["mmbench_1_2"]["options"] == {"A": "a bird", "B": "a cat", "C": "a dog"}
    assert got["mmbench_1_2"]["answer"] == "A"  # question 1's answer "C" ("a bird") moved two places up
    assert r0["category"] == "scene" and r0["l2-category"] == "perception" and r0["question_index"] == "0"
    assert (tmp_path / "o" / "dev").is_dir() and r0["_members"] == ["jpg", "json"]


@pytest.mark.parametrize("fmt", ["nocaps", "gqa", "textvqa", "okvqa"])
def test_benchmarks_need_images(tmp_path, capsys, fmt):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([fmt, "--input", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"format {fmt!r} needs --images" in capsys.readouterr().err
