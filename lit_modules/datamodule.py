"""The shard DataModule as the stages use it: the training module's collate for training batches, its
eval collate (generation prompts, left padding) and a larger batch for the map-style eval splits."""

from __future__ import annotations

import torch

from data_modules.datamodule import ShardDataModule, _DropNone


class StageDataModule(ShardDataModule):
    eval_collate_fn = None
    eval_batch_size = None

    def _eval_loader(self, split: str) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.eval_dataset(split),
            batch_size=self.eval_batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_DropNone(self.eval_collate_fn or self.collate_fn),
            pin_memory=self.pin_memory,
        )


def log_skipped(module) -> None:
    """Log the data module's count of skipped (broken) samples as `data/skipped`."""
    dm = getattr(module.trainer, "datamodule", None)
    counter = getattr(dm, "skip_counter", None)
    if counter is not None:
        module.log("data/skipped", float(counter.skipped), reduce_fx="max")
