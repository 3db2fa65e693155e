"""Data position across a resume: the training loader reports how many batches of the current epoch
the trainer has consumed, Lightning stores that in the checkpoint (the fit loop keeps the state of
loaders that have `state_dict`/`load_state_dict`), and after `ckpt_path=...` the first epoch skips
that many batches, so the resumed run sees the batches the crashed one would have seen next.

The WebDataset stream is seeded per (seed, rank, worker, epoch) and cannot seek: skipping reads and
decodes the skipped samples (no model work). An epoch boundary restarts its seeded order from epoch 0."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from data_modules.stage_datamodule import StageDataModule

log = logging.getLogger("easygen")


class ResumableLoader:
    """Wraps a training loader; `state_dict` = batches consumed in this epoch, `load_state_dict` sets
    the number to skip at the start of the next iteration."""

    def __init__(self, loader, position: Callable[[], int]):
        self.loader = loader
        self.position = position
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        skip, self.skip = self.skip, 0
        if skip:
            log.info("resuming the data stream: skipping %d batches already trained on", skip)
        for _ in range(skip):
            try:
                next(it)
            except StopIteration:
                return
        yield from it

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        # batch_size, dataset, sampler ...: what Lightning reads from a DataLoader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict:
        return {"batches_in_epoch": int(self.position())}

    def load_state_dict(self, state: dict) -> None:
        self.skip = int(state.get("batches_in_epoch", 0))


class ResumableDataModule(StageDataModule):
    """The stage data module whose training loader keeps its position in checkpoints."""

    def train_dataloader(self):
        def position() -> int:
            trainer = self.trainer
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

        return ResumableLoader(super().train_dataloader(), position)
