"""Training objectives for the BiDiffuser U-ViT (noise prediction, DDPM's simple loss per modality).

``"bidiffuser"`` is the EasyGen paper's objective (Sec. 3.1):

    L = || eps_x - eps_hat_x(x_n, y_0, n, 0) ||^2 + alpha || eps_y - eps_hat_y(x_0, y_n, 0, n) ||^2

i.e. only the two clean-condition conditionals (t2i with clean text, i2t with clean image), where the image x
is the pair (VAE latent z, CLIP image embedding c) noised with one index. ``"reference"`` is what EasyGen's
released code trains: the i2t half only, optionally plus ``MSE(img_out, 0)`` on the clean-image branch.
``"joint"`` is UniDiffuser's loss (Bao et al. 2023, Eq. 6): independent indices for image and text, MSE on the
concatenated noise prediction. Indices are per sample unless ``shared_timestep`` (reference: one per batch).
"""

from __future__ import annotations

import torch

from .schedule import NoiseSchedule
from .uvit import UViT

DATA_TYPE = 1
OBJECTIVES = ("bidiffuser", "reference", "joint")


def _per_sample_mse(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Mean square error over the concatenation of several tensors, averaged per sample then over the batch."""
    p = torch.cat([x.flatten(1) for x in pred], dim=1).float()
    t = torch.cat([x.flatten(1) for x in target], dim=1).float()
    return (p - t).pow(2).mean(dim=1).mean()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


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
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """z0 [B,4,h,w] (scaled VAE latent), clip0 [B,1,D], y0 [B,L,text_dim] -> {loss, loss_img, loss_text}."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    B, device = z0.shape[0], z0.device

    def draw() -> torch.Tensor:
        return schedule.sample_timesteps(B, shared=shared_timestep, generator=generator, device=device)

    zero = torch.zeros(B, dtype=torch.long, device=device)

    if objective == "reference":
        n_text = draw()
        eps_y = _randn_like(y0, generator)
        y_n = schedule.add_noise(y0, n_text, eps_y)
        z_out, _, y_out = uvit(z0, clip0, y_n, zero, n_text, DATA_TYPE)
        loss_text = _per_sample_mse([y_out], [eps_y])
        if clean_img_term:
            # The reference pushes the clean-image branch's prediction to zero (no noise was added to it).
            loss_img = _per_sample_mse([z_out], [torch.zeros_like(z_out)])
        else:
            loss_img = torch.zeros((), device=device)
        return {"loss": loss_img + alpha * loss_text, "loss_img": loss_img, "loss_text": loss_text}

    n_img, n_text = draw(), draw()
    eps_z, eps_c, eps_y = (
        _randn_like(z0, generator),
        _randn_like(clip0, generator),
        _randn_like(y0, generator),
    )
    z_n = schedule.add_noise(z0, n_img, eps_z)
    c_n = schedule.add_noise(clip0, n_img, eps_c)
    y_n = schedule.add_noise(y0, n_text, eps_y)

    if objective == "joint":
        z_out, c_out, y_out = uvit(z_n, c_n, y_n, n_img, n_text, DATA_TYPE)
        loss = _per_sample_mse([z_out, c_out, y_out], [eps_z, eps_c, eps_y])
        return {
            "loss": loss,
            "loss_img": _per_sample_mse([z_out, c_out], [eps_z, eps_c]).detach(),
            "loss_text": _per_sample_mse([y_out], [eps_y]).detach(),
        }

    # bidiffuser: rows [:B] are t2i (noisy image, clean text), rows [B:] are i2t (clean image, noisy text).
    z_out, c_out, y_out = uvit(
        torch.cat([z_n, z0]),
        torch.cat([c_n, clip0]),
        torch.cat([y0, y_n]),
        torch.cat([n_img, zero]),
        torch.cat([zero, n_text]),
        DATA_TYPE,
    )
    loss_img = _per_sample_mse([z_out[:B], c_out[:B]], [eps_z, eps_c])
    loss_text = _per_sample_mse([y_out[B:]], [eps_y])
    return {"loss": loss_img + alpha * loss_text, "loss_img": loss_img, "loss_text": loss_text}
