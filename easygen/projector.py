"""The projector between BiDiffuser and the LLM (SPEC §4).

``Linear(768, 3072) -> GELU -> Linear(3072, H)`` applied per position: each of the 77 rows of the
i2t feature (``decode_prefix`` of the sampled text latent, 77x768) becomes one soft token of the
LLM's width H (4096 for Vicuna-7B).
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int = 768, hidden_dim: int = 3072, out_dim: int = 4096):
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects features [..., {self.in_dim}], got {tuple(features.shape)}")
        return self.fc2(self.act(self.fc1(features)))
