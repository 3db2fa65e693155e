"""BiDiffuser sampling: i2t, t2i and joint generation with DPM-Solver++ and classifier-free guidance.

Follows UniDiffuser's ``sample_multi_v1.py`` (Bao et al. 2023, Sec. 4.2): the conditioning modality is clean
(t = 0); guidance is "true_uncond": the unconditional prediction comes from the same network with the
conditioning modality replaced by fresh Gaussian noise at t = N (fully noised), and
``guided = cond + s * (cond - uncond)`` (s = 7 in EasyGen). The conditional and unconditional forwards run as
one batch. All noise comes from ``generator`` (on the model's device), so a fixed seed gives a fixed output.
v1 always uses data_type 1.

``shared_noise=True`` starts every sample of the batch from the same noise (and guides it with the same
unconditional noise): the DPM-Solver++ path is deterministic given its start, so a sample's output then
depends on its condition only, not on the batch it is in, its position there or the process that ran it.
Feature extraction wants exactly that: the features of two pictures differ because the pictures differ,
not because their noise did, and re-batching or sharding the extraction gives the same features.
"""

from __future__ import annotations

import torch

from .dpm_solver import DPMSolverPP
from .schedule import NoiseSchedule
from .uvit import UViT

DATA_TYPE = 1


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None, shared: bool = False) -> torch.Tensor:
    """Gaussian noise of ``shape``; ``shared``: one draw for the leading (batch) dimension, repeated."""
    if shared:
        one = torch.randn((1, *shape[1:]), generator=generator, device=like.device, dtype=like.dtype)
        return one.expand(*shape).contiguous()
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _solve(model_fn, schedule, x, steps, order, method, **solver_kwargs) -> torch.Tensor:
    return DPMSolverPP(model_fn, schedule).sample(x, steps=steps, order=order, method=method, **solver_kwargs)


@torch.no_grad()
def sample_i2t(
    uvit: UViT,
    schedule: NoiseSchedule,
    z: torch.Tensor,
    clip_img: torch.Tensor,
    *,
    steps: int = 50,
    order: int = 3,
    method: str = "fast",
    cfg_scale: float = 7.0,
    generator: torch.Generator | None = None,
    shared_noise: bool = False,
    **solver_kwargs,
) -> torch.Tensor:
    """Text latent y [B, L, text_dim] for clean image latents z [B,4,h,w] and CLIP image embeds [B,1,D]."""
    B, N = z.shape[0], schedule.num_steps
    cfg = uvit.config
    y = _randn((B, cfg.num_text_tokens, cfg.text_dim), z, generator, shared_noise)
    zeros = torch.zeros(B, device=z.device)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_text = t * N
        if cfg_scale == 0:
            return uvit(z, clip_img, x, zeros, t_text, DATA_TYPE)[2]
        z_noise = _randn(z.shape, z, generator, shared_noise)
        clip_noise = _randn(clip_img.shape, clip_img, generator, shared_noise)
        _, _, out = uvit(
            torch.cat([z, z_noise]),
            torch.cat([clip_img, clip_noise]),
            torch.cat([x, x]),
            torch.cat([zeros, torch.full_like(zeros, N)]),
            torch.cat([t_text, t_text]),
            DATA_TYPE,
        )
        cond, uncond = out.chunk(2)
        return cond + cfg_scale * (cond - uncond)

    return _solve(model_fn, schedule, y, steps, order, method, **solver_kwargs)


def _pack(z: torch.Tensor, clip_img: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.flatten(1), clip_img.flatten(1)], dim=1)


