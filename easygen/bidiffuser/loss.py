"""Training objectives for the BiDiffuser U-ViT (noise prediction, DDPM's simple loss per modality).

Each objective is a function of (U-ViT, schedule, clean image latent z0, clean CLIP image embedding clip0,
clean text latent y0) returning ``{loss, loss_img, loss_text}``; ``bidiffuser_loss`` picks one by name
(``stage.objective``) for the training step (easygen/lit/bidiffuser_module.py):

- ``"bidiffuser"``, :func:`paper_loss`: the EasyGen paper's objective (Sec. 3.1);
- ``"reference"``, :func:`reference_loss`: what EasyGen's released training code optimises;
- ``"joint"``, :func:`joint_loss`: UniDiffuser's joint objective, which BiDiffuser fine-tunes from.

The image x is the pair (VAE latent z, CLIP image embedding c), noised with one index. Indices are drawn
per sample unless ``shared_timestep`` (one per batch, as the released code does).

``offset_noise`` (0 = off, the paper's): the VAE latent's noise gets, per sample and channel, a constant
drawn with that standard deviation added (Guttenberg's "offset noise"). With a schedule whose last index
keeps part of the picture (Stable Diffusion's, and so UniDiffuser's: sqrt(alpha_bar_T) = 0.068), a model
trained on white noise reads the mean of the start noise as the picture's overall colour; trained with the
offset it learns that a flat shift may be noise too, and the prompt decides the colour.
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule
from .uvit import UViT

DATA_TYPE = 1


def _per_sample_mse(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Mean square error over the concatenation of several tensors, averaged per sample then over the batch."""
    p = torch.cat([x.flatten(1) for x in pred], dim=1).float()
    t = torch.cat([x.flatten(1) for x in target], dim=1).float()
    return (p - t).pow(2).mean(dim=1).mean()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _draw(schedule: NoiseSchedule, z0: torch.Tensor, shared: bool, generator) -> torch.Tensor:
    return schedule.sample_timesteps(z0.shape[0], shared=shared, generator=generator, device=z0.device)


def _offset(eps_z: torch.Tensor, offset_noise: float, generator) -> torch.Tensor:
    """``eps_z`` plus a per-sample, per-channel constant of standard deviation ``offset_noise`` (module doc)."""
    if not offset_noise:
        return eps_z
    shift = torch.randn(eps_z.shape[:2], generator=generator, device=eps_z.device, dtype=eps_z.dtype)
    return eps_z + offset_noise * shift[(...,) + (None,) * (eps_z.dim() - 2)]


def _drop_condition(y0, zero, num_steps: int, cond_drop: float, generator):
    """The t2i rows' text input and its index: ``y0`` at 0, or for a ``cond_drop`` fraction of the rows (drawn
    per row) fresh noise at index ``num_steps`` (see :func:`paper_loss`)."""
    if not cond_drop:
        return y0, zero
    drop = torch.rand(y0.shape[0], generator=generator, device=y0.device) < cond_drop
    noise = _randn_like(y0, generator)
    y = torch.where(drop[:, None, None], noise, y0)
    return y, torch.where(drop, torch.full_like(zero, num_steps), zero)


def _noised(schedule, z0, clip0, y0, shared_timestep, generator, offset_noise: float = 0.0):
    """Indices for image and text (in this order), then the noise of z, c and y, and the noised triple."""
    n_img, n_text = (
        _draw(schedule, z0, shared_timestep, generator),
        _draw(schedule, z0, shared_timestep, generator),
    )
    eps = tuple(_randn_like(x, generator) for x in (z0, clip0, y0))
    eps = (_offset(eps[0], offset_noise, generator),) + eps[1:]
    z_n = schedule.add_noise(z0, n_img, eps[0])
    c_n = schedule.add_noise(clip0, n_img, eps[1])
    y_n = schedule.add_noise(y0, n_text, eps[2])
    return n_img, n_text, eps, (z_n, c_n, y_n)


