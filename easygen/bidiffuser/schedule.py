"""The Stable Diffusion / UniDiffuser noise schedule, discrete for training and continuous for sampling.

Training uses the discrete DDPM forward process ``x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps`` (Ho et al.
2020, Eq. 4) with "scaled linear" betas ``linspace(0.00085**0.5, 0.012**0.5, 1000)**2`` and index n in
1..1000 (UniDiffuser's convention: n is Stable Diffusion's n - 1). The sampler sees the same schedule as a
continuous VP SDE on t in (0, 1] built like DPM-Solver's ``NoiseScheduleVP('discrete')`` (Lu et al. 2022,
App. D): t_n = n / 1000 and log alpha_t linearly interpolated between those knots, so that feeding the network
t * 1000 reproduces the training index at every knot.
"""

from __future__ import annotations

import torch


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp increasing, extrapolated linearly past both ends."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class NoiseSchedule:
    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000):
        self.num_steps = N = num_steps
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=torch.float64) ** 2
        # Index n: betas[n] and alphas_cumprod[n] for n in 1..N; index 0 is the clean data (beta 0, abar 1).
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.t_array = torch.arange(1, N + 1, dtype=torch.float64) / N
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod[1:])
        self.T = 1.0

    # Discrete (training) side.

    def sample_timesteps(
        self,
        batch: int,
        shared: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Uniform training indices n in [1, N]; ``shared`` draws one n for the whole batch (reference code)."""
        draw_device = generator.device if generator is not None else device
        n = torch.randint(
            1, self.num_steps + 1, (1 if shared else batch,), generator=generator, device=draw_device
        )
        if device is not None:
            n = n.to(device)
        return n.expand(batch) if shared else n

    def add_noise(self, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) noise, per sample (n: [B] long in 0..N)."""
        n = torch.as_tensor(n)
        if n.dtype.is_floating_point or n.min() < 0 or n.max() > self.num_steps:
            raise ValueError(f"add_noise expects integer indices in [0, {self.num_steps}], got {n}")
        abar = self.alphas_cumprod[n.cpu()].to(device=x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = abar.sqrt().to(x0.dtype).view(shape)
        s = (1.0 - abar).sqrt().to(x0.dtype).view(shape)
        return a * x0 + s * noise

    # Continuous (sampler) side, t in (0, 1]; all float64.

    def marginal_log_mean_coeff(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return _interp(t.reshape(-1), self.t_array, self.log_alpha_array).reshape(t.shape)

    def marginal_alpha(self, t) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t) -> torch.Tensor:
        """Half log-SNR: log(alpha_t / sigma_t)."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lambda(self, lamb) -> torch.Tensor:
        lamb = torch.as_tensor(lamb, dtype=torch.float64)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        t = _interp(log_alpha.reshape(-1), self.log_alpha_array.flip(0), self.t_array.flip(0))
        return t.reshape(lamb.shape)
