"""CaptionEvalCallback: whole-set scoring under 2-process DDP on CPU equals a single-process run.

The validation set has 7 samples, so Lightning's DistributedSampler pads rank 1 with a repeat of
sample 0: the callback must count that id once. The DDP run goes through a subprocess running this
file as a script (Lightning's ddp launcher re-executes the script for rank 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

N_SAMPLES = 7  # odd: the distributed sampler pads to 8
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "brown"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow", "sheep", "bear"]


def _references(k: int) -> list[str]:
    c, a = COLOURS[k % 7], ANIMALS[(3 * k) % 7]
    return [f"A {c} {a} standing in a field.", f"The {a} is {c} and stands on grass.", f"a {c} {a} outside"]


def _prediction(k: int) -> str:
    c, a = COLOURS[(k + k // 3) % 7], ANIMALS[(3 * k) % 7]
    return f"a {c} {a} in a field"


class _Ids(Dataset):
    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, k: int) -> int:
        return k


class _Captioner(pl.LightningModule):
    """Predictions are a fixed function of the sample id: the same on any rank and any run."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch.float()[:, None]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        ks = [int(k) for k in batch]
        return {
            "ids": [f"img{k}" for k in ks],
            "predictions": [_prediction(k) for k in ks],
            "references": [_references(k) for k in ks],
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def val_dataloader(self):
        return DataLoader(_Ids(), batch_size=2)

    def train_dataloader(self):
        return DataLoader(_Ids(), batch_size=2)


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _expected_scores() -> dict[str, float]:
    from easygen.metrics import caption_scores

    ids = [f"img{k}" for k in range(N_SAMPLES)]
    return caption_scores(
        {i: _prediction(k) for k, i in enumerate(ids)}, {i: _references(k) for k, i in enumerate(ids)}
    )


class _NothingDuringSanityCheck(pl.Callback):
    def __init__(self, watched) -> None:
        self.watched = watched
        self.checked = False

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        assert self.watched.last_scores == {} and self.watched.last_predictions == {}
        self.checked = True


def test_single_process_fit_scores_whole_set_and_skips_sanity_check(tmp_path):
    from callbacks import CaptionEvalCallback

    cb = CaptionEvalCallback()
    guard = _NothingDuringSanityCheck(cb)
    trainer = _trainer(
        tmp_path, [cb, guard], devices=1, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=2
    )
    trainer.fit(_Captioner())
    assert guard.checked
    expected = _expected_scores()
    assert cb.last_scores == expected
    assert len(cb.last_predictions) == N_SAMPLES
    assert trainer.callback_metrics["val/CIDEr"].item() == pytest.approx(expected["CIDEr"], rel=1e-6)
    assert set(trainer.callback_metrics) >= {f"val/{k}" for k in expected}


def test_bad_validation_output_is_named(tmp_path):
    from callbacks import CaptionEvalCallback

    class _Bad(_Captioner):
        def validation_step(self, batch, batch_idx):
            return {"ids": ["a"], "predictions": ["x"]}

    trainer = _trainer(tmp_path, [CaptionEvalCallback()], devices=1)
    with pytest.raises(
        ValueError, match=r"batch 0\) must return a dict with 'ids', 'predictions' and 'references'"
    ):
        trainer.validate(_Bad())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equals_single_process(tmp_path):
    from easygen.metrics import caption_scores

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    expected = _expected_scores()

    # Rank 1 really saw the padded repeat, and every rank saw part of the set.
    assert rank0["local_ids"] and rank1["local_ids"]
    assert len(rank0["local_ids"]) + len(rank1["local_ids"]) == N_SAMPLES + 1
    assert set(rank0["local_ids"]) | set(rank1["local_ids"]) == {f"img{k}" for k in range(N_SAMPLES)}
    # The padded id is counted once and the whole set is scored once, as in one process.
    assert sorted(rank0["predictions"]) == sorted(f"img{k}" for k in range(N_SAMPLES))
    assert rank0["scores"] == expected
    # Scores are broadcast: rank 1 logs the very same value (what ModelCheckpoint monitors).
    assert rank1["scores"] == expected
    assert rank0["logged_cider"] == rank1["logged_cider"]
    assert rank0["logged_cider"] == pytest.approx(expected["CIDEr"], rel=1e-6)

    # Counting the padded repeat as its own image would have changed CIDEr: the check above can fail.
    preds = {f"img{k}": _prediction(k) for k in range(N_SAMPLES)}
    refs = {f"img{k}": _references(k) for k in range(N_SAMPLES)}
    preds["dup"], refs["dup"] = preds["img0"], refs["img0"]
    assert caption_scores(preds, refs)["CIDEr"] != expected["CIDEr"]


class _RecordLocalIds(pl.Callback):
    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.ids.extend(outputs["ids"])


def _ddp_main(out_dir: Path) -> None:
    from callbacks import CaptionEvalCallback

    cb = CaptionEvalCallback()
    local = _RecordLocalIds()
    trainer = _trainer(out_dir, [cb, local], strategy="ddp", devices=2)
    trainer.validate(_Captioner())
    result = {
        "local_ids": local.ids,
        "scores": cb.last_scores,
        "predictions": sorted(cb.last_predictions),
        "logged_cider": trainer.callback_metrics["val/CIDEr"].item(),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def test_throughput_and_t2i_sample_callbacks(tmp_path):
    from PIL import Image

    from callbacks import T2ISampleCallback, ThroughputCallback

    class _Module(_Captioner):
        def training_step(self, batch, batch_idx):
            self.last_batch_size, self.last_num_tokens = len(batch), 10 * len(batch)
            return super().training_step(batch, batch_idx)

        def flops_per_sample(self) -> float:
            return 1e9

        def generate_images(self, prompts):
            return [Image.new("RGB", (8, 8), (40 * k, 0, 0)) for k, _ in enumerate(prompts)]

    perf = ThroughputCallback(window=3, peak_flops=1e12)
    samples = T2ISampleCallback(["a red square", "a blue circle"])
    trainer = _trainer(
        tmp_path, [perf, samples], devices=1, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0
    )
    trainer.fit(_Module())
    m = perf.last_metrics
    assert m["perf/tokens_per_sec"] == pytest.approx(10 * m["perf/samples_per_sec"])
    assert m["perf/mfu"] == pytest.approx(m["perf/samples_per_sec"] * 1e9 / 1e12)
    assert trainer.callback_metrics["perf/samples_per_sec"].item() == pytest.approx(
        m["perf/samples_per_sec"], rel=1e-6
    )
    assert [p.name for p in samples.last_paths] == [
        "epoch000_step0000003_00.png",
        "epoch000_step0000003_01.png",
    ]
    assert Image.open(samples.last_paths[1]).getpixel((0, 0)) == (40, 0, 0)


def _picture(k: int) -> torch.Tensor:
    """A distinct flat colour per sample, [3, 4, 6] in [0, 1] as the data pipeline gives."""
    rgb = torch.tensor([(30 * k) % 256, (70 * k + 10) % 256, 200 - 20 * k]) / 255.0
    return rgb[:, None, None].expand(3, 4, 6).clone()


class _CaptionerWithPictures(_Captioner):
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        out["images"] = [_picture(int(k)) for k in batch]
        return out


def test_sample_table_logs_the_pictures_to_wandb_and_csv(tmp_path, monkeypatch):
    """W&B offline: the logged table's image cells are image files holding the validated pictures; the CSV
    logger's sample file names a PNG per row with the same pixels."""
    import csv

    import numpy as np
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from PIL import Image

    from callbacks import CaptionEvalCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # where logged tables are staged
    # W&B logs a table as an artifact (its JSON plus the image files); keep each one logged, as logged
    logged = []
    real_log_artifact = wandb.Run.log_artifact

    def keep(run, artifact, *args, **kwargs):
        logged.append(artifact)
        return real_log_artifact(run, artifact, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log_artifact", keep)
    cb = CaptionEvalCallback(max_samples_table=5)
    wb = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=[wb, csv_logger],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.validate(_CaptionerWithPictures())
    wandb.finish()

    (art,) = [a for a in logged if a.type == "run_table"]
    files = {name: Path(e.local_path) for name, e in art.manifest.entries.items()}
    table = json.loads(files["val/caption_samples.table.json"].read_text())
    assert table["columns"] == ["id", "image", "prediction", "references"]
    assert [r[0] for r in table["data"]] == [f"img{k}" for k in range(5)]
    for row in table["data"]:
        k = int(row[0][3:])
        assert row[2] == _prediction(k) and row[3] == "\n".join(_references(k))
        cell = row[1]
        assert isinstance(cell, dict) and cell["_type"] == "image-file", cell
        png = np.asarray(Image.open(files[cell["path"]]).convert("RGB"))
        want = (_picture(k).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert png.shape == want.shape and (png == want).all(), (k, png[0, 0], want[0, 0])

    folder = Path(csv_logger.log_dir) / "caption_samples"
    with (folder / "val_step0000000.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"img{k}" for k in range(5)]
    for r in rows:
        k = int(r["id"][3:])
        assert r["prediction"] == _prediction(k)
        png = np.asarray(Image.open(folder / r["image"]).convert("RGB"))
        want = (_picture(k).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert (png == want).all()


def test_mfu_is_not_logged_without_a_peak(tmp_path):
    """On a CPU there is no peak FLOP/s to divide by: samples/s and tokens/s are logged, perf/mfu is not."""
    from callbacks import ThroughputCallback

    class _Module(_Captioner):
        def training_step(self, batch, batch_idx):
            self.last_batch_size, self.last_num_tokens = len(batch), 10 * len(batch)
            return super().training_step(batch, batch_idx)

        def flops_per_sample(self) -> float:
            return 1e9

    perf = ThroughputCallback(window=3)
    trainer = _trainer(tmp_path, [perf], devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(_Module())
    assert perf.last_metrics["perf/samples_per_sec"] > 0 and "perf/tokens_per_sec" in perf.last_metrics
    assert "perf/mfu" not in perf.last_metrics and "perf/mfu" not in trainer.callback_metrics


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _ddp_main(Path(sys.argv[1]))
