"""`stage=eval task=<benchmark>` and `task=all` on small files in the public formats, converted with
`python -m data_modules.convert`: every score in results.json is recomputed here from the predictions
file the run wrote and the benchmark's own source files (not the shards), with the metric functions that
tests/test_benchmark_metrics.py checks against the official rules. The model is the tiny preset with
its initial weights: its answers are what they are; the plumbing from files to scores is what is
tested. COCO FID runs with a small TorchScript feature extractor (torch-fidelity's InceptionV3 is not
installed here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_modules.convert import main as convert
from easygen.errors import ConfigError
from tests.benchmark_files import (
    write_coco_val2014,
    write_feature_extractor,
    write_gqa,
    write_mmbench,
    write_nocaps,
    write_textvqa,
    write_vqa_format,
)
from tests.conftest import compose_at

FAST = ["data.synthetic.n=80", "model.bidiffuser.sampler.steps=4", "logger=none",
        "trainer.enable_progress_bar=false", "model.max_length=256"]  # fmt: skip


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Every benchmark's source files, converted to shards under data/<benchmark>."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    d = tmp / "data"
    src = {}
    src["nocaps"] = write_nocaps(tmp / "nocaps")
    src["okvqa"] = write_vqa_format(tmp / "okvqa", answer_types=("other", "number"))
    src["vqav2_testdev"] = write_vqa_format(tmp / "testdev", subtype="test-dev2015", annotations=False)
    src["gqa"] = write_gqa(tmp / "gqa")
    src["textvqa"] = write_textvqa(tmp / "textvqa")
    src["mmbench"] = write_mmbench(tmp / "mmbench")
    src["coco"] = write_coco_val2014(tmp / "coco")
    src["inception"] = write_feature_extractor(tmp / "features.pt")
    convert(["nocaps", "--input", str(src["nocaps"][0]), "--images", str(src["nocaps"][1]), "--out", str(d / "nocaps")])
    q, a, im = src["okvqa"]
    convert(["okvqa", "--input", str(q), "--annotations", str(a), "--images", str(im), "--out", str(d / "okvqa")])
    q, _, im = src["vqav2_testdev"]
    convert(["vqav2", "--input", str(q), "--images", str(im), "--out", str(d / "vqav2_testdev")])
    convert(["gqa", "--input", str(src["gqa"][0]), "--images", str(src["gqa"][1]), "--out", str(d / "gqa")])
    convert(["textvqa", "--input", str(src["textvqa"][0]), "--images", str(src["textvqa"][1]),
             "--out", str(d / "textvqa")])  # fmt: skip
    convert(["mmbench", "--input", str(src["mmbench"]), "--out", str(d / "mmbench")])
    return tmp, d, src


def _fid_args(src, n=6, batch=2):
    coco, images = src["coco"]
    return [f"stage.coco_fid.annotations={coco}", f"stage.coco_fid.images={images}", f"stage.inception={src['inception']}",
            f"stage.n={n}", f"stage.coco_fid.fid_batch={batch}", "stage.coco_fid.resolution=32"]  # fmt: skip


def _eval(d: Path, out: Path, *args):
    from easygen.stages.run import run_stage

    return run_stage(compose_at(d, out, ["stage=eval", *FAST, *args]))


@pytest.mark.slow
def test_all_benchmarks_one_table(sets, tmp_path):
    from easygen.metrics import (
        circular_scores,
        fid_score,
        gqa_scores,
        nocaps_scores,
        rotations,
        textvqa_scores,
        vqa_scores,
    )
    from easygen.stages.coco_fid import center_crop_resize

    tmp, d, src = sets
    out = tmp_path / "all"
    res = _eval(d, out, "task=all", *_fid_args(src))
    assert not res["missing"] and not res["failed"]
    table = {r["benchmark"]: r for r in res["table"]}
    assert list(table) == ["coco_caption", "nocaps", "vqav2_testdev", "okvqa", "gqa", "textvqa", "mmbench", "coco_fid"]
    assert table["okvqa"]["paper"] == 45.2 and table["coco_fid"]["paper"] == 7.68 and table["mmbench"]["paper"] is None
    m = res["metrics"]
    written = json.loads((out / "results.json").read_text())
    assert written["table"] == res["table"] and written["metrics"] == m

    # NoCaps: CIDEr overall and per domain, from the submission file and the source json
    rows = json.loads((out / "nocaps" / "nocaps_predictions.json").read_text())
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["image_id"], int) for r in rows)
    source = json.loads(src["nocaps"][0].read_text())
    refs = {}
    for a in source["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    domains = {str(i["id"]): i["domain"] for i in source["images"]}
    expected = nocaps_scores({str(r["image_id"]): r["caption"] for r in rows}, refs, domains, spice=False)
    assert {k.removeprefix("nocaps/"): v for k, v in m.items() if k.startswith("nocaps/")} == expected
    assert table["nocaps"]["this_run"] == round(100 * expected["CIDEr"], 2)

    # OK-VQA: VQA accuracy with its per-answer-type breakdown
    rows = json.loads((out / "okvqa" / "okvqa_predictions.json").read_text())
    anns = json.loads(src["okvqa"][1].read_text())["annotations"]
    expected = vqa_scores({str(r["question_id"]): r["answer"] for r in rows},
                          {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in anns},
                          {str(a["question_id"]): a["answer_type"] for a in anns})  # fmt: skip
    assert {k.removeprefix("okvqa/"): v for k, v in m.items() if k.startswith("okvqa/")} == expected
    assert {"accuracy/other", "accuracy/number"} <= set(expected)

    # GQA: the predictions file GQA's eval.py reads, scored against the questions file
    rows = json.loads((out / "gqa" / "testdev_balanced_predictions.json").read_text())
    assert all(set(r) == {"questionId", "prediction"} for r in rows)
    questions = json.loads(src["gqa"][0].read_text())
    expected = gqa_scores({r["questionId"]: r["prediction"] for r in rows}, questions)
    assert {k.removeprefix("gqa/"): v for k, v in m.items() if k.startswith("gqa/")} == expected

    # TextVQA
    rows = json.loads((out / "textvqa" / "textvqa_predictions.json").read_text())
    data = json.loads(src["textvqa"][0].read_text())["data"]
    expected = textvqa_scores({str(r["question_id"]): r["answer"] for r in rows},
                              {str(q["question_id"]): q["answers"] for q in data})  # fmt: skip
    assert m["textvqa/accuracy"] == expected["accuracy"]

    # MMBench: every rotation of every question answered; circular accuracy against the TSV's answers
    rows = json.loads((out / "mmbench" / "mmbench_predictions.json").read_text())
    with open(src["mmbench"], newline="") as f:
        tsv = {r["index"]: r for r in csv.DictReader(f, delimiter="\t")}
    passes = {}
    for r in rows:
        q = tsv[r["index"]]
        options = [q[c] for c in "ABCD" if q[c]]
        opts, right = rotations(options, "ABCD".index(q["answer"]))[r["rotation"]]
        passes.setdefault(r["index"], []).append((r["rotation"], r["prediction"],
                                                  dict(zip("ABCD", opts)), "ABCD"[right]))  # fmt: skip
    assert {k: len(v) for k, v in passes.items()} == {"0": 4, "1": 3, "2": 4, "3": 3}
    expected = circular_scores({k: [p[1:] for p in sorted(v)] for k, v in passes.items()},
                               {k: {"category": tsv[k]["category"], "l2-category": tsv[k]["l2-category"]}
                                for k in passes})  # fmt: skip
    assert {k.removeprefix("mmbench/"): v for k, v in m.items() if k.startswith("mmbench/")} == expected

    # VQAv2 test-dev: no score; the EvalAI submission answers every question
    rows = json.loads((out / "vqav2_testdev" / "vqav2_testdev_submission.json").read_text())
    qids = [q["question_id"] for q in json.loads(src["vqav2_testdev"][0].read_text())["questions"]]
    assert sorted(r["question_id"] for r in rows) == sorted(qids) and all(isinstance(r["answer"], str) for r in rows)
    assert not any(k.startswith("vqav2_testdev/") for k in m) and "EvalAI" in table["vqav2_testdev"]["status"]

    # COCO FID: the streamed sums give the FID of all pictures at once (the 6 generated are all kept here)
    captions = json.loads((out / "coco_fid" / "coco_fid_captions.json").read_text())
    assert len(captions) == 6 and len({c["id"] for c in captions}) == 6
    coco = json.loads(src["coco"][0].read_text())
    real = []
    for r in coco["images"]:
        with Image.open(src["coco"][1] / r["file_name"]) as im:
            real.append(center_crop_resize(im, 32))
    fake = [center_crop_resize(Image.open(out / "coco_fid" / "samples" / f"{c['id']}.png"), 32) for c in captions]
    extractor = torch.jit.load(str(src["inception"]))
    assert m["coco_fid/FID"] == pytest.approx(fid_score(torch.stack(real), torch.stack(fake), extractor), rel=1e-6)


@pytest.mark.slow
def test_coco_fid_resumes_where_it_stopped(sets, tmp_path, monkeypatch):
    """A run stopped after its first batch of generated pictures, started again with the same command,
    generates only the batches left and ends with the FID of an uninterrupted run."""
    from easygen.bidiffuser.pipeline import BiDiffuser

    tmp, d, src = sets
    whole = _eval(d, tmp_path / "whole", "task=coco_fid", *_fid_args(src))["metrics"]["coco_fid/FID"]
    real_generate = BiDiffuser.generate
    calls = []

    def stops_at_second_batch(self, texts, seed=None):
        calls.append(list(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while drawing the second batch
        return real_generate(self, texts, seed=seed)

    monkeypatch.setattr(BiDiffuser, "generate", stops_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _eval(d, tmp_path / "resumed", "task=coco_fid", *_fid_args(src))
    state = torch.load(tmp_path / "resumed" / "fid_state.pt", weights_only=True)
    assert state["done"] == {"real": 5, "fake": 2}
    monkeypatch.setattr(BiDiffuser, "generate", real_generate)
    calls.clear()
    monkeypatch.setattr(BiDiffuser, "generate", lambda self, texts, seed=None: calls.append(texts) or real_generate(
        self, texts, seed=seed))
    again = _eval(d, tmp_path / "resumed", "task=coco_fid", *_fid_args(src))["metrics"]["coco_fid/FID"]
    assert len(calls) == 2 and again == pytest.approx(whole, rel=1e-9)
    with pytest.raises(ConfigError, match="holds the sums of a run with other settings"):
        _eval(d, tmp_path / "resumed", "task=coco_fid", *_fid_args(src, n=4))


def test_batched_answers_equal_one_at_a_time(tmp_path):
    """Left-padded prompt batches with the KV cache give every question the answer it gets alone (the
    image features are given, so that only the LLM's batching is compared: on-the-fly features are
    sampled per batch)."""
    from easygen.lit.easygen_module import EasyGenModule
    from easygen.stages.common import container

    cfg = compose_at(tmp_path, tmp_path / "out", ["stage=eval", *FAST])
    torch.manual_seed(0)
    module = EasyGenModule(container(cfg))
    module.configure_model()
    module.eval()
    gen = torch.Generator().manual_seed(0)
    dim = int(cfg.model.feature_dim)
    questions = ["what colour is it?", "how many?", "is there a big red square on the left of the picture?",
                 "where?", "what is drawn in the middle of this small picture?"]  # fmt: skip
    samples = [{"id": str(k), "kind": "vqa", "question": q, "answers": [] if k % 2 else ["x"],
                "features": torch.randn(int(cfg.model.num_image_tokens), dim, generator=gen)}
               for k, q in enumerate(questions)]  # fmt: skip
    batch = module.eval_collate(samples)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # prompts of different lengths: left padding
    together = module.predict_captions(batch, max_new_tokens=12)["predictions"]
    alone = [module.predict_captions(module.eval_collate([s]), max_new_tokens=12)["predictions"][0] for s in samples]
    assert together == alone and len(set(alone)) > 1
    # a question without answers (a test split) is generated for, never trained on
    with pytest.raises(ValueError, match="needs a string 'question' and a non-empty 'answers'"):
        module.train_collator([samples[1]])
    # a picture without reference captions (NoCaps test) likewise
    unlabelled = {"id": "c", "kind": "caption", "captions": [], "features": samples[0]["features"]}
    assert len(module.predict_captions(module.eval_collate([unlabelled]), max_new_tokens=4)["predictions"]) == 1
    with pytest.raises(ValueError, match="kind 'caption' needs a non-empty list"):
        module.train_collator([unlabelled])


def test_missing_set_listed_with_its_key_and_the_others_run(sets, tmp_path):
    tmp, d, _ = sets
    res = _eval(d, tmp_path / "out", "task=all", "stage.tasks=[textvqa,gqa]", "logger=wandb",
                f"stage.benchmarks.textvqa.root={tmp_path}/nowhere")  # fmt: skip
    rows = {r["benchmark"]: r for r in res["table"]}
    # the same table as a W&B table (the offline run's media file)
    (table_file,) = (tmp_path / "out").glob("wandb/offline-run-*/files/media/table/eval/benchmarks_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"][:3] == ["benchmark", "paper", "this_run"]
    assert [r[:3] for r in logged["data"]] == [[r["benchmark"], r["paper"], r["this_run"]] for r in res["table"]]
    assert rows["textvqa"]["status"] == "missing: set stage.benchmarks.textvqa.root"
    assert "python -m data_modules.convert textvqa" in res["missing"]["textvqa"]
    assert rows["gqa"]["status"] == "scored" and "gqa/accuracy" in res["metrics"]
    with pytest.raises(ConfigError, match=r"no textvqa shards in .* set stage.benchmarks.textvqa.root"):
        _eval(d, tmp_path / "one", "task=textvqa", f"stage.benchmarks.textvqa.root={tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="stage.coco_fid.annotations is not set"):
        _eval(d, tmp_path / "fid", "task=coco_fid")
