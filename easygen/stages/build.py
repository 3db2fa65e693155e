"""The objects a stage builds from its config, each from its `_target_` (hydra.utils.instantiate): the
LightningModule (`stage.module`), the DataModule (`data`), the strategy (`strategy`), the loggers
(`logger.*`), the callbacks (`callbacks.*`) and the Trainer (`trainer`)."""

from __future__ import annotations

import lightning.pytorch as pl
from hydra.utils import get_class
from omegaconf import OmegaConf

from callbacks.progress import StepProgressBar
from data_modules.stage_datamodule import StageDataModule
from easygen.lit.config import instantiate
from easygen.stages.common import container


def lightning_module(cfg) -> pl.LightningModule:
    """The stage's LightningModule from the config (or a plain resolved one, e.g. a checkpoint's
    hyper-parameters): `stage.module` names its class; the module builds its models from `model.*`."""
    plain = container(cfg)
    return get_class(plain["stage"]["module"])(plain)


def datamodule(cfg, module) -> StageDataModule:
    """`data` instantiated with the LightningModule's collate functions (training and generation) and the
    stage's extra training sources (`stage.extra_train`: conf/stage/instruct.yaml adds the data config's
    `instruct_train`)."""
    return instantiate(
        cfg.data,
        collate_fn=module.collate,
        eval_collate_fn=module.eval_collate,
        load_images=module.needs_images,
        extra_train=extra_train(cfg),
        _convert_="all",
    )


def extra_train(cfg) -> list:
    """The weighted sources the stage adds to `data.train` (`stage.extra_train`; none when unset)."""
    extra = cfg.stage.get("extra_train")
    if extra is None:
        return []
    return list(OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra)


def loggers(cfg) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def callbacks(cfg, has_logger: bool = True) -> list:
    """Every `callbacks.*` entry with a `_target_` (an entry set to null is dropped), then the progress bar."""
    out = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if c is None or "_target_" not in c:
            continue
        if not has_logger and c["_target_"].endswith("LearningRateMonitor"):
            continue  # it needs a logger to write to
        if name == "model_checkpoint" and not cfg.stage.get("monitor"):
            c = OmegaConf.merge(c, {"monitor": None, "mode": "min"})
        out.append(instantiate(c))
    if cfg.trainer.get("enable_progress_bar", True):
        out.append(StepProgressBar())  # `Step N/max_steps`; Lightning's own shows `Epoch 3/-2` here
    return out


def validation_schedule(cfg) -> dict:
    """With a step budget and no explicit `trainer.val_check_interval`: validate every `stage.val_every`
    steps, moved up to a divisor of `max_steps` so that the last step is always evaluated."""
    t = cfg.trainer
    max_steps = int(t.get("max_steps", -1))
    if max_steps > 0 and t.get("val_check_interval") is None:
        every = min(int(cfg.stage.get("val_every") or max_steps), max_steps)
        while max_steps % every:
            every += 1
        return {"val_check_interval": every, "check_val_every_n_epoch": None}
    if t.get("check_val_every_n_epoch") is None and t.get("val_check_interval") is None:
        return {"check_val_every_n_epoch": 1}
    return {}


def trainer(cfg, **kwargs) -> pl.Trainer:
    """`trainer` instantiated with the strategy from `strategy`; `kwargs` (callbacks, logger, ...) win."""
    return instantiate(cfg.trainer, **{"strategy": instantiate(cfg.strategy), **validation_schedule(cfg), **kwargs})
