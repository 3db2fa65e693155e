"""The benchmarks the paper reports (its tables of captioning, VQA and text-to-image results), each with
its data location, official metric, submission file and the paper's figure: what `stage=eval
task=<name>` and `task=all` run (easygen/stages/evaluate.py).

A benchmark's set is written by `python -m data_modules.convert <converter> ...` to
`stage.benchmarks.<name>.root`; its `split` names the folder of shards it is scored on. Scores are
fractions in [0, 1] (CIDEr in pycocoevalcap's units); the table prints them x100, as the paper does."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from easygen.metrics import (
    caption_scores,
    circular_scores,
    extract_choice,
    gqa_normalize,
    gqa_scores,
    nocaps_scores,
    spice_models_available,
    textvqa_scores,
    vqa_scores,
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # as the paper's table names it
    metric: str  # the headline key of the scores
    paper: float | None  # the paper's figure (x100 units), None where it reports none
    converter: str  # the command that writes the set
    submission: str  # the predictions file, in the benchmark's submission format
    rows: Callable[[dict[str, str], dict[str, dict]], list]  # predictions -> the submission's rows
    score: Callable[[dict[str, str], dict[str, dict], dict], dict] | None  # None: no annotations to score


def _int_id(i: str) -> int | str:
    return int(i) if i.isdigit() else i


def _sorted(rows: list[dict], key: str) -> list[dict]:
    return sorted(rows, key=lambda r: (isinstance(r[key], str), r[key]))


def caption_rows(preds: dict[str, str], _records=None) -> list[dict]:
    """COCO / NoCaps results format ``[{"image_id", "caption"}]``."""
    return _sorted([{"image_id": _int_id(i), "caption": p} for i, p in preds.items()], "image_id")


def answer_rows(preds: dict[str, str], _records=None) -> list[dict]:
    """VQAv2 / OK-VQA / TextVQA (EvalAI) results format ``[{"question_id", "answer"}]``."""
    return _sorted([{"question_id": _int_id(i), "answer": p} for i, p in preds.items()], "question_id")


def gqa_rows(preds: dict[str, str], _records=None) -> list[dict]:
    """GQA's predictions file ``[{"questionId", "prediction"}]`` (string ids, normalised answers)."""
    return sorted(({"questionId": i, "prediction": gqa_normalize(p)} for i, p in preds.items()),
                  key=lambda r: r["questionId"])  # fmt: skip


def mmbench_rows(preds: dict[str, str], records: dict[str, dict]) -> list[dict]:
    """One row per pass: the question's index, the rotation, its options, the right letter, the
    model's answer and the letter extracted from it."""
    rows = []
    for i, p in preds.items():
        r = records[i]
        rows.append({"index": r["question_index"], "rotation": r["rotation"], **r["options"],
                     "answer": r["answer"], "prediction": p, "extracted": extract_choice(p, r["options"]),
                     "category": r.get("category"), "l2-category": r.get("l2-category")})  # fmt: skip
    return sorted(rows, key=lambda r: (_int_id(str(r["index"])).__class__ is str, _int_id(str(r["index"])),
                                       r["rotation"]))  # fmt: skip


def _references(records: dict[str, dict]) -> dict[str, list[str]]:
    return {i: r.get("captions") or [] for i, r in records.items()}


def _answers(records: dict[str, dict]) -> dict[str, list[str]]:
    return {i: [a["answer"] if isinstance(a, dict) else a for a in r.get("answers") or []] for i, r in records.items()}


def _spice(opts: dict) -> bool:
    """`stage.spice`: true, false, or auto (SPICE when Stanford CoreNLP 3.6.0's jars are on disk)."""
    spice = opts.get("spice", "auto")
    return spice_models_available() if spice == "auto" else bool(spice)


def score_coco_caption(preds, records, opts) -> dict:
    return caption_scores(preds, _references(records), spice=_spice(opts))


