"""The stage runner behind `run.py`: checks the composed config, prepares data, runs one stage
(`bidiffuser`, `extract`, `pretrain`, `instruct`, `eval`, `chat`, or `all` in order), and writes
`results.json` in the run's output directory."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lit_modules.checks import validate
from lit_modules.errors import ConfigError

log = logging.getLogger("easygen")


# ----------------------------------------------------------------------------------------------------
# config helpers


def container(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def hydra_choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices)
        return {k: v for k, v in choices.items() if not k.startswith("hydra/") or k == "hydra/launcher"}
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests calling run_stage directly)
        return {}


def hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return []


def output_dir(cfg) -> Path:
    return Path(str(cfg.paths.output_dir))


# ----------------------------------------------------------------------------------------------------
# data


def ensure_data(cfg) -> None:
    """Write the synthetic set on first use; check that every shard pattern matches something."""
    from data_modules.shards import expand_urls

    if cfg.data.get("synthetic") and cfg.data.name == "synthetic":
        root = Path(str(cfg.data.root))
        if not (root / "manifest.json").exists():
            from data_modules.synthetic import make_synthetic

            s = cfg.data.synthetic
            log.info("writing the synthetic set (%d samples) to %s", s.n, root)
            make_synthetic(str(root), n=int(s.n), seed=int(s.seed), image_size=int(s.image_size))
    for i, src in enumerate(cfg.data.train or []):
        _check_urls(src["urls"], f"data.train[{i}].urls", expand_urls)
    for key in ("val", "test"):
        if cfg.data.get(key):
            _check_urls(cfg.data[key], f"data.{key}", expand_urls)


def _check_urls(spec, key, expand_urls) -> None:
    try:
        urls = expand_urls(spec)
    except FileNotFoundError:
        urls = []
    if not urls:
        raise ConfigError(
            f"no shards match {key}={spec!r}: write them with `python -m data_modules.convert` "
            f"(or stage=extract) and set data.root / {key}"
        )


def build_datamodule(cfg, module):
    from lit_modules.resume import ResumableDataModule

    d = cfg.data
    dm = ResumableDataModule(
        train=[dict(s) for s in container(d.train)] if d.get("train") else None,
        val=d.get("val"),
        test=d.get("test"),
        batch_size=int(d.batch_size),
        num_workers=int(d.num_workers),
        image_size=int(cfg.model.image_size),
        shuffle_buffer=int(d.shuffle_buffer),
        samples_per_epoch=d.get("samples_per_epoch"),
        max_skip_fraction=float(d.max_skip_fraction),
        seed=int(cfg.seed),
        load_images=module.needs_images,
    )
    dm.collate_fn = module.collate
    dm.eval_collate_fn = module.eval_collate
    dm.eval_batch_size = int(d.get("eval_batch_size") or d.batch_size)
    return dm


# ----------------------------------------------------------------------------------------------------
# loggers


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def wandb_run_id(out: Path) -> str | None:
    """The id of the W&B run an earlier (crashed) job wrote in `out`, so that a resumed job continues it."""
    runs = sorted(out.glob("wandb/*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def build_loggers(cfg, out: Path, resume: bool = False):
    loggers = []
    lcfg = cfg.get("logger") or {}
    if lcfg.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        w = lcfg.wandb
        mode = wandb_mode(str(w.mode))
        run_id = wandb_run_id(out) if resume else None
        extra = {"id": run_id, "resume": "allow"} if run_id else {}
        loggers.append(
            WandbLogger(
                project=w.project,
                entity=w.get("entity"),
                name=f"{cfg.task_name}-{out.name}",
                group=w.get("group"),
                tags=list(w.get("tags") or []),
                save_dir=str(out),
                offline=mode == "offline",
                mode=mode if mode == "disabled" else None,
                config=container(cfg),
                **extra,
            )
        )
    if lcfg.get("csv"):
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(save_dir=str(out), name=lcfg.csv.get("name", "csv"), version=""))
    return loggers


def finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------------
# stages


def build_module(cfg):
    return build_module_from_plain(container(cfg))


def build_module_from_plain(plain: dict):
    """The stage's LightningModule from a plain (resolved) config dict, e.g. a checkpoint's hyper_parameters."""
    from lit_modules.bidiffuser_module import BiDiffuserModule
    from lit_modules.easygen_module import EasyGenModule

    if plain["stage"].get("module") == "bidiffuser":
        return BiDiffuserModule(plain)
    return EasyGenModule(plain)


def build_callbacks(cfg, has_logger: bool = True) -> list:
    from hydra.utils import instantiate

    out = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if c is None or "_target_" not in c:
            continue
        if not has_logger and c["_target_"].endswith("LearningRateMonitor"):
            continue  # it needs a logger to write to
        if name == "model_checkpoint" and not cfg.stage.get("monitor"):
            c = OmegaConf.merge(c, {"monitor": None, "mode": "min"})
        out.append(instantiate(c))
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True):
        from callbacks.progress import StepProgressBar

        out.append(StepProgressBar())  # `Step N/max_steps`; Lightning's own shows `Epoch 3/-2` here
    return out


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder with both its tensor index and its metadata."""
    from lit_modules.strategies import is_sharded_checkpoint

    return path.is_file() or is_sharded_checkpoint(path)


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at (its metadata, not its file name)."""
    from lit_modules.strategies import META_FILENAME

    meta = path / META_FILENAME if path.is_dir() else path
    return int(torch.load(meta, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def resolve_ckpt(ckpt_path, out: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        folder = out / "checkpoints"
        # `.last.ckpt.old` is the previous sharded checkpoint when a crash hit the swap of a newer one
        found = [
            p for p in [*folder.glob("last*.ckpt"), *folder.glob(".last*.ckpt.old")] if complete_checkpoint(p)
        ]
        if not found:
            raise ConfigError(
                f"ckpt_path=last but {folder} has no complete last.ckpt: set ckpt_path=/path/to.ckpt"
            )
        return str(max(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime)))
    if not Path(str(ckpt_path)).exists():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist: set ckpt_path to a checkpoint file or `last`"
        )
    return str(ckpt_path)


# settings that decide the model's parameters and optimizer groups: a checkpoint resumes only under the same
RESUME_KEYS = ("model.", "lora.", "stage.module", "stage.train_llm", "stage.train_lm_head", "stage.objective",
               "stage.freeze_unused_heads", "stage.train_caption_decoder")


def check_resume(cfg, ckpt: str) -> None:
    """Resuming under other model, LoRA or trainable-part settings than the checkpoint was saved with fails
    deep inside the optimizer's state loading; say which settings differ instead, and how to restore them."""
    from lit_modules.recipe import differences, flatten
    from lit_modules.strategies import META_FILENAME

    path = Path(ckpt)
    meta = torch.load(path / META_FILENAME if path.is_dir() else path, map_location="cpu", weights_only=False,
                      mmap=True)
    saved = (meta.get("hyper_parameters") or {}).get("cfg")
    if not saved:
        return

    def flat(c):
        return {k: v for k, v in flatten(c).items() if k.startswith(RESUME_KEYS)}

    diff = differences(flat(saved), json.loads(json.dumps(flat(container(cfg)), default=str)))
    if diff:
        raise ConfigError(
            f"ckpt_path={ckpt} was saved with other settings than this run has: {'; '.join(diff)}. "
            "Resume with the overrides the run was started with (e.g. lora=on), or start a new run"
        )


