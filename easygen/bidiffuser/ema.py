"""Exponential moving average of model parameters (EasyGen/UniDiffuser keep ``nnet_ema`` at rate 0.9999).

``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step; buffers are not averaged (the
U-ViT has none). Shadows of low-precision parameters are kept in fp32 so that updates of size
(1 - decay) * param are not rounded away in bf16.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: self._fp32(p).detach().clone() for name, p in model.named_parameters()
        }

    @staticmethod
    def _fp32(p: torch.Tensor) -> torch.Tensor:
        return p.float() if p.is_floating_point() else p

    def _check(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise KeyError(f"EMA does not match the model: missing {missing}, unexpected {extra}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in self._check(model).items():
            s = self.shadow[name]
            if s.is_floating_point():
                s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)
            else:
                s.copy_(p)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in self._check(model).items():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self.shadow.keys())
            raise KeyError(f"EMA state does not match: missing {missing}, unexpected {extra}")
        for k, v in shadow.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(
                    f"EMA state {k!r}: expected shape {tuple(self.shadow[k].shape)}, got {tuple(v.shape)}"
                )
            self.shadow[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
