"""The tiny preset's CLIP towers fitted to each other on the training pairs at the start of stage=bidiffuser
(`model.bidiffuser.clip_fit`; easygen/bidiffuser/clip.py::fit_clip), before the U-ViT learns from their
outputs. The towers start random, and a random text tower's latent leaves text-to-image without its prompt
(see clip.py). A no-op in other stages, with `clip_fit.steps` 0 or absent (real CLIP weights), and when
`model.bidiffuser.weights` brings towers fitted by an earlier run. Deterministic given the seed; under
several processes rank 0 fits and the others receive its towers by broadcast."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from data_modules.shards import ShardIndexDataset
from easygen.errors import ConfigError
from easygen.lit.bidiffuser_module import BiDiffuserModule

log = logging.getLogger("easygen")


class FitClip(pl.Callback):
    """Fits the BiDiffuser's CLIP towers at fit start when `model.bidiffuser.clip_fit.steps` > 0 (see the module
    doc). The fitted towers go into the stage's checkpoints (BiDiffuserModule.on_save_checkpoint keeps them
    once `clip_fitted`), and this callback's state says the fit is done: a run resumed with `ckpt_path`
    continues with the towers it checkpointed instead of fitting again. (Strategies that restore after
    setup, FSDP's, restore after fit start: there the fit runs again and the checkpoint's towers replace it.)"""

    def __init__(self) -> None:
        self.fitted = False

    def state_dict(self) -> dict:
        return {"fitted": self.fitted}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fitted = bool(state_dict.get("fitted", False))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, BiDiffuserModule):
            return
        b = pl_module.cfg["model"]["bidiffuser"]
        fit = dict(b.get("clip_fit") or {})
        if not int(fit.get("steps") or 0) or b.get("weights"):
            return
        if not self.fitted:
            fit_clip_on_training_pairs(pl_module, trainer, fit)
        else:
            # resumed: the towers came back with the checkpoint; targets come from the pixels as when fitted
            pl_module.encoder_source = "online"
        pl_module.clip_fitted = self.fitted = True


def fit_clip_on_training_pairs(module: BiDiffuserModule, trainer: pl.Trainer | None, fit: dict) -> None:
    if module.encoder_source == "precomputed":
        raise ConfigError(
            "model.bidiffuser.clip_fit refits the CLIP towers, so encoder outputs precomputed with the old ones "
            "do not fit: set stage.encoder_source=online (or model.bidiffuser.clip_fit.steps=0)"
        )
    # precomputed outputs in the shards were made with the unfitted towers: compute them from the pixels
    module.encoder_source = "online"
    limit = int(fit.pop("max_pairs", 4096))
    world = trainer.world_size if trainer is not None else 1
    rank0 = trainer is None or trainer.is_global_zero
    pipe = module.bidiffuser
    state = None
    if rank0:
        images, captions = training_pairs(module, trainer, limit)
        losses = pipe.fit_clip(images.to(pipe.device), captions, seed=int(module.cfg.get("seed", 0)), **fit)
        log.info(
            "CLIP towers fitted on %d training pairs: contrastive loss %.3f -> %.3f in %d steps",
            len(images),
            losses[0],
            losses[-1],
            len(losses),
        )
        state = {
            k: v.cpu() for k, v in pipe.state_dict().items() if k.startswith(("clip_text.", "clip_image."))
        }
    if world > 1:
        state = trainer.strategy.broadcast(state, src=0)
    if not rank0:
        pipe.load_state_dict(state, strict=False)
    module._image_cache.clear()
    module._text_cache.clear()


def training_pairs(module, trainer, limit: int) -> tuple[torch.Tensor, list[list[str]]]:
    """The first `limit` training pictures ([N, 3, H, W] in [0, 1]) and their captions."""
    datamodule = getattr(trainer, "datamodule", None)
    train = datamodule.train if datamodule is not None else module.cfg["data"]["train"]
    urls = [src["urls"] for src in train] if isinstance(train, (list, tuple)) else [train]
    size = int(module.cfg["model"]["image_size"])
    images, captions = [], []
    for spec in urls:
        ds = ShardIndexDataset(spec, size)
        for i in range(len(ds)):
            if len(images) >= limit:
                break
            s = ds[i]
            if s is not None and s.get("image") is not None and s.get("captions"):
                images.append(torch.as_tensor(s["image"]))
                captions.append(list(s["captions"]))
    if len(images) < 2:
        raise ConfigError(
            f"model.bidiffuser.clip_fit: fewer than 2 training pictures with captions in {urls}"
        )
    return torch.stack(images), captions