def trainer_kwargs(cfg) -> dict:
    t = container(cfg.trainer)
    t.pop("_target_", None)
    t.pop("global_batch_size", None)  # not a Trainer argument: batch_plan turns it into accumulation
    max_steps = int(t.get("max_steps", -1))
    every = cfg.stage.get("val_every")
    if max_steps > 0 and t.get("val_check_interval") is None:
        # validate on step counts that divide max_steps, so the last step is always evaluated
        every = min(int(every or max_steps), max_steps)
        while max_steps % every:
            every += 1
        t["val_check_interval"] = every
        t["check_val_every_n_epoch"] = None
    elif t.get("check_val_every_n_epoch") is None and t.get("val_check_interval") is None:
        t["check_val_every_n_epoch"] = 1
    return t


def check_cluster(trainer_cfg) -> None:
    """Under SLURM (sbatch/srun or `hydra/launcher=submitit_slurm`) one task runs each device: the
    allocation must match trainer.devices and trainer.num_nodes, or ranks would wait for each other forever."""
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE")
    if (
        tasks
        and "SLURM_JOB_ID" in os.environ
        and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    ):
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
    """(global batch, gradient accumulation) for this world size. With `trainer.global_batch_size` set,
    accumulation is derived from it (global = per-device batch x world size x accumulation), so the same
    command keeps its global batch on 1 or 64 devices; otherwise `trainer.accumulate_grad_batches` holds."""
    per_device = int(cfg.data.batch_size)
    target = cfg.trainer.get("global_batch_size")
    if target is None:
        accumulate = int(cfg.trainer.accumulate_grad_batches)
        return per_device * world * accumulate, accumulate
    target = int(target)
    if target % (per_device * world):
        raise ConfigError(
            f"trainer.global_batch_size={target} is not a multiple of data.batch_size={per_device} x {world} "
            f"devices: change one of them (global = per-device batch x devices x accumulation)"
        )
    return target, target // (per_device * world)


