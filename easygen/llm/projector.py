"""The projector between BiDiffuser and the LLM (the paper's LLM side).

``Linear(768, 3072) -> GELU -> Linear(3072, H)`` applied per position: each of the 77 rows of the
i2t feature (``decode_prefix`` of the sampled text latent, 77x768) becomes one soft token of the
LLM's width H (4096 for Vicuna-7B).

Optionally (``standardize_tokens=L``) the features are first standardised per (position, channel) with
the mean and standard deviation of the training features (``fit_standardizer``), kept as buffers so that
checkpoints and exports carry them. Features of a BiDiffuser trained only briefly (the tiny preset) vary
from picture to picture by a tenth of their common component; standardised, the variation that carries
the picture is what the projector sees.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(
        self, in_dim: int = 768, hidden_dim: int = 3072, out_dim: int = 4096, standardize_tokens: int = 0
    ):
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.standardize_tokens = int(standardize_tokens)
        if self.standardize_tokens:
            self.register_buffer("feature_mean", torch.zeros(self.standardize_tokens, in_dim))
            self.register_buffer("feature_std", torch.ones(self.standardize_tokens, in_dim))
            # 1 once fit_standardizer ran (or a checkpoint with fitted statistics was loaded)
            self.register_buffer("feature_fitted", torch.zeros(()))
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    @property
    def needs_fit(self) -> bool:
        return bool(self.standardize_tokens) and float(self.feature_fitted) == 0.0

    @staticmethod
    @torch.no_grad()
    def standardizer_statistics(
        features: torch.Tensor, eps: float = 1e-3
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per (position, channel) of features ``[N, L, C]`` in float64; a channel's std is
        floored at ``eps`` times the mean std, so that constant channels are not blown up."""
        f = features.double()
        std = f.std(0)
        return f.mean(0), std.clamp_min(eps * float(std.mean()))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Install fitted statistics (``[L, in_dim]`` each), e.g. read back from a cache file."""
        if not self.standardize_tokens:
            raise ValueError("this projector was built without standardize_tokens")
        expected = (self.standardize_tokens, self.in_dim)
        for name, t in (("mean", mean), ("std", std)):
            if tuple(t.shape) != expected:
                raise ValueError(f"standardiser {name} must have shape {expected}, got {tuple(t.shape)}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.feature_fitted.fill_(1.0)

    @torch.no_grad()
    def fit_standardizer(self, features: torch.Tensor, eps: float = 1e-3) -> None:
        """Set the statistics from training features ``[N, L, in_dim]`` (``standardizer_statistics``)."""
        if not self.standardize_tokens:
            raise ValueError("this projector was built without standardize_tokens")
        expected = (self.standardize_tokens, self.in_dim)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected or features.shape[0] < 2:
            raise ValueError(
                f"fit_standardizer expects features [N >= 2, {expected[0]}, {expected[1]}], "
                f"got {tuple(features.shape)}"
            )
        self.set_statistics(*self.standardizer_statistics(features, eps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects features [..., {self.in_dim}], got {tuple(features.shape)}")
        if self.standardize_tokens:
            if features.shape[-2] != self.standardize_tokens:
                raise ValueError(
                    f"projector standardises {self.standardize_tokens} feature positions, got "
                    f"features {tuple(features.shape)}"
                )
            features = (features - self.feature_mean.to(features.dtype)) / self.feature_std.to(features.dtype)
        out = self.fc2(self.act(self.fc1(features)))
        # nn.Linear on a [..., L, C] input returns a view of its 2-D product; under FSDP2 the projector is
        # a unit of its own (easygen/lit/fsdp.py) and a view as a unit's output can lose the pre-backward
        # hook to a later in-place op, so a tensor of its own is returned (same values)
        return out.clone() if out._base is not None else out
