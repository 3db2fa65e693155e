"""Strategies: every `strategy=` choice composes and builds (DeepSpeed without CUDA is a one-line
error); the global batch plan; and `stage=instruct strategy=fsdp trainer.devices=2` on CPU (gloo)
through the real CLI: it trains, checkpoints (sharded), resumes from a mid-run checkpoint onto the
uninterrupted curve, consolidates to one file, and follows `strategy=ddp`'s loss curve."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from easygen.errors import ConfigError
from tests.conftest import ROOT, compose_resolved

TINY = [
    "stage=instruct",
    "data.synthetic.n=80",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=4",
    "logger=csv",
    "callbacks.caption_eval=null",
    "stage.monitor=null",
    "trainer.log_every_n_steps=1",
    "trainer.max_steps=6",
    "trainer.accelerator=cpu",
    "callbacks.periodic_checkpoint.every_n_train_steps=3",
    "callbacks.periodic_checkpoint.save_top_k=-1",
]


@pytest.mark.parametrize("name", ["auto", "ddp", "fsdp", "deepspeed"])
def test_every_strategy_composes_and_builds(name):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from easygen.stages.build import instantiate

    cfg = compose_resolved([f"strategy={name}", "trainer.accelerator=cpu"])
    if name == "deepspeed" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="strategy=deepspeed needs CUDA"):
            instantiate(cfg.strategy)
        return
    s = instantiate(cfg.strategy)
    if name == "auto":
        assert s == "auto"
    elif name == "ddp":
        assert isinstance(s, DDPStrategy) and s._ddp_kwargs["find_unused_parameters"] is False
    elif name == "fsdp":
        # the process-group backend is left to Lightning (gloo on CPU: the 2-process tests run on it)
        assert isinstance(s, ModelParallelStrategy) and s._save_distributed_checkpoint
        assert s.sharding == {"param_dtype": "bfloat16", "reduce_dtype": "float32",
                              "reshard_after_forward": True, "activation_checkpointing": False}


def test_deepspeed_without_cuda_is_one_line(tmp_path, run_env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            "strategy=deepspeed",
            "logger=none",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "strategy=deepspeed" in last and "CUDA" in last


def test_batch_plan_keeps_the_global_batch():
    from easygen.stages.train import batch_plan

    cfg = compose_resolved(["data.batch_size=4", "trainer.accumulate_grad_batches=3"])
    assert batch_plan(cfg, 2) == (24, 3)
    cfg = compose_resolved(["data.batch_size=4", "global_batch_size=64"])
    assert [batch_plan(cfg, w) for w in (1, 2, 8, 16)] == [(64, 16), (64, 8), (64, 2), (64, 1)]
    with pytest.raises(ConfigError, match="global_batch_size=64"):
        batch_plan(cfg, 32)


def _losses(run):
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _run(args, env, timeout=900):
    r = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


@pytest.mark.slow
def test_fsdp_two_cpu_processes_train_resume_and_match_ddp(tmp_path, run_env):
    from easygen.stages.consolidate import load_full_checkpoint

    base = [*TINY, "trainer.devices=2", f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs"]
    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "fsdp_resumed"
    _run([*base, "strategy=fsdp", f"hydra.run.dir={fsdp}"], run_env)
    _run([*base, "strategy=ddp", f"hydra.run.dir={ddp}"], run_env)
    mid = fsdp / "checkpoints" / "periodic-step000003.ckpt"
    assert (mid / "meta.pt").is_file() and list(mid.glob("*.distcp")), "a sharded checkpoint folder"
    _run([*base, "strategy=fsdp", f"hydra.run.dir={resumed}", f"ckpt_path={mid}"], run_env)

    res = json.loads((fsdp / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_step"] == 6 and res["global_batch"] == 8
    a, b, c = _losses(fsdp), _losses(ddp), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(6))
    for s in range(6):
        assert a[s] == pytest.approx(b[s], abs=1e-4), (s, a, b)
    # the resumed run starts at step 3 and continues the uninterrupted curve (same data, same LR)
    assert sorted(c) == [3, 4, 5]
    for s in (3, 4, 5):
        assert c[s] == pytest.approx(a[s], abs=1e-5), (s, a, c)
    assert json.loads((resumed / "results.json").read_text())["global_step"] == 6

    # the consolidated sharded checkpoint holds the same trained tensors as DDP's single file
    full = load_full_checkpoint(fsdp / "checkpoints" / "last.ckpt")
    ref = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert full["global_step"] == ref["global_step"] == 6
    assert set(full["state_dict"]) == set(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(full["state_dict"][k], v, atol=1e-5, rtol=1e-4)
    assert len(full["optimizer_states"][0]["state"]) == len(ref["optimizer_states"][0]["state"])


@pytest.mark.slow
def test_bidiffuser_stage_on_two_processes_fits_clip_and_draws_samples(tmp_path, run_env):
    """`stage=bidiffuser strategy=ddp trainer.devices=2` on the tiny preset: rank 0 fits the CLIP towers and
    broadcasts them (callbacks/clip_fit.py), validation's text-to-image samples are drawn on rank 0 only
    (callbacks/t2i_samples.py; its log folder is asked on every rank, a collective) and the run ends.
    The samples are the pictures the exported weights draw."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from easygen.factories import build_bidiffuser

    out = tmp_path / "run"
    _run(["stage=bidiffuser", "strategy=ddp", "trainer.devices=2", "debug=smoke", "logger=csv",
          "model.bidiffuser.clip_fit.steps=5", f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs",
          f"hydra.run.dir={out}"], run_env, timeout=600)  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    prompts = list(cfg.callbacks.t2i_samples.prompts)
    logged = sorted((out / "csv").rglob("samples/*.png"))
    assert len(logged) == len(prompts), logged
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["bidiffuser"]["weights"] = res["artifacts"]["bidiffuser_weights"]
    drawn = build_bidiffuser({"model": model, "seed": cfg.seed}).generate(prompts)
    for path, picture in zip(logged, drawn):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(picture)), path
