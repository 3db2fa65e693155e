"""AdamW with a cosine schedule and linear warmup (SPEC §5), with the projector in its own parameter
group so that it can have its own learning rate (LLaVA's `create_optimizer`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    """LR multiplier: linear from 0 over the warmup, then cosine down to ``min_lr_ratio``."""
    total_steps = max(1, int(total_steps))
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim_cfg: dict, total_steps: int):
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        cosine_with_warmup(total_steps, float(optim_cfg.get("warmup_ratio", 0.0)), float(optim_cfg.get("min_lr_ratio", 0.0))),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

