"""The optimizer's LR schedule equals transformers' cosine-with-warmup schedules, step by step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from easygen.errors import ConfigError
from easygen.lit.optim import build_optimizer, cosine_with_warmup

CONF = Path(__file__).resolve().parents[1] / "conf"

# (total steps, warmup ratio, min lr ratio)
COMBOS = [
    (100, 0.04, 0.0),
    (37, 0.1, 0.0),
    (10, 0.0, 0.0),
    (1, 0.5, 0.0),
    (7, 1.0, 0.0),
    (250, 0.03, 0.1),
    (50, 0.2, 0.5),
]


def _hf_formula(step: int, total: int, warmup: int, min_rate: float) -> float:
    """transformers' documented schedule: linear 0 -> 1 over the warmup, then a half cosine to min_rate."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, min_rate + (1.0 - min_rate) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _model():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.body = torch.nn.Linear(3, 4)
    model.projector = torch.nn.Linear(4, 2)
    return model


@pytest.mark.parametrize("total,ratio,min_ratio", COMBOS)
def test_schedule_equals_transformers_every_step(total, ratio, min_ratio):
    from transformers.optimization import (
        get_cosine_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    cfg = {"lr": 2e-3, "projector_lr": 5e-4, "warmup_ratio": ratio, "min_lr_ratio": min_ratio}
    built = build_optimizer(_model().named_parameters(), cfg, total)
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "step"

    # transformers on its own optimizer, warmup steps rounded up as the HF Trainer does.
    warmup = math.ceil(total * ratio)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if min_ratio > 0:
        ref = get_cosine_with_min_lr_schedule_with_warmup(ref_opt, warmup, total, min_lr_rate=min_ratio)
    else:
        ref = get_cosine_schedule_with_warmup(ref_opt, warmup, total)
    fn = cosine_with_warmup(total, ratio, min_ratio)

    for step in range(total + 2):
        mult = ref.get_last_lr()[0]
        assert mult == pytest.approx(_hf_formula(step, total, warmup, min_ratio), abs=1e-12), step
        assert fn(step) == mult
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["decay"] == pytest.approx(2e-3 * mult, rel=1e-12, abs=1e-18), step
        assert lrs["no_decay"] == pytest.approx(2e-3 * mult, rel=1e-12, abs=1e-18), step
        assert lrs["projector"] == pytest.approx(5e-4 * mult, rel=1e-12, abs=1e-18), step
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()


def test_config_keys_and_errors():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "adamw.yaml"))
    built = build_optimizer(_model().named_parameters(), cfg, 100)
    sched = built["lr_scheduler"]["scheduler"]
    # warmup_ratio 0.04 of 100 steps: 4 warmup steps, step 2 is halfway up.
    assert sched.lr_lambdas[0](2) == pytest.approx(0.5)
    assert sched.lr_lambdas[0](4) == pytest.approx(1.0)
    assert sched.lr_lambdas[0](100) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        build_optimizer(_model().named_parameters(), {**cfg, "warmup_ratio": 1.5}, 100)
    with pytest.raises(ConfigError, match="optim.min_lr_ratio"):
        build_optimizer(_model().named_parameters(), {**cfg, "min_lr_ratio": -0.1}, 100)
