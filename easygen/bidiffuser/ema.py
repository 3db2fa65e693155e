"""Exponential moving average of model parameters (EasyGen/UniDiffuser keep ``nnet_ema`` at rate 0.9999).

``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step; buffers are copied, not
averaged (the U-ViT has none). The shadows live in ``EMA.module``, a frozen copy of the model, so the
averaged network runs as it is (validation captions, export through ``save_uvit``) and is sharded the
same way as the live one. Shadows of low-precision parameters are kept in fp32 so that updates of size
(1 - decay) * param are not rounded away in bf16.

With ``warmup`` the decay of update ``n`` (0-based) is ``min(decay, (1 + n) / (10 + n))``, the usual
schedule that lets the average leave its starting point in short runs; the reference uses a constant rate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a sharded (DTensor) parameter; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """The moving average of ``model``'s parameters, held as a frozen module copy (``EMA.module``)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.module.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return dict(self.module.named_parameters())

    def decay_at(self, num_updates: int) -> float:
        """The decay used by update number ``num_updates`` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        shadow = self.shadow
        if params.keys() != shadow.keys():
            missing = sorted(shadow.keys() - params.keys())
            extra = sorted(params.keys() - shadow.keys())
            raise KeyError(f"EMA does not match the model: missing {missing}, unexpected {extra}")
        return [(shadow[k], params[k]) for k in shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the average towards ``model``'s parameters; returns the decay that was used."""
        decay = self.decay_at(self.num_updates)
        floats, sources = [], []
        for s, p in self._pairs(model):
            s_local, p_local = _local(s), _local(p.detach())
            if s_local.is_floating_point():
                floats.append(s_local)
                sources.append(p_local.to(s_local.dtype))
            else:
                s_local.copy_(p_local)
        if floats:
            torch._foreach_lerp_(floats, sources, 1.0 - decay)
        for (_, sb), (_, mb) in zip(self.module.named_buffers(), model.named_buffers()):
            _local(sb).copy_(_local(mb))
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in self._pairs(model):
            _local(p).copy_(_local(s).to(p.dtype))

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow, own = state["shadow"], self.shadow
        if shadow.keys() != own.keys():
            missing = sorted(own.keys() - shadow.keys())
            extra = sorted(shadow.keys() - own.keys())
            raise KeyError(f"EMA state does not match: missing {missing}, unexpected {extra}")
        for k, v in shadow.items():
            if v.shape != own[k].shape:
                raise ValueError(
                    f"EMA state {k!r}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}"
                )
            own[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state.get("num_updates", self.num_updates))
