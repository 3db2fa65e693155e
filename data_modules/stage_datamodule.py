"""The shard DataModule as the stages use it, built from a `conf/data/*.yaml` node (its `_target_`): the
training module's collate for training batches, its eval collate (generation prompts, left padding) and
a larger batch for the map-style eval splits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from data_modules.datamodule import ShardDataModule, _DropNone, weighted_source


class StageDataModule(ShardDataModule):
    """`ShardDataModule` plus the data config's own keys: `name` and `root` (what the set is and where its
    shards are; the split patterns interpolate `root`), `synthetic` (how the embedded set is written, see
    `easygen.stages.common.ensure_data`), `constant_baseline` (read by the training stages' config:
    whether they score the best constant caption, `easygen.stages.baselines`), `instruct_train` (weighted
    sources the instruct stage adds to `train`) and `dialogue_test` (the held-out dialogues of
    `task=dialogue`), `eval_batch_size` and the eval collate.

    `extra_train` (a list of `{urls, weight}`, what the stage's `stage.extra_train` names) joins the
    training mix after the `train` sources; `train` itself stays what it is (the projector standardiser
    and the constant-caption baseline read it)."""

    def __init__(
        self,
        name: str | None = None,
        root: str | None = None,
        synthetic: dict | None = None,
        constant_baseline: bool = False,
        instruct_train: Sequence[Mapping[str, Any]] | None = None,
        dialogue_test: str | None = None,
        extra_train: Sequence[Mapping[str, Any]] | None = None,
        eval_batch_size: int | None = None,
        eval_collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.instruct_train = instruct_train
        self.dialogue_test = dialogue_test
        self.extra_train = list(extra_train or [])
        self.name = name
        self.root = root
        self.synthetic = synthetic
        self.constant_baseline = constant_baseline
        self.eval_batch_size = eval_batch_size
        self.eval_collate_fn = eval_collate_fn

    def train_sources(self) -> list[tuple[list[str], float]]:
        """The `train` sources, then the `extra_train` ones, as (expanded urls, weight)."""
        sources = super().train_sources()
        sources += [weighted_source(source, f"extra train source {i}") for i, source in enumerate(self.extra_train)]
        return sources

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
