"""The W&B logger `conf/logger/wandb.yaml` instantiates: offline unless W&B is set up on this machine
(`mode: auto`), and a resumed run (`ckpt_path=` set) continues the W&B run its crashed job wrote."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_mode(mode: str) -> str:
    """`auto`: `WANDB_MODE` if set, online with an API key or a netrc login, otherwise offline."""
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


def wandb_run_id(save_dir: str | os.PathLike) -> str | None:
    """The id of the W&B run an earlier (crashed) job wrote under `save_dir`."""
    runs = sorted(Path(save_dir).glob("wandb/*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def wandb_logger(save_dir: str, name: str, mode: str = "auto", resume_from: str | None = None,
                 run_name: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger named `<name>-<run folder>` (or `run_name` as it is: `stage=all` names each stage's run
    after its stage, grouped under the recipe's run); `kwargs` go to it as they are (project, entity,
    group, tags, ...). With `resume_from` (the run's `ckpt_path`) the earlier W&B run in `save_dir` is
    continued."""
    mode = wandb_mode(str(mode))
    run_id = wandb_run_id(save_dir) if resume_from else None
    extra = {"id": run_id, "resume": "allow"} if run_id else {}
    logger = WandbLogger(
        name=run_name or f"{name}-{Path(save_dir).name}",
        save_dir=str(save_dir),
        offline=mode == "offline",
        mode=mode if mode == "disabled" else None,
        **kwargs,
        **extra,
    )
    # Lightning passes `anonymous=None` to wandb.init, and W&B warns about any value of that retired setting
    # ("The anonymous setting has no effect"): leave it out
    logger._wandb_init.pop("anonymous", None)
    return logger
