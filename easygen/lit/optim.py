"""AdamW with a cosine schedule and linear warmup (the paper's training recipe), with the projector in its
own parameter
group so that it can have its own learning rate (LLaVA's `create_optimizer`).

The schedule is transformers' ``get_cosine_schedule_with_warmup`` (``get_cosine_with_min_lr_schedule_with_warmup``
when ``optim.min_lr_ratio`` > 0), with ``ceil(total_steps * warmup_ratio)`` warmup steps as the HF Trainer that
LLaVA trains with computes them (``TrainingArguments.get_warmup_steps``): the multiplier rises linearly from 0
at step 0 to 1 at the end of the warmup, then follows a half cosine down to ``min_lr_ratio`` at ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from easygen.errors import ConfigError


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps for a ratio of the run, rounded up (``TrainingArguments.get_warmup_steps``)."""
    return int(math.ceil(int(total_steps) * float(warmup_ratio)))


def _check_schedule(warmup_ratio: float, min_lr_ratio: float) -> None:
    if not 0.0 <= float(warmup_ratio) <= 1.0:
        raise ConfigError(f"optim.warmup_ratio={warmup_ratio}: set it to a fraction of the run in [0, 1]")
    if not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={min_lr_ratio}: set it to a fraction of optim.lr in [0, 1]")


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cosine schedule with linear warmup (and a floor at ``min_lr_ratio`` of each group's lr)."""
    _check_schedule(warmup_ratio, min_lr_ratio)
    total_steps = max(1, int(total_steps))  # a run without optimizer steps still builds its optimizer
    # Imported here: transformers.optimization pulls in the Trainer's modules, which takes seconds.
    from transformers.optimization import (
        get_cosine_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    warmup = warmup_steps(total_steps, warmup_ratio)
    if float(min_lr_ratio) > 0.0:
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total_steps, min_lr_rate=float(min_lr_ratio)
        )
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    """The LR multiplier of :func:`cosine_schedule` as a function of the step."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return cosine_schedule(probe, total_steps, warmup_ratio, min_lr_ratio).lr_lambdas[0]


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], optim_cfg: dict, total_steps: int
):
    """Parameter groups: projector (own lr when ``projector_lr`` is set), decayed weights, no-decay
    (biases, norms). Only parameters that require grad are optimised."""
    lr = float(optim_cfg["lr"])
    projector_lr = optim_cfg.get("projector_lr")
    projector_lr = lr if projector_lr is None else float(projector_lr)
    wd = float(optim_cfg.get("weight_decay", 0.0))
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": wd, "lr": lr, "name": "decay"},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr, "name": "no_decay"},
        "projector": {"params": [], "weight_decay": wd, "lr": projector_lr, "name": "projector"},
    }
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if "projector" in name.split("."):
            groups["projector"]["params"].append(p)
        elif p.ndim < 2:
            groups["no_decay"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    param_groups = [g for g in groups.values() if g["params"]]
    if not param_groups:
        raise ValueError("nothing to train: every parameter is frozen (check stage.* and lora.* settings)")
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim_cfg.get("betas", (0.9, 0.999))))
    sched = cosine_schedule(
        opt, total_steps, float(optim_cfg.get("warmup_ratio", 0.0)), float(optim_cfg.get("min_lr_ratio", 0.0))
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
