"""What a run prints: every log record once (Lightning's own console handler removed under Hydra's), a
progress bar counting optimizer steps where the run is bounded by `trainer.max_steps` (no `Epoch 3/-2`),
and evaluation loops named by what they do."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tests.conftest import ROOT, compose

LOG_ONCE = """
import logging.config, sys
from omegaconf import OmegaConf
from tests.conftest import compose, compose_resolved
cfg = compose(["hydra.job.name=t"], return_hydra_config=True)
jl = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
jl["handlers"]["file"]["filename"] = sys.argv[1]  # Hydra resolves it to the run folder
logging.config.dictConfig(jl)  # what Hydra does before the task function runs
from easygen.stages.run import run_stage
try:  # the runner's set-up, then a config error (no stage runs)
    run_stage(compose_resolved(["optim.lr=-1"]))
except Exception as e:
    print("stopped:", type(e).__name__)
import lightning.pytorch as pl
pl.seed_everything(1234)
logging.getLogger("easygen").info("an easygen record")
"""


def test_each_record_is_printed_once_under_hydras_logging(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", LOG_ONCE, str(tmp_path / "run.log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout + r.stderr
    assert "stopped: ConfigError" in printed, printed
    assert printed.count("Seed set to 1234") == 1, printed
    assert printed.count("an easygen record") == 1, printed
    logged = (tmp_path / "run.log").read_text()  # Hydra's file handler still gets every record
    assert logged.count("Seed set to 1234") == 1 and logged.count("an easygen record") == 1


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch.float()[:, None]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.arange(4), batch_size=2)  # 2 batches an epoch

    def val_dataloader(self):
        return DataLoader(torch.arange(4), batch_size=2)


def _runner_callbacks():
    from easygen.stages.build import callbacks

    cfg = compose(["callbacks=none", "logger=none"])
    callbacks = callbacks(cfg, has_logger=False)
    assert [type(c).__name__ for c in callbacks] == ["StepProgressBar"]
    return callbacks


def _trainer(tmp_path, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=_runner_callbacks(),
        **kw,
    )


def test_step_bounded_training_shows_steps_not_epochs(tmp_path, capsys):
    trainer = _trainer(tmp_path, max_steps=5, max_epochs=-1, limit_val_batches=0)
    trainer.fit(_Tiny())
    assert trainer.global_step == 5 and trainer.current_epoch >= 2  # the run crossed epoch boundaries
    err = "".join(capsys.readouterr())  # Lightning's bars write to stdout
    assert "Step: 100%" in err and "5/5" in err, err[-2000:]
    assert "Epoch" not in err and "/-" not in err, err[-2000:]


def test_evaluation_loops_are_named_by_what_they_do(tmp_path, capsys):
    trainer = _trainer(
        tmp_path, max_steps=2, max_epochs=-1, val_check_interval=2, check_val_every_n_epoch=None
    )
    trainer.fit(_Tiny())
    err = "".join(capsys.readouterr())  # Lightning's bars write to stdout
    assert "Validating" in err and "Validation" not in err, err[-2000:]
    trainer.validate(_Tiny())  # a stand-alone evaluation, as stage=eval runs
    err = "".join(capsys.readouterr())  # Lightning's bars write to stdout
    assert "Evaluating" in err and "Validation" not in err, err[-2000:]
    assert "DataLoader 0" not in err  # one evaluation loader: no index to tell apart