def score_nocaps(preds, records, opts) -> dict | None:
    refs = _references(records)
    if not any(refs.values()):
        return None  # the test split: the server scores the submission file
    domains = {i: r.get("domain") for i, r in records.items()}
    return nocaps_scores(preds, refs, domains, spice=_spice(opts))


def score_vqa(preds, records, _opts) -> dict:
    types = {i: r["answer_type"] for i, r in records.items() if r.get("answer_type")}
    return vqa_scores(preds, _answers(records), types or None)


def score_textvqa(preds, records, _opts) -> dict:
    return textvqa_scores(preds, _answers(records))


def score_gqa(preds, records, _opts) -> dict:
    questions = {i: {"answer": (_answers(records)[i] or [None])[0], "isBalanced": r.get("isBalanced", True),
                     "types": r.get("types") or {}} for i, r in records.items()}  # fmt: skip
    return gqa_scores({i: gqa_normalize(p) for i, p in preds.items()}, questions)


def score_mmbench(preds, records, _opts) -> dict:
    missing = [i for i in records if i not in preds]
    if missing:
        raise ValueError(f"mmbench: {len(missing)} pass(es) without a prediction: {missing[:20]!r}")
    passes: dict[str, list] = {}
    cats: dict[str, dict] = {}
    for i in sorted(records, key=lambda i: records[i]["rotation"]):
        r = records[i]
        passes.setdefault(r["question_index"], []).append((preds[i], r["options"], r["answer"]))
        cats[r["question_index"]] = {"category": r.get("category"), "l2-category": r.get("l2-category")}
    return circular_scores(passes, cats)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("coco_caption", "COCO Karpathy test (CIDEr)", "CIDEr", 145.7,
                  "python -m data_modules.convert coco-karpathy", "predictions.json", caption_rows,
                  score_coco_caption),
        Benchmark("nocaps", "NoCaps val (CIDEr)", "CIDEr", 121.8, "python -m data_modules.convert nocaps",
                  "nocaps_predictions.json", caption_rows, score_nocaps),
        Benchmark("vqav2_testdev", "VQAv2 test-dev", "accuracy", 80.5,
                  "python -m data_modules.convert vqav2 (the test-dev questions)", "vqav2_testdev_submission.json",
                  answer_rows, None),
        Benchmark("okvqa", "OK-VQA", "accuracy", 45.2, "python -m data_modules.convert okvqa",
                  "okvqa_predictions.json", answer_rows, score_vqa),
        Benchmark("gqa", "GQA test-dev balanced", "accuracy", 44.6, "python -m data_modules.convert gqa",
                  "testdev_balanced_predictions.json", gqa_rows, score_gqa),
        Benchmark("textvqa", "TextVQA val", "accuracy", 61.5, "python -m data_modules.convert textvqa",
                  "textvqa_predictions.json", answer_rows, score_textvqa),
        Benchmark("mmbench", "MMBench dev (circular)", "accuracy", None, "python -m data_modules.convert mmbench",
                  "mmbench_predictions.json", mmbench_rows, score_mmbench),
    )
}  # fmt: skip

# the paper's text-to-image figure (MS-COCO 256x256, FID; lower is better)
COCO_FID_PAPER = 7.68
# the order of `task=all`'s table: the paper's captioning, VQA, then text-to-image results
ALL_TASKS = ("coco_caption", "nocaps", "vqav2_testdev", "okvqa", "gqa", "textvqa", "mmbench", "coco_fid")


def shard_records(shards: list[str]) -> dict[str, dict]:
    """Every sample's json record in the shard files by its id (the images are not decoded)."""
    out: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[str(meta["id"])] = meta
    return out


def check_complete(name: str, preds: dict[str, str], records: dict[str, dict]) -> None:
    """Every record has a prediction (a submission missing answers is rejected by the servers)."""
    missing = [i for i in records if i not in preds]
    if missing:
        raise ValueError(f"{name}: {len(missing)} of {len(records)} questions have no prediction: {missing[:10]!r}")
