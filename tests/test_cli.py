"""`python run.py` end to end through the real CLI in subprocesses, started from a temporary directory with
no path overrides (data/ and logs/ land under it, as they would under a user's directory): the embedded
default (results.json, the W&B offline run with the logged values), a two-job multirun (one output dir,
optimizer and W&B run each) and an Optuna search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(args, env, cwd, timeout=900):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


def _wandb_records(path):
    """The records of a .wandb file: a 7-byte header (`:W&B`, magic, version), then LevelDB's log format
    (32 KiB blocks of chunks: crc32 (4 bytes), length (2, little-endian), type (1: full, 2: first,
    3: middle, 4: last)), each record a `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _wandb_history(run_dir) -> dict[str, list]:
    """The values the offline W&B run logged as history (not its config), from its .wandb record log."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}: {files}"
    history: dict[str, list] = {}
    for record in _wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    return history


def test_default_run_end_to_end(tmp_path, run_env):
    r = _run([], {**run_env, "WANDB_SILENT": "false"}, cwd=tmp_path)  # W&B's warnings shown, as a user sees them
    runs = list((tmp_path / "logs" / "pretrain" / "runs").iterdir())
    assert len(runs) == 1
    out = runs[0]
    res = json.loads((out / "results.json").read_text())
    assert res["stage"] == "pretrain"
    assert res["choices"]["model"] == "tiny" and res["choices"]["stage"] == "pretrain"
    assert res["global_step"] == 120
    for key in ("val/CIDEr", "val/Bleu_4", "val/METEOR", "val/ROUGE_L", "train/loss"):
        assert key in res["metrics"], sorted(res["metrics"])
    assert "val/CIDEr" in res["best"]
    assert res["checkpoints"]["last"] and (out / "checkpoints").is_dir()
    history = _wandb_history(out)
    for key in ("train/loss", "val/CIDEr", "val/Bleu_4", "perf/samples_per_sec"):
        assert history.get(key), f"{key} not logged as history: {sorted(history)}"
    # the logged validation CIDEr is the one results.json reports
    assert abs(history["val/CIDEr"][-1] - res["metrics"]["val/CIDEr"]) < 1e-6
    assert str(out) in r.stdout and "val/CIDEr" in r.stdout
    # the summary puts the score beside the best constant caption's, computed on the same val split, and
    # says what to run next with this run's weights
    base = res["metrics"]["baseline/val_constant_CIDEr"]
    assert f"val/CIDEr {res['metrics']['val/CIDEr']:.4f} = " in r.stdout and f"constant caption's {base:.4f}" in r.stdout
    assert f"next: python run.py stage=instruct lora=on init_from={res['artifacts']['weights']}" in r.stdout
    # it learned: a projector aligned to the shipped tiny LLM and BiDiffuser (easygen/assets/tiny) reads the
    # pictures, at least twice the CIDEr of the best caption that ignores them
    assert res["metrics"]["val/CIDEr"] >= 2 * base, (res["metrics"]["val/CIDEr"], base)
    assert {e["key"] for e in res["loaded"]} >= {"model.llm.weights", "model.bidiffuser.weights"}
    assert "with the shipped tiny LLM and BiDiffuser (easygen/assets/tiny)" in r.stdout
    # quiet by default: none of the messages that do not apply to this run (easygen/lit/log_setup.py), and
    # the schedule's last learning rate is not printed as a result
    printed = r.stdout + r.stderr
    for noise in ("litlogger", "module(s) in eval mode", "LeafSpec", "anonymous setting"):
        assert noise not in printed, noise
    summary = r.stdout[r.stdout.index("[easygen] stage=pretrain finished"):]
    assert "lr-AdamW" not in summary  # (W&B's own run summary above it still lists what was logged)
    # the synthetic set was written once under paths.data_dir and is reused
    assert list((tmp_path / "data").glob("synthetic-*/manifest.json"))


def test_multirun_two_jobs(tmp_path, run_env):
    _run(["-m", "optim.lr=1e-3,1e-4", "trainer.max_steps=4", "data.batch_size=4", "data.eval_batch_size=8",
          "callbacks.caption_eval=null", "stage.monitor=train/loss", "stage.monitor_mode=min"], run_env, tmp_path)
    sweeps = list((tmp_path / "logs" / "pretrain" / "multiruns").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["global_step"] for r in results] == [4, 4]
    runs = [list((sweep / str(i)).glob("wandb/offline-run-*")) for i in (0, 1)]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name != runs[1][0].name
    # each job's optimizer was built with its own learning rate (the projector's group, before the schedule)
    assert [r["optimizer_lr"] for r in results] == [{"projector": 1e-3}, {"projector": 1e-4}]


def test_optuna_search_maximises_cider(tmp_path, run_env):
    import yaml

    _run(["-m", "hparams_search=caption_optuna", "hparams_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
          "trainer.max_steps=4", "data.synthetic.n=80", "data.batch_size=4", "data.eval_batch_size=8",
          "model.bidiffuser.sampler.steps=4", "logger=none"], run_env, tmp_path)
    (sweep,) = list((tmp_path / "logs" / "instruct" / "multiruns").iterdir())
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.lr", "lora.r"}
    trials = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert all(t["choices"]["lora"] == "on" and t["stage"] == "instruct" for t in trials)
    # each trial trained with the learning rate Optuna proposed for it
    proposed = [yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in (0, 1)]
    for trial, overrides in zip(trials, proposed):
        lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=", 1)[1])
        assert abs(trial["optimizer_lr"]["decay"] - lr) < 1e-12  # the LoRA matrices' group
    # the value Optuna maximised is the trials' best val/CIDEr
    assert best["best_value"] == max(t["best"]["val/CIDEr"] for t in trials)


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep(tmp_path, run_env):
    """`hydra/launcher=submitit_local`: the SLURM launcher's local executor runs each job in its own process
    (as SLURM would), and the jobs find the same data/ and logs/ under the directory the command started in."""
    _run(["-m", "hydra/launcher=submitit_local", "optim.lr=1e-3,1e-4", "debug=smoke", "logger=csv"], run_env,
         tmp_path)
    (sweep,) = list((tmp_path / "logs" / "pretrain" / "multiruns").iterdir())
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["optimizer_lr"] for r in results] == [{"projector": 1e-3}, {"projector": 1e-4}]
    assert list((sweep / ".submitit").glob("*/*_submitted.pkl")), "the jobs did not go through submitit"


@pytest.mark.slow
def test_bidiffuser_stage_logs_its_pictures_to_wandb(tmp_path, run_env):
    """`python run.py stage=bidiffuser` with the default (offline W&B) logger: the text-to-image samples of its
    validation are in the W&B run as `t2i/samples`, with their prompts, and are the pictures the stage's
    exported weights draw for those prompts (the pipeline eval, chat and serve build)."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from easygen.factories import build_bidiffuser

    _run(["stage=bidiffuser", "debug=smoke", "stage.val_every=4", "model.bidiffuser.clip_fit.steps=5"],
         run_env, cwd=tmp_path)  # fmt: skip
    runs = list((tmp_path / "logs" / "bidiffuser" / "runs").iterdir())
    assert len(runs) == 1
    out = runs[0]
    history = _wandb_history(out)  # an image list is logged as nested keys: t2i/samples/<field>
    assert history.get("t2i/samples/filenames"), sorted(history)
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    prompts = list(cfg.callbacks.t2i_samples.prompts)
    assert history["t2i/samples/captions"][-1] == prompts
    (media,) = out.glob("wandb/offline-run-*/files")
    files = [media / name for name in history["t2i/samples/filenames"][-1]]
    assert len(files) == len(prompts)
    res = json.loads((out / "results.json").read_text())
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["bidiffuser"]["weights"] = res["artifacts"]["bidiffuser_weights"]
    drawn = build_bidiffuser({"model": model, "seed": cfg.seed}).generate(prompts)
    for path, picture in zip(files, drawn):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(picture)), path
