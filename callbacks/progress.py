"""The progress bar of every stage.

Lightning's default bar counts epochs (`Epoch 3/-2` where the run is bounded by `trainer.max_steps` with
`max_epochs=-1`, as every stage here is) and calls every evaluation loop "Validation". This one:
- with `max_steps` set and `max_epochs=-1`, one bar for the whole run: `Step N/max_steps` (optimizer
  steps, so gradient accumulation and epoch boundaries do not reset it; a resumed run starts at its step);
- with `max_epochs` set, `Epoch E/max_epochs` (1-based) over each epoch's batches;
- names the evaluation loops by what they do: "Validating" inside training, "Evaluating" for a stand-alone
  evaluation (`trainer.validate`, as `stage=eval` runs), "Testing" for `trainer.test`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.trainer.states import TrainerFn


def _step_bounded(trainer: pl.Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)

    @property
    def validation_description(self) -> str:
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.VALIDATING:
            return "Evaluating"
        return "Validating"

    def train_description_for(self, trainer: pl.Trainer) -> str:
        if _step_bounded(trainer):
            return "Step"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        return f"Epoch {trainer.current_epoch + 1}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        if _step_bounded(trainer):
            bar = self.train_progress_bar
            bar.unit = "step"
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.n = trainer.global_step
            bar.set_description(self.train_description_for(trainer))

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if not _step_bounded(trainer):
            super().on_train_epoch_start(trainer)
            self.train_progress_bar.set_description(self.train_description_for(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _step_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        return None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _step_bounded(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # TQDMProgressBar's, without "DataLoader 0" where there is one evaluation loader
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.val_progress_bar
        bar.reset()
        bar.total = convert_inf(self.total_val_batches_current_dataloader)
        bar.initial = 0
        desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
        loaders = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        bar.set_description(desc if len(loaders) == 1 else f"{desc} DataLoader {dataloader_idx}")
