"""Caption evaluation at the end of each validation epoch, scored once over the whole set (the paper's evaluation).

Protocol with the LightningModule: ``validation_step(batch, batch_idx)`` returns a dict with ``ids``
(list[str]), ``predictions`` (list[str]) and ``references`` (list[list[str]]), optionally ``images``
(one picture or None per id, [3, H, W] in [0, 1]: shown beside the captions in the W&B sample table
and written as PNG files beside the CSV logger's sample file). The callback keeps them per rank,
gathers every rank's list on rank 0's side with ``all_gather_object``, drops the duplicates Lightning's
``DistributedSampler`` adds to pad the last batch, scores the set once with
``easygen.metrics.caption_scores`` (CIDEr's document frequencies depend on the whole set, so per-rank
scores averaged would be wrong), broadcasts the scores and logs ``<prefix>/CIDEr``, ``<prefix>/Bleu_4``,
... on every rank, so ``ModelCheckpoint`` can monitor ``val/CIDEr`` under DDP.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from easygen.metrics import caption_scores, prewarm_meteor


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CaptionEvalCallback(pl.Callback):
    """Score generated captions with the COCO metrics after each (every ``every_n_epochs``-th) validation.

    Attributes after an evaluation: ``last_scores`` (dict metric -> float) and ``last_predictions``
    (dict id -> caption, the de-duplicated gathered set; filled on rank 0 only).
    """

    def __init__(
        self, every_n_epochs: int = 1, prefix: str = "val", max_samples_table: int = 16, spice: bool = False
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.max_samples_table = max_samples_table
        self.spice = spice
        self.last_scores: dict[str, float] = {}
        self.last_predictions: dict[str, str] = {}
        self._records: list[tuple[str, str, list[str]]] = []
        self._images: dict[str, Any] = {}

    def score(self, predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
        """Scores of the whole gathered set (subclasses score other tasks, e.g. VQA accuracy)."""
        return caption_scores(predictions, references, spice=self.spice)

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records = []
        self._images = {}
        if self._active(trainer) and trainer.is_global_zero:
            # METEOR's JVM loads its paraphrase table (~10 s) while the validation batches run.
            prewarm_meteor()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer):
            return
        if not isinstance(outputs, dict) or not {"ids", "predictions", "references"} <= outputs.keys():
            raise ValueError(
                f"CaptionEvalCallback: validation_step (batch {batch_idx}) must return a dict with 'ids', "
                f"'predictions' and 'references'; got {type(outputs).__name__}"
                + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
            )
        ids, preds, refs = outputs["ids"], outputs["predictions"], outputs["references"]
        if not len(ids) == len(preds) == len(refs):
            raise ValueError(
                f"CaptionEvalCallback: batch {batch_idx} returned {len(ids)} ids, {len(preds)} predictions "
                f"and {len(refs)} reference lists; they must match"
            )
        for i, p, r in zip(ids, preds, refs):
            self._records.append((str(i), str(p), [str(x) for x in r]))
        images = outputs.get("images")
        if images is not None and trainer.is_global_zero:
            for i, im in zip(ids, images):
                if len(self._images) < self.max_samples_table:
                    self._images[str(i)] = im.detach().cpu() if isinstance(im, torch.Tensor) else im

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        records = self._records
        if _dist_ready():
            gathered: list[list | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for rank_records in gathered for r in rank_records]
        scores: dict[str, float] | None = None
        error: str | None = None
        if trainer.is_global_zero:
            predictions: dict[str, str] = {}
            references: dict[str, list[str]] = {}
            for i, pred, refs in records:
                # DistributedSampler pads by repeating samples: keep the first copy of each id.
                if i not in predictions:
                    predictions[i] = pred
                    references[i] = refs
            self.last_predictions = predictions
            try:
                scores = self.score(predictions, references) if predictions else {}
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                if not _dist_ready():
                    raise
                error = f"{type(e).__name__}: {e}"
        if _dist_ready():
            # The other ranks wait here for exactly the scoring; a failure reaches them too, instead of
            # leaving them blocked in this broadcast until the collective times out.
            box = [(scores, error)]
            dist.broadcast_object_list(box, src=0)
            scores, error = box[0]
        if error is not None:
            raise RuntimeError(f"{type(self).__name__}: scoring on rank 0 failed: {error}")
        self.last_scores = dict(scores)
        for name, value in self.last_scores.items():
            pl_module.log(f"{self.prefix}/{name}", float(value), sync_dist=False, rank_zero_only=False)
        if trainer.is_global_zero:
            self._log_table(trainer, records)
        self._records = []
        self._images = {}

    def _sample_rows(
        self, records: list[tuple[str, str, list[str]]]
    ) -> list[tuple[str, Any, str, list[str]]]:
        """The first ``max_samples_table`` distinct samples: (id, picture or None, prediction, references)."""
        seen: set[str] = set()
        rows = []
        for i, pred, refs in records:
            if i in seen:
                continue
            seen.add(i)
            rows.append((i, self._images.get(i), pred, refs))
            if len(rows) >= self.max_samples_table:
                break
        return rows

    def _log_table(self, trainer: pl.Trainer, records: list[tuple[str, str, list[str]]]) -> None:
        """The caption samples beside their pictures: a W&B table (``<prefix>/caption_samples``) and, for a
        CSV logger, ``caption_samples/<prefix>_step<N>.csv`` in its folder with the pictures as PNG files
        in ``caption_samples/<prefix>_step<N>/`` (the row holds the path)."""
        if self.max_samples_table <= 0:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        if not wandb_loggers and not csv_loggers:
            return
        rows = self._sample_rows(records)
        if wandb_loggers:
            data = [
                [i, wandb.Image(to_pil(im), caption=pred) if im is not None else None, pred, "\n".join(refs)]
                for i, im, pred, refs in rows
            ]
            for lg in wandb_loggers:
                lg.log_table(
                    key=f"{self.prefix}/caption_samples",
                    columns=["id", "image", "prediction", "references"],
                    data=data,
                    step=trainer.global_step,
                )
        for lg in csv_loggers:
            write_sample_csv(
                Path(lg.log_dir) / "caption_samples", f"{self.prefix}_step{trainer.global_step:07d}", rows
            )


def to_pil(image: Any):
    """A picture as a PIL image: a float tensor/array [3, H, W] or [H, W, 3] in [0, 1], a uint8 one, or PIL."""
    import numpy as np
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return Image.fromarray(a).convert("RGB")


def write_sample_csv(folder: Path, name: str, rows: list[tuple[str, Any, str, list[str]]]) -> Path:
    """``folder/name.csv`` (id, image, prediction, references) with each picture written as
    ``folder/name/<id>.png``; the image column holds that path relative to ``folder`` (empty when the
    sample had no picture)."""
    pictures = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "prediction", "references"])
        for i, im, pred, refs in rows:
            rel = ""
            if im is not None:
                pictures.mkdir(parents=True, exist_ok=True)
                file = pictures / (re.sub(r"[^A-Za-z0-9._-]", "_", str(i)) + ".png")
                to_pil(im).save(file)
                rel = str(file.relative_to(folder))
            writer.writerow([i, rel, pred, " | ".join(refs)])
    return path
