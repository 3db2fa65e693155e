"""Evaluation callbacks under DDP and around validation.

- CaptionEvalCallback under 2-process DDP on CPU: only rank 0 scores; the other rank waits for the
  scoring and nothing else; a scoring failure on rank 0 stops every rank with its message instead of
  leaving rank 1 blocked in the broadcast.
- ThroughputCallback: validation time (caption generation and scoring) is not counted as training time.
The DDP runs go through a subprocess running this file as a script (Lightning's ddp launcher re-executes
the script for rank 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

SCORE_SECONDS = 2.0


class _Ids(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, k: int) -> int:
        return k


class _Captioner(pl.LightningModule):
    def __init__(self, val_sleep: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.val_sleep = val_sleep

    def training_step(self, batch, batch_idx):
        self.last_batch_size, self.last_num_tokens = len(batch), 4 * len(batch)
        return self.layer(batch.float()[:, None]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)
        ks = [int(k) for k in batch]
        return {
            "ids": [f"i{k}" for k in ks],
            "predictions": ["a dog"] * len(ks),
            "references": [["a dog"]] * len(ks),
        }

    def flops_per_sample(self) -> float:
        return 1e6

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def val_dataloader(self):
        return DataLoader(_Ids(), batch_size=2)

    def train_dataloader(self):
        return DataLoader(_Ids(), batch_size=1)


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_ddp_rank1_waits_only_for_the_scoring_and_sees_its_failure(tmp_path):
    t0 = time.monotonic()
    proc = _run_ddp(tmp_path)
    assert proc.returncode != 0  # the second validation fails on purpose
    out = proc.stdout + proc.stderr
    # first validation: scored once, on rank 0; rank 1 held for the scoring plus gather/broadcast, no more
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["score_calls"] == 1 and r1["score_calls"] == 0, out[-3000:]
    assert r0["scores"] == r1["scores"] == {"n": 6.0}
    assert SCORE_SECONDS <= r1["epoch_end_seconds"] <= r0["score_seconds"] + 1.5, (r0, r1)
    # second validation: rank 0's scoring raises; rank 1 raises with its message instead of sitting in
    # the broadcast until the collective's timeout
    assert "scoring on rank 0 failed: ValueError: no METEOR here" in out
    assert (tmp_path / "rank1_raised.txt").read_text().startswith("_ScoreCallback: scoring on rank 0 failed")
    assert time.monotonic() - t0 < 240


def test_throughput_excludes_validation_time(tmp_path):
    from callbacks import ThroughputCallback

    perf = ThroughputCallback(window=6, peak_flops=1e12)  # rates once the window is full (6 steps)
    trainer = _trainer(tmp_path, [perf], devices=1, max_steps=6, val_check_interval=3, limit_val_batches=1,
                       num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(_Captioner(val_sleep=1.0))
    intervals = list(perf.step_times)
    assert len(intervals) == 6
    # one validation (1 s of sleep) ran between steps 3 and 4; no step interval contains it
    assert max(intervals) < 0.5, intervals
    assert perf.last_metrics["perf/samples_per_sec"] > 6 / 0.5 / 6


# --------------------------------------------------------------------------------------------------
# script mode: one DDP rank


def _ddp_main(out_dir: Path) -> None:
    from callbacks import CaptionEvalCallback

    class _ScoreCallback(CaptionEvalCallback):
        def __init__(self) -> None:
            super().__init__()
            self.calls, self.seconds, self.epoch_end_seconds = 0, 0.0, 0.0
            self.failing = False

        def score(self, predictions, references):
            self.calls += 1
            t0 = time.perf_counter()
            if self.failing:
                raise ValueError("no METEOR here")
            time.sleep(SCORE_SECONDS)
            self.seconds = time.perf_counter() - t0
            return {"n": float(len(predictions))}

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            t0 = time.perf_counter()
            try:
                super().on_validation_epoch_end(trainer, pl_module)
            except RuntimeError as e:
                if trainer.global_rank == 1:
                    (out_dir / "rank1_raised.txt").write_text(str(e))
                else:
                    time.sleep(3)  # rank 0's launcher kills rank 1 on its way out: let it write first
                raise
            self.epoch_end_seconds = time.perf_counter() - t0

    cb = _ScoreCallback()
    trainer = _trainer(out_dir, [cb], strategy="ddp", devices=2)
    trainer.validate(_Captioner())
    result = {"score_calls": cb.calls, "score_seconds": cb.seconds, "scores": cb.last_scores,
              "epoch_end_seconds": cb.epoch_end_seconds}  # fmt: skip
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    cb.failing = True
    trainer.validate(_Captioner())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _ddp_main(Path(sys.argv[1]))
