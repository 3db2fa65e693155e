"""`python run.py stage=eval task=coco_caption|vqa|t2i` through the real CLI on tiny data: results.json
holds the scores of exactly the predictions written to predictions.json (recomputed here from that file
and the test shards), in the official results formats.

FID is not exercised end to end: its Inception weights need torch-fidelity, which is not installed here
(`easygen.metrics.fid_score` is tested with a small feature module in tests/test_metrics.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easygen.stages.evaluate import prediction_rows
from tests.conftest import ROOT
from tests.test_metrics import tiny_clip  # noqa: F401  (fixture)

SMALL = ["data.batch_size=4", "data.eval_batch_size=8", "model.bidiffuser.sampler.steps=4", "logger=none"]
TINY = ["data.synthetic.n=80", *SMALL]


def _run(args, env, timeout=900):
    r = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


def _test_samples(pattern: str) -> list[dict]:
    import webdataset as wds

    from data_modules.shards import expand_urls

    out = []
    for url in expand_urls(pattern):
        for s in wds.WebDataset(url, shardshuffle=False):
            out.append(json.loads(s["json"]))
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, run_env_module):
    """Two alignment steps: a checkpoint and the exported trained weights to evaluate."""
    root = tmp_path_factory.mktemp("eval_stage")
    out = root / "pretrain"
    _run(["stage=pretrain", *TINY, "trainer.max_steps=2", "callbacks.caption_eval=null", "stage.monitor=train/loss",
          "stage.monitor_mode=min", f"paths.data_dir={root}/data", f"paths.log_dir={root}/logs",
          f"hydra.run.dir={out}"], run_env_module)  # fmt: skip
    return root, out


@pytest.fixture(scope="module")
def run_env_module():
    import os

    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    return env


def test_prediction_rows_official_formats():
    rows = prediction_rows("coco_caption", {"391895": "a man", "9": "a dog", "synth_1": "x"})
    assert rows == [{"image_id": 9, "caption": "a dog"}, {"image_id": 391895, "caption": "a man"},
                    {"image_id": "synth_1", "caption": "x"}]  # fmt: skip
    assert prediction_rows("vqa", {"5": "yes"}) == [{"question_id": 5, "answer": "yes"}]


@pytest.mark.slow
def test_eval_coco_caption_from_checkpoint(pretrained, run_env_module):
    from easygen.metrics import caption_scores

    root, pre = pretrained
    out = root / "eval_caption"
    _run(["stage=eval", "task=coco_caption", f"ckpt_path={pre}/checkpoints/last.ckpt", *TINY,
              f"paths.data_dir={root}/data", f"paths.log_dir={root}/logs", f"hydra.run.dir={out}"],
             run_env_module)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    # the checkpoint's weights were used: its projector's tensors at least (weight and bias of two layers)
    (load,) = [e for e in res["loaded"] if e["key"] == "init_from"]
    assert load["path"] == f"{pre}/checkpoints/last.ckpt" and load["tensors"] >= 4
    rows = json.loads((out / "predictions.json").read_text())
    samples = _test_samples(str(next((root / "data").glob("synthetic-*")) / "test" / "*.tar"))
    refs = {s["id"]: s["captions"] for s in samples}
    assert res["task"] == "coco_caption" and res["num_samples"] == len(refs) == len(rows) == 8
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in rows)
    preds = {str(r["image_id"]): r["caption"] for r in rows}
    assert set(preds) == set(refs)
    expected = caption_scores(preds, {k: refs[k] for k in sorted(refs)})
    assert res["metrics"] == {f"test/{k}": v for k, v in expected.items()}


def _write_vqa_set(folder: Path) -> tuple[Path, dict[int, list[str]]]:
    """A VQAv2-format set (questions + annotations json, COCO-named pictures) converted to shards."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    questions, annotations, answers = [], [], {}
    for k in range(6):
        image_id = 100 + k
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            images / f"COCO_val2014_{image_id:012d}.jpg"
        )
        qid = 1000 + k
        ans = ["yes"] * 6 + ["no"] * 3 + ["two"] if k % 2 else ["red"] * 2 + ["blue"] * 8
        questions.append({"question": f"question {k}?", "question_id": qid, "image_id": image_id})
        annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": ans[0],
                            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(ans)]})  # fmt: skip
        answers[qid] = ans
    (folder / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (folder / "a.json").write_text(json.dumps({"annotations": annotations}))
    out = folder / "shards"
    subprocess.run([sys.executable, "-m", "data_modules.convert", "vqav2", "--input", str(folder / "q.json"),
                    "--annotations", str(folder / "a.json"), "--images", str(images), "--out", str(out),
                    "--split", "test"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return out, answers


@pytest.mark.slow
def test_eval_vqa_from_exported_weights(pretrained, run_env_module):
    from easygen.metrics import vqa_scores

    root, pre = pretrained
    data, answers = _write_vqa_set(root / "vqa")
    out = root / "eval_vqa"
    _run(["stage=eval", "task=vqa", f"init_from={pre}/easygen/trained.safetensors", *SMALL, "data=captions",
          f"data.root={data}", "data.train=null", "data.val=null", "data.num_workers=0",
          f"paths.data_dir={root}/data", f"paths.log_dir={root}/logs", f"hydra.run.dir={out}"],
         run_env_module)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["question_id"] for r in rows] == sorted(answers)  # integer ids, VQAv2 results format
    assert all(set(r) == {"question_id", "answer"} for r in rows)
    preds = {str(r["question_id"]): r["answer"] for r in rows}
    expected = vqa_scores(preds, {str(q): a for q, a in answers.items()})
    assert res["metrics"] == {"test/accuracy": expected["accuracy"]}


@pytest.mark.slow
def test_eval_t2i_clip_score(pretrained, run_env_module, tiny_clip):  # noqa: F811
    from easygen.metrics import clip_score

    root, pre = pretrained
    out = root / "eval_t2i"
    _run(["stage=eval", "task=t2i", f"init_from={pre}/easygen/trained.safetensors", *TINY, "stage.t2i_limit=3",
          f"stage.clip_model={tiny_clip}", f"paths.data_dir={root}/data", f"paths.log_dir={root}/logs",
          f"hydra.run.dir={out}"], run_env_module)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == 3 and res["metrics"]["test/num_images"] == 3.0
    assert "test/FID" not in res["metrics"]  # stage.inception is null
    images = [Image.open(out / r["file"]).convert("RGB") for r in rows]
    expected = clip_score(images, [r["prompt"] for r in rows], tiny_clip)
    assert res["metrics"]["test/CLIPScore"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_eval_t2i_missing_weights_fail_first(pretrained, run_env_module, tmp_path):
    root, pre = pretrained
    r = subprocess.run([sys.executable, "run.py", "stage=eval", "task=t2i", *TINY,
                        f"stage.inception={tmp_path}/no_inception.pth", f"paths.data_dir={root}/data",
                        f"paths.log_dir={root}/logs", f"hydra.run.dir={tmp_path}/out"],
                       cwd=ROOT, env=run_env_module, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode != 0
    assert "stage.inception=" in r.stderr + r.stdout and "does not exist" in r.stderr + r.stdout
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").iterdir())