def _unpack(x: torch.Tensor, img_shape, clip_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    z, c = x.split([x.shape[1] - clip_dim, clip_dim], dim=1)
    return z.reshape(x.shape[0], *img_shape), c.reshape(x.shape[0], 1, clip_dim)


@torch.no_grad()
def sample_t2i(
    uvit: UViT,
    schedule: NoiseSchedule,
    text: torch.Tensor,
    *,
    img_shape: tuple[int, int, int],
    steps: int = 50,
    order: int = 3,
    method: str = "fast",
    cfg_scale: float = 7.0,
    generator: torch.Generator | None = None,
    shared_noise: bool = False,
    **solver_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image latents z [B, *img_shape] and CLIP image embeds [B,1,D] for clean text latents [B, L, text_dim]."""
    B, N, D = text.shape[0], schedule.num_steps, uvit.config.clip_img_dim
    x0 = _pack(
        _randn((B, *img_shape), text, generator, shared_noise), _randn((B, 1, D), text, generator, shared_noise)
    )
    zeros = torch.zeros(B, device=text.device)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z, c = _unpack(x, img_shape, D)
        t_img = t * N
        if cfg_scale == 0:
            z_out, c_out, _ = uvit(z, c, text, t_img, zeros, DATA_TYPE)
            return _pack(z_out, c_out)
        z_out, c_out, _ = uvit(
            torch.cat([z, z]),
            torch.cat([c, c]),
            torch.cat([text, _randn(text.shape, text, generator, shared_noise)]),
            torch.cat([t_img, t_img]),
            torch.cat([zeros, torch.full_like(zeros, N)]),
            DATA_TYPE,
        )
        cond, uncond = _pack(z_out, c_out).chunk(2)
        return cond + cfg_scale * (cond - uncond)

    x = _solve(model_fn, schedule, x0, steps, order, method, **solver_kwargs)
    return _unpack(x, img_shape, D)


@torch.no_grad()
def sample_joint(
    uvit: UViT,
    schedule: NoiseSchedule,
    batch: int,
    *,
    img_shape: tuple[int, int, int],
    steps: int = 50,
    order: int = 3,
    method: str = "fast",
    cfg_scale: float = 7.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **solver_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint (z, clip_img, y) with shared t for both modalities; guidance pairs each modality with the other's
    noise at t = N (UniDiffuser's joint sampler)."""
    cfg = uvit.config
    N, D = schedule.num_steps, cfg.clip_img_dim
    L, T = cfg.num_text_tokens, cfg.text_dim
    if device is None:
        device = generator.device if generator is not None else next(uvit.parameters()).device
    like = torch.empty(0, device=device, dtype=dtype or next(uvit.parameters()).dtype)
    n_img = int(torch.Size(img_shape).numel()) + D
    x0 = torch.cat(
        [_randn((batch, n_img), like, generator), _randn((batch, L * T), like, generator)],
        dim=1,
    )

    def split(x):
        img, text = x.split([n_img, L * T], dim=1)
        z, c = _unpack(img, img_shape, D)
        return z, c, text.reshape(-1, L, T)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z, c, y = split(x)
        tn = t * N
        if cfg_scale == 0:
            z_out, c_out, y_out = uvit(z, c, y, tn, tn, DATA_TYPE)
            return torch.cat([_pack(z_out, c_out), y_out.flatten(1)], dim=1)
        full = torch.full_like(tn, N)
        z_n, c_n, y_n = (
            _randn(z.shape, z, generator),
            _randn(c.shape, c, generator),
            _randn(y.shape, y, generator),
        )
        # Rows: joint | text given pure-noise image (text's uncond) | image given pure-noise text (image's uncond).
        z_out, c_out, y_out = uvit(
            torch.cat([z, z_n, z]),
            torch.cat([c, c_n, c]),
            torch.cat([y, y, y_n]),
            torch.cat([tn, full, tn]),
            torch.cat([tn, tn, full]),
            DATA_TYPE,
        )
        z_j, z_u = z_out.chunk(3)[0], z_out.chunk(3)[2]
        c_j, c_u = c_out.chunk(3)[0], c_out.chunk(3)[2]
        y_j, y_u = y_out.chunk(3)[0], y_out.chunk(3)[1]
        cond = torch.cat([_pack(z_j, c_j), y_j.flatten(1)], dim=1)
        uncond = torch.cat([_pack(z_u, c_u), y_u.flatten(1)], dim=1)
        return cond + cfg_scale * (cond - uncond)

    return split(_solve(model_fn, schedule, x0, steps, order, method, **solver_kwargs))
