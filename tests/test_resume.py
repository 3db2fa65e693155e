"""Kill and resume through the real CLI: a run killed with SIGKILL mid-run resumes with
`ckpt_path=last` in the same `hydra.run.dir`, its step counter where the last checkpoint left it and
the learning-rate schedule continuing; `ckpt_path=last` only takes complete checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from easygen.errors import ConfigError
from tests.conftest import ROOT

MAX_STEPS = 12
ARGS = [
    "stage=instruct",
    "data.synthetic.n=80",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=4",
    "logger=csv",
    "callbacks.caption_eval=null",
    "stage.monitor=null",
    "trainer.log_every_n_steps=1",
    f"trainer.max_steps={MAX_STEPS}",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "optim.lr=1e-3",
    "optim.warmup_ratio=0.1",
    "trainer.enable_progress_bar=false",
]


def _saved_step(last):
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_continues_step_and_schedule(tmp_path, run_env):
    from easygen.lit.optim import cosine_with_warmup

    out = tmp_path / "run"
    args = [
        sys.executable,
        "run.py",
        *ARGS,
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
        f"hydra.run.dir={out}",
    ]
    last = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        args, cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and _saved_step(last) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _saved_step(last)
    assert 2 <= killed_at < MAX_STEPS
    assert not (out / "results.json").exists()

    r = subprocess.run(
        [*args[:-1], f"hydra.run.dir={out}", "ckpt_path=last"],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["global_step"] == MAX_STEPS
    assert res["resumed_from"].endswith("last.ckpt")
    assert f"skipping {killed_at} batches" in r.stdout + r.stderr

    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = {
        int(row["step"]): float(row["lr-AdamW/projector"]) for row in rows if row.get("lr-AdamW/projector")
    }
    losses = [int(row["step"]) for row in rows if row.get("train/loss")]
    # the resumed job logs from the checkpoint's step on, not from zero, up to the last step
    resumed_steps = [s for s in losses if s >= killed_at]
    assert resumed_steps and resumed_steps[0] == killed_at and resumed_steps[-1] == MAX_STEPS - 1
    # the learning rate after the resume is the schedule's value at that step (no restart of warmup)
    fn = cosine_with_warmup(MAX_STEPS, 0.1)
    for s in range(killed_at, MAX_STEPS):
        assert lrs[s] == pytest.approx(1e-3 * fn(s), rel=1e-6), (s, lrs[s])


def test_last_takes_only_complete_checkpoints(tmp_path):
    """A crash during the swap of a sharded save leaves `.last.ckpt.old` whole and `last.ckpt` missing or
    partial: `ckpt_path=last` takes the complete one."""
    from easygen.stages.checkpoints import resolve_ckpt

    ck = tmp_path / "checkpoints"
    old = ck / ".last.ckpt.old"
    old.mkdir(parents=True)
    torch.save({"global_step": 7}, old / "meta.pt")
    (old / ".metadata").write_bytes(b"x")
    partial = ck / "last.ckpt"
    partial.mkdir()
    (partial / ".metadata").write_bytes(b"x")  # no meta.pt: the save was cut short
    assert resolve_ckpt("last", tmp_path) == str(old)
    torch.save({"global_step": 9}, partial / "meta.pt")
    assert resolve_ckpt("last", tmp_path) == str(partial)
    with pytest.raises(ConfigError, match="no complete last.ckpt"):
        resolve_ckpt("last", tmp_path / "elsewhere")
