"""Text-to-image samples for a fixed prompt list, logged to W&B or saved as PNGs (the paper's LLM side, t2i path).

The LightningModule provides ``generate_images(prompts) -> list[PIL.Image]``; only global rank 0
calls it, so a module whose sampler has collectives must not rely on this callback. A module that holds no
BiDiffuser in its stage (``bidiffuser`` None: LLM stages on extracted features) draws nothing; the
callback says so once in the log. The pictures are the ones the stage's exported weights draw
(BiDiffuserModule draws with its EMA U-ViT) from the sampler's fixed seed, so runs and validations compare.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

log = logging.getLogger("easygen")


class T2ISampleCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, draw one image per prompt and log it."""

    def __init__(self, prompts: list[str], every_n_epochs: int = 1) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("T2ISampleCallback: prompts must be a non-empty list of str")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.prompts = list(prompts)
        self.every_n_epochs = every_n_epochs
        self.last_paths: list[Path] = []
        self._said_none = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        # every rank: Trainer.log_dir broadcasts rank 0's folder (a collective, so not inside the rank-0 branch)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if not trainer.is_global_zero:
            return
        if not hasattr(pl_module, "generate_images"):
            raise AttributeError(
                f"T2ISampleCallback needs {type(pl_module).__name__}.generate_images(prompts) -> list[PIL.Image]"
            )
        if hasattr(pl_module, "bidiffuser") and pl_module.bidiffuser is None:
            if not self._said_none:
                log.info("t2i samples: %s holds no BiDiffuser in this stage; none drawn", type(pl_module).__name__)
                self._said_none = True
            return
        images = pl_module.generate_images(self.prompts)
        if len(images) != len(self.prompts):
            raise ValueError(f"generate_images returned {len(images)} images for {len(self.prompts)} prompts")

        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            for lg in wandb_loggers:
                lg.log_image(
                    key="t2i/samples", images=list(images), caption=self.prompts, step=trainer.global_step
                )
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.last_paths = []
        for k, image in enumerate(images):
            path = log_dir / f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:07d}_{k:02d}.png"
            image.save(path)
            self.last_paths.append(path)
        (log_dir / f"epoch{trainer.current_epoch:03d}_prompts.txt").write_text("\n".join(self.prompts) + "\n")