def train_stage(cfg) -> dict:
    import lightning.pytorch as pl

    from easygen.checkpoint import loaded_weights
    from lit_modules.strategies import build_strategy

    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    check_cluster(cfg.trainer)
    strategy = build_strategy(cfg.strategy, cfg.trainer)
    ensure_data(cfg)
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), out)
    if ckpt:
        check_resume(cfg, ckpt)
    module = build_module(cfg)
    dm = build_datamodule(cfg, module)
    loggers = build_loggers(cfg, out, resume=ckpt is not None)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    trainer = pl.Trainer(
        **trainer_kwargs(cfg),
        strategy=strategy,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(out),
    )
    world = trainer.world_size
    global_batch, accumulate = batch_plan(cfg, world)
    trainer.accumulate_grad_batches = accumulate
    if trainer.is_global_zero:
        log.info(
            "stage=%s global batch %d = %d per device x %d devices x %d accumulation (strategy=%s)%s",
            cfg.stage.name,
            global_batch,
            cfg.data.batch_size,
            world,
            accumulate,
            cfg.strategy.name,
            f"; resuming from {ckpt}" if ckpt else "",
        )
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    artifacts = module.export_artifacts(out)  # every rank: gathers sharded weights
    metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
    # the learning rate of each parameter group as the optimizer was built (before the schedule scales it)
    optimizer_lr = {g.get("name", str(i)): float(g.get("initial_lr", g["lr"]))
                    for o in trainer.optimizers for i, g in enumerate(o.param_groups)}
    ckpt_cb = trainer.checkpoint_callback
    best = {}
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None and ckpt_cb.monitor:
        best[ckpt_cb.monitor] = _scalar(ckpt_cb.best_model_score)
    return {
        "global_step": int(trainer.global_step),
        "global_batch": global_batch,
        "accumulate_grad_batches": accumulate,
        "world_size": world,
        "resumed_from": ckpt,
        "optimizer_lr": optimizer_lr,
        "loaded": loaded_weights(module),
        "metrics": metrics,
        "best": best,
        "checkpoints": {
            "best": getattr(ckpt_cb, "best_model_path", None) or None,
            "last": getattr(ckpt_cb, "last_model_path", None) or None,
        },
        "artifacts": artifacts,
        "train_seconds": round(time.time() - t0, 2),
        "is_global_zero": trainer.is_global_zero,
    }


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().cpu().item())
    return float(v)


def run_stage(cfg) -> dict:
    """Run the configured stage and write results.json; returns the results dict."""
    from lit_modules.log_setup import single_handler

    single_handler()  # Lightning's own console handler would print every record a second time
    validate(cfg)
    kind = cfg.stage.kind
    if kind == "train":
        res = train_stage(cfg)
    elif kind == "extract":
        from lit_modules.extract import extract_stage

        res = extract_stage(cfg)
    elif kind == "eval":
        from lit_modules.evaluate import eval_stage

        res = eval_stage(cfg)
    elif kind == "chat":
        from lit_modules.chat_stage import chat_stage

        res = chat_stage(cfg)
    elif kind == "all":
        from lit_modules.recipe import run_all

        res = run_all(cfg)
    else:
        raise ConfigError(f"unknown stage.kind={kind!r}")
    results = {
        "stage": str(cfg.stage.name),
        "choices": hydra_choices(),
        "output_dir": str(output_dir(cfg)),
        **res,
    }
    global _IS_GLOBAL_ZERO
    _IS_GLOBAL_ZERO = results.pop("is_global_zero", True)
    if _IS_GLOBAL_ZERO:
        write_results(output_dir(cfg), results)
    return results


_IS_GLOBAL_ZERO = True  # of the last run_stage: the other ranks print no summary


def write_results(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


def print_summary(results: dict) -> None:
    if not _IS_GLOBAL_ZERO:
        return
    print(f"\n[easygen] stage={results['stage']} finished; outputs in {results['output_dir']}")
    metrics = dict(results.get("metrics") or {})
    metrics.update({f"best {k}": v for k, v in (results.get("best") or {}).items()})
    for k in sorted(metrics):
        v = metrics[k]
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    if results.get("checkpoints"):
        for k, v in results["checkpoints"].items():
            if v:
                print(f"  checkpoint ({k}): {v}")