def paper_loss(
    uvit: UViT,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    clip0: torch.Tensor,
    y0: torch.Tensor,
    *,
    alpha: float = 1.0,
    shared_timestep: bool = False,
    offset_noise: float = 0.0,
    cond_drop: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The EasyGen paper's BiDiffuser objective (Sec. 3.1), the two clean-condition conditionals:

        L = || eps_x - eps_hat_x(x_n, y_0, n, 0) ||^2 + alpha || eps_y - eps_hat_y(x_0, y_n, 0, n) ||^2

    text-to-image with clean text and image-to-text with the clean image, in one U-ViT call: rows [:B]
    are t2i (noisy image, clean text), rows [B:] i2t (clean image, noisy text).
    z0 [B,4,h,w] (scaled VAE latent), clip0 [B,1,D], y0 [B,L,text_dim].

    ``cond_drop`` (0 = off, the paper's): that fraction of the t2i rows sees, instead of its clean text, fresh
    Gaussian noise at index N, the unconditional input UniDiffuser's t2i sampler guides against
    (easygen/bidiffuser/sampling.py::sample_t2i); the paper's two conditionals alone never train it, so
    classifier-free guidance (``cfg_scale`` > 0) would subtract an untrained prediction."""
    n_img, n_text, (eps_z, eps_c, eps_y), (z_n, c_n, y_n) = _noised(
        schedule, z0, clip0, y0, shared_timestep, generator, offset_noise
    )
    B = z0.shape[0]
    zero = torch.zeros(B, dtype=torch.long, device=z0.device)
    y_cond, n_cond = _drop_condition(y0, zero, schedule.num_steps, cond_drop, generator)
    z_out, c_out, y_out = uvit(
        torch.cat([z_n, z0]),
        torch.cat([c_n, clip0]),
        torch.cat([y_cond, y_n]),
        torch.cat([n_img, zero]),
        torch.cat([n_cond, n_text]),
        DATA_TYPE,
    )
    loss_img = _per_sample_mse([z_out[:B], c_out[:B]], [eps_z, eps_c])
    loss_text = _per_sample_mse([y_out[B:]], [eps_y])
    return {"loss": loss_img + alpha * loss_text, "loss_img": loss_img, "loss_text": loss_text}


def reference_loss(
    uvit: UViT,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    clip0: torch.Tensor,
    y0: torch.Tensor,
    *,
    alpha: float = 1.0,
    shared_timestep: bool = False,
    clean_img_term: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """What EasyGen's released training code optimises: the image-to-text half only (clean image, noisy
    text), ``loss = loss_img + alpha * loss_text``, where ``loss_img`` is 0 or, with ``clean_img_term``,
    ``MSE(image latent output, 0)`` on the clean image (which had no noise added)."""
    n_text = _draw(schedule, z0, shared_timestep, generator)
    eps_y = _randn_like(y0, generator)
    y_n = schedule.add_noise(y0, n_text, eps_y)
    zero = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
    z_out, _, y_out = uvit(z0, clip0, y_n, zero, n_text, DATA_TYPE)
    loss_text = _per_sample_mse([y_out], [eps_y])
    if clean_img_term:
        loss_img = _per_sample_mse([z_out], [torch.zeros_like(z_out)])
    else:
        loss_img = torch.zeros((), device=z0.device)
    return {"loss": loss_img + alpha * loss_text, "loss_img": loss_img, "loss_text": loss_text}


def joint_loss(
    uvit: UViT,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    clip0: torch.Tensor,
    y0: torch.Tensor,
    *,
    shared_timestep: bool = False,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """UniDiffuser's joint objective: independent indices for image and text, one MSE over the concatenated
    noise prediction of z, c and y (no alpha). ``loss_img`` and ``loss_text`` are its two parts, for the log."""
    n_img, n_text, (eps_z, eps_c, eps_y), (z_n, c_n, y_n) = _noised(
        schedule, z0, clip0, y0, shared_timestep, generator, offset_noise
    )
    z_out, c_out, y_out = uvit(z_n, c_n, y_n, n_img, n_text, DATA_TYPE)
    return {
        "loss": _per_sample_mse([z_out, c_out, y_out], [eps_z, eps_c, eps_y]),
        "loss_img": _per_sample_mse([z_out, c_out], [eps_z, eps_c]).detach(),
        "loss_text": _per_sample_mse([y_out], [eps_y]).detach(),
    }


OBJECTIVES = {"bidiffuser": paper_loss, "reference": reference_loss, "joint": joint_loss}


def bidiffuser_loss(
    uvit: UViT,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    clip0: torch.Tensor,
    y0: torch.Tensor,
    *,
    objective: str = "bidiffuser",
    alpha: float = 1.0,
    shared_timestep: bool = False,
    clean_img_term: bool = False,
    offset_noise: float = 0.0,
    cond_drop: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The objective named ``objective`` (a key of ``OBJECTIVES``), given the options it takes: ``alpha``
    weighs the text term of "bidiffuser" and "reference"; ``clean_img_term`` is "reference"'s;
    ``offset_noise`` applies where the image is noised ("bidiffuser", "joint"); ``cond_drop`` is
    "bidiffuser"'s."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    kwargs = dict(shared_timestep=shared_timestep, generator=generator)
    if objective != "joint":
        kwargs["alpha"] = alpha
    if objective == "reference":
        kwargs["clean_img_term"] = clean_img_term
        if offset_noise:
            raise ValueError("offset_noise: the reference objective never noises the image")
    else:
        kwargs["offset_noise"] = offset_noise
    if objective == "bidiffuser":
        kwargs["cond_drop"] = cond_drop
    elif cond_drop:
        raise ValueError(f"cond_drop: only the bidiffuser objective takes it, not {objective!r}")
    return OBJECTIVES[objective](uvit, schedule, z0, clip0, y0, **kwargs)
