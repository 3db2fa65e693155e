"""`stage=bidiffuser|pretrain|instruct`: build the LightningModule, DataModule, loggers, callbacks and
Trainer from the config, fit, and return what results.json records."""

from __future__ import annotations

import logging
import os
import time

import lightning.pytorch as pl
import torch

from easygen.checkpoint import loaded_weights
from easygen.errors import ConfigError
from easygen.stages import build
from easygen.stages.baselines import constant_caption_baseline
from easygen.stages.checkpoints import check_resume, resolve_ckpt
from easygen.stages.common import ensure_data, output_dir

log = logging.getLogger("easygen")


def check_cluster(trainer_cfg) -> None:
    """Under SLURM (sbatch/srun or `hydra/launcher=submitit_slurm`) one task runs each device: the
    allocation must match trainer.devices and trainer.num_nodes, or ranks would wait for each other forever."""
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE")
    if not tasks or "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    tasks = int(tasks.split("(")[0])
    devices = trainer_cfg.get("devices")
    if str(devices) != "auto" and int(devices) != tasks:
        raise ConfigError(
            f"SLURM runs {tasks} tasks per node but trainer.devices={devices}: set trainer.devices={tasks} "
            "(with submitit: hydra.launcher.tasks_per_node == trainer.devices)"
        )
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nodes != int(trainer_cfg.get("num_nodes", 1)):
        raise ConfigError(
            f"SLURM allocated {nodes} nodes but trainer.num_nodes={trainer_cfg.get('num_nodes')}: "
            f"set trainer.num_nodes={nodes}"
        )


def batch_plan(cfg, world: int) -> tuple[int, int]:
    """(global batch, gradient accumulation) for this world size. With `global_batch_size` set,
    accumulation is derived from it (global = per-device batch x world size x accumulation), so the same
    command keeps its global batch on 1 or 64 devices; otherwise `trainer.accumulate_grad_batches` holds."""
    per_device = int(cfg.data.batch_size)
    target = cfg.get("global_batch_size")
    if target is None:
        accumulate = int(cfg.trainer.accumulate_grad_batches)
        return per_device * world * accumulate, accumulate
    target = int(target)
    if target % (per_device * world):
        raise ConfigError(
            f"global_batch_size={target} is not a multiple of data.batch_size={per_device} x {world} "
            f"devices: change one of them (global = per-device batch x devices x accumulation)"
        )
    return target, target // (per_device * world)


def scalar(v) -> float:
    return float(v.detach().float().cpu().item()) if isinstance(v, torch.Tensor) else float(v)


def train_stage(cfg) -> dict:
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    check_cluster(cfg.trainer)
    ensure_data(cfg)
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), out)
    if ckpt:
        check_resume(cfg, ckpt)
    module = build.lightning_module(cfg)
    datamodule = build.datamodule(cfg, module)
    loggers = build.loggers(cfg)
    trainer = build.trainer(cfg, callbacks=build.callbacks(cfg, has_logger=bool(loggers)),
                            logger=loggers or False, default_root_dir=str(out))
    global_batch, trainer.accumulate_grad_batches = batch_plan(cfg, trainer.world_size)
    log.info("stage=%s global batch %d = %d per device x %d devices x %d accumulation (strategy=%s)%s",
             cfg.stage.name, global_batch, cfg.data.batch_size, trainer.world_size,
             trainer.accumulate_grad_batches, type(trainer.strategy).__name__,
             f"; resuming from {ckpt}" if ckpt else "")
    t0 = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    artifacts = module.export_artifacts(out)  # every rank: gathers sharded weights
    ckpt_cb = trainer.checkpoint_callback
    best = {}
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None and ckpt_cb.monitor:
        best[ckpt_cb.monitor] = scalar(ckpt_cb.best_model_score)
    metrics = {k: scalar(v) for k, v in trainer.callback_metrics.items()}
    baseline = {}
    if cfg.stage.get("baseline") and "val/CIDEr" in metrics and trainer.is_global_zero:
        baseline = constant_caption_baseline(cfg, "val")  # the score without looking at the pictures
        metrics.update({k: v for k, v in baseline.items() if isinstance(v, float)})
    return {
        "global_step": int(trainer.global_step),
        "global_batch": global_batch,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "resumed_from": ckpt,
        # the learning rate of each parameter group as the optimizer was built (before the schedule scales it)
        "optimizer_lr": {g.get("name", str(i)): float(g.get("initial_lr", g["lr"]))
                         for o in trainer.optimizers for i, g in enumerate(o.param_groups)},
        "loaded": loaded_weights(module),
        "metrics": metrics,
        "baseline_caption": baseline.get("baseline/val_constant_caption"),
        "best": best,
        "checkpoints": {
            "best": getattr(ckpt_cb, "best_model_path", None) or None,
            "last": getattr(ckpt_cb, "last_model_path", None) or None,
        },
        "artifacts": artifacts,
        "train_seconds": round(time.time() - t0, 2),
    }
