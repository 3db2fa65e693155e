"""`python run.py` end to end through the real CLI in subprocesses: the embedded default (results.json,
the W&B offline run with the logged keys) and a two-job multirun (one output dir and one W&B run each)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def _run(args, env, timeout=900):
    r = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


def _wandb_logged(run_dir, keys):
    """Which of `keys` the offline W&B run recorded (its .wandb file stores each logged key's name)."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    data = files[0].read_bytes()
    return {k for k in keys if k.encode() in data}


def test_default_run_end_to_end(tmp_path, run_env):
    out = tmp_path / "run"
    r = _run([f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs", f"hydra.run.dir={out}"], run_env)
    res = json.loads((out / "results.json").read_text())
    assert res["stage"] == "pretrain"
    assert res["choices"]["model"] == "tiny" and res["choices"]["stage"] == "pretrain"
    assert res["global_step"] == 120
    for key in ("val/CIDEr", "val/Bleu_4", "val/METEOR", "val/ROUGE_L", "train/loss"):
        assert key in res["metrics"], sorted(res["metrics"])
    assert "val/CIDEr" in res["best"]
    assert res["checkpoints"]["last"] and (out / "checkpoints").is_dir()
    wanted = {"train/loss", "val/CIDEr", "val/Bleu_4", "perf/samples_per_sec"}
    assert _wandb_logged(out, wanted) == wanted
    assert str(out) in r.stdout and "val/CIDEr" in r.stdout
    # the synthetic set was written once under paths.data_dir and is reused
    assert list((tmp_path / "data").glob("synthetic-*/manifest.json"))


def test_multirun_two_jobs(tmp_path, run_env):
    sweep = tmp_path / "sweep"
    _run(["-m", "optim.lr=1e-3,1e-4", "trainer.max_steps=4", "data.batch_size=4", "data.eval_batch_size=8",
          f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs", f"hydra.sweep.dir={sweep}",
          "callbacks.caption_eval=null", "stage.monitor=train/loss", "stage.monitor_mode=min"], run_env)
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["global_step"] for r in results] == [4, 4]
    runs = [list((sweep / str(i)).glob("wandb/offline-run-*")) for i in (0, 1)]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name != runs[1][0].name
    overrides = [(sweep / str(i) / ".hydra" / "overrides.yaml").read_text() for i in (0, 1)]
    assert "optim.lr=0.001" in overrides[0] and "optim.lr=0.0001" in overrides[1]


def test_optuna_search_maximises_cider(tmp_path, run_env):
    import yaml

    sweep = tmp_path / "opt"
    _run(["-m", "hparams_search=caption_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
          "trainer.max_steps=4", "data.synthetic.n=80", "data.batch_size=4", "data.eval_batch_size=8",
          "model.bidiffuser.sampler.steps=4", "logger=none", f"paths.data_dir={tmp_path}/data",
          f"paths.log_dir={tmp_path}/logs", f"hydra.sweep.dir={sweep}"], run_env)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "lora.r"}
    trials = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert all(t["choices"]["lora"] == "on" and t["stage"] == "instruct" for t in trials)
    # the value Optuna maximised is the trials' best val/CIDEr
    assert best["best_value"] == max(t["best"]["val/CIDEr"] for t in trials)
