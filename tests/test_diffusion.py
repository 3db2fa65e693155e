"""Noise schedule, BiDiffuser sampling and losses, EMA (DPM-Solver++: tests/test_dpm_solver.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from easygen.bidiffuser.ema import EMA
from easygen.bidiffuser.loss import bidiffuser_loss
from easygen.bidiffuser.sampling import sample_i2t, sample_joint, sample_t2i
from easygen.bidiffuser.schedule import NoiseSchedule
from easygen.bidiffuser.uvit import UViT, UViTConfig

NS = NoiseSchedule()
CFG = UViTConfig.tiny()


# Schedule.


def test_schedule_matches_diffusers_scaled_linear():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert NS.alphas_cumprod[0] == 1.0 and NS.alphas_cumprod.shape == (1001,)
    torch.testing.assert_close(NS.alphas_cumprod[1:].float(), ref.alphas_cumprod, rtol=1e-6, atol=1e-7)
    assert abs(NS.alphas_cumprod[1000].item() - 0.0047) < 1e-4
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    n = torch.tensor([1, 10, 500, 1000])
    torch.testing.assert_close(
        NS.add_noise(x0, n, noise), ref.add_noise(x0, noise, n - 1), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="1000"):
        NS.add_noise(x0, torch.tensor([0, 1, 2, 1001]), noise)


def test_continuous_schedule_knots_and_inverse():
    n = torch.tensor([1, 2, 250, 999, 1000])
    torch.testing.assert_close(NS.marginal_alpha(n / 1000.0), NS.alphas_cumprod[n].sqrt())
    alpha, sigma = NS.marginal_alpha(n / 1000.0), NS.marginal_std(n / 1000.0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(5, dtype=torch.float64))
    t = torch.tensor([1e-3, 0.0123, 0.5, 0.87654, 1.0], dtype=torch.float64)
    torch.testing.assert_close(NS.inverse_lambda(NS.marginal_lambda(t)), t, rtol=1e-9, atol=1e-9)


def test_sample_timesteps():
    g = torch.Generator().manual_seed(0)
    n = NS.sample_timesteps(4096, generator=g)
    assert n.dtype == torch.long and n.min() >= 1 and n.max() <= 1000 and n.unique().numel() > 900
    shared = NS.sample_timesteps(8, shared=True, generator=g)
    assert shared.unique().numel() == 1
    a = NS.sample_timesteps(16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, NS.sample_timesteps(16, generator=torch.Generator().manual_seed(5)))


# Sampling.


class _Recorder(torch.nn.Module):
    """Wraps a UViT and records what each network call was given."""

    def __init__(self, uvit: UViT):
        super().__init__()
        self.uvit, self.config, self.calls = uvit, uvit.config, []

    def forward(self, img, clip_img, text, t_img, t_text, data_type=None):
        self.calls.append(dict(img=img, clip=clip_img, text=text, t_img=t_img.clone(), t_text=t_text.clone()))
        return self.uvit(img, clip_img, text, t_img, t_text, data_type)


@pytest.fixture(scope="module")
def uvit() -> UViT:
    torch.manual_seed(0)
    return UViT(CFG).eval()


def _conditions(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, CFG.img_size, CFG.img_size, generator=g)
    clip = torch.randn(B, 1, CFG.clip_img_dim, generator=g)
    text = torch.randn(B, CFG.num_text_tokens, CFG.text_dim, generator=g)
    return z, clip, text


def test_i2t_cfg_batches_true_uncond(uvit):
    z, clip, _ = _conditions()
    rec = _Recorder(uvit)
    y = sample_i2t(rec, NS, z, clip, steps=5, cfg_scale=7.0, generator=torch.Generator().manual_seed(3))
    assert y.shape == (2, CFG.num_text_tokens, CFG.text_dim)
    assert len(rec.calls) == 5  # one batched network call per function evaluation
    for call in rec.calls:
        assert call["img"].shape[0] == 4
        assert torch.equal(call["img"][:2], z) and not torch.allclose(call["img"][2:], z)
        assert torch.equal(call["t_img"], torch.tensor([0.0, 0.0, 1000.0, 1000.0]))
        assert torch.equal(call["text"][:2], call["text"][2:]) and torch.equal(
            call["t_text"][:2], call["t_text"][2:]
        )
    t_text = [call["t_text"][0].item() for call in rec.calls]
    assert t_text[0] == 1000.0 and all(1.0 <= t < 1000.0 for t in t_text[1:])
    # Fresh noise at every evaluation.
    assert not torch.equal(rec.calls[0]["img"][2:], rec.calls[1]["img"][2:])


def test_i2t_guidance_formula(uvit):
    """One first-order step from t=1 to t_end: the guided eps must be cond + s (cond - uncond)."""
    z, clip, _ = _conditions()
    g = torch.Generator().manual_seed(11)
    y = sample_i2t(uvit, NS, z, clip, steps=1, order=1, cfg_scale=3.0, generator=g)
    g = torch.Generator().manual_seed(11)
    y_T = torch.randn(2, CFG.num_text_tokens, CFG.text_dim, generator=g)
    z_n, clip_n = torch.randn(z.shape, generator=g), torch.randn(clip.shape, generator=g)
    with torch.no_grad():
        cond = uvit(z, clip, y_T, 0, 1000.0)[2]
        uncond = uvit(z_n, clip_n, y_T, 1000, 1000.0)[2]
    eps = cond + 3.0 * (cond - uncond)
    a1, s1, a0, s0 = (
        NS.marginal_alpha(1.0),
        NS.marginal_std(1.0),
        NS.marginal_alpha(1e-3),
        NS.marginal_std(1e-3),
    )
    x0 = (y_T - s1 * eps) / a1
    lam = lambda a, s: (a / s).log()  # noqa: E731
    h = (lam(a0, s0) - lam(a1, s1)).item()
    expected = (s0 / s1) * y_T - a0 * torch.expm1(torch.tensor(-h, dtype=torch.float64)) * x0
    torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-4)


def test_sampling_is_deterministic(uvit):
    z, clip, text = _conditions()
    a = sample_i2t(uvit, NS, z, clip, steps=3, generator=torch.Generator().manual_seed(7))
    b = sample_i2t(uvit, NS, z, clip, steps=3, generator=torch.Generator().manual_seed(7))
    c = sample_i2t(uvit, NS, z, clip, steps=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    shape = (4, CFG.img_size, CFG.img_size)
    z1, c1 = sample_t2i(uvit, NS, text, img_shape=shape, steps=3, generator=torch.Generator().manual_seed(1))
    z2, c2 = sample_t2i(uvit, NS, text, img_shape=shape, steps=3, generator=torch.Generator().manual_seed(1))
    assert z1.shape == (2, *shape) and c1.shape == (2, 1, CFG.clip_img_dim)
    assert torch.equal(z1, z2) and torch.equal(c1, c2)
    j1 = sample_joint(uvit, NS, 2, img_shape=shape, steps=3, generator=torch.Generator().manual_seed(2))
    j2 = sample_joint(uvit, NS, 2, img_shape=shape, steps=3, generator=torch.Generator().manual_seed(2))
    assert [x.shape for x in j1] == [
        (2, *shape),
        (2, 1, CFG.clip_img_dim),
        (2, CFG.num_text_tokens, CFG.text_dim),
    ]
    assert all(torch.equal(x, y) for x, y in zip(j1, j2))


def test_t2i_uses_clean_text_and_noise_uncond(uvit):
    _, _, text = _conditions()
    rec = _Recorder(uvit)
    shape = (4, CFG.img_size, CFG.img_size)
    sample_t2i(rec, NS, text, img_shape=shape, steps=5, generator=torch.Generator().manual_seed(123))
    assert len(rec.calls) == 5
    for call in rec.calls:
        assert torch.equal(call["text"][:2], text) and not torch.allclose(call["text"][2:], text)
        assert torch.equal(call["t_text"], torch.tensor([0.0, 0.0, 1000.0, 1000.0]))
        assert torch.equal(call["img"][:2], call["img"][2:])


# Losses.


def _batch(B=3, seed=0):
    return _conditions(B, seed)


def _grad_names(loss, model):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n for (n, p), g in zip(params.items(), grads) if g is not None and g.abs().sum() > 0}


def test_bidiffuser_loss_matches_two_separate_conditionals():
    torch.manual_seed(0)
    model = UViT(CFG)
    z0, c0, y0 = _batch()
    out = bidiffuser_loss(model, NS, z0, c0, y0, alpha=0.5, generator=torch.Generator().manual_seed(4))
    # Redraw the same randomness in the documented order and evaluate each conditional on its own.
    g = torch.Generator().manual_seed(4)
    n_img, n_text = NS.sample_timesteps(3, generator=g), NS.sample_timesteps(3, generator=g)
    ez, ec, ey = (torch.randn(x.shape, generator=g) for x in (z0, c0, y0))
    zo, co, _ = model(NS.add_noise(z0, n_img, ez), NS.add_noise(c0, n_img, ec), y0, n_img, 0, 1)
    _, _, yo = model(z0, c0, NS.add_noise(y0, n_text, ey), 0, n_text, 1)
    loss_img = torch.cat([(zo - ez).flatten(1), (co - ec).flatten(1)], 1).pow(2).mean()
    loss_text = (yo - ey).pow(2).mean()
    torch.testing.assert_close(out["loss_img"], loss_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_text"], loss_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss_img + 0.5 * loss_text, rtol=1e-5, atol=1e-6)


def test_loss_gradient_routing():
    torch.manual_seed(0)
    model = UViT(CFG)
    z0, c0, y0 = _batch()
    everything = {n for n, _ in model.named_parameters()}
    out = bidiffuser_loss(model, NS, z0, c0, y0, generator=torch.Generator().manual_seed(0))
    img_only, text_only = _grad_names(out["loss_img"], model), _grad_names(out["loss_text"], model)
    assert not any(n.startswith("text_out.") for n in img_only)
    assert not any(n.startswith(("decoder_pred.", "clip_img_out.")) for n in text_only)
    assert _grad_names(out["loss"], model) == everything  # no unused parameters

    joint = bidiffuser_loss(
        model, NS, z0, c0, y0, objective="joint", generator=torch.Generator().manual_seed(0)
    )
    assert _grad_names(joint["loss"], model) == everything

    ref = bidiffuser_loss(
        model, NS, z0, c0, y0, objective="reference", generator=torch.Generator().manual_seed(0)
    )
    used = _grad_names(ref["loss"], model)
    assert not any(n.startswith(("decoder_pred.", "clip_img_out.")) for n in used)
    assert ref["loss_img"].item() == 0.0
    ref = bidiffuser_loss(
        model,
        NS,
        z0,
        c0,
        y0,
        objective="reference",
        clean_img_term=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert any(n.startswith("decoder_pred.") for n in _grad_names(ref["loss"], model))
    assert ref["loss_img"].item() > 0
    with pytest.raises(ValueError, match="objective"):
        bidiffuser_loss(model, NS, z0, c0, y0, objective="nope")


def test_shared_timestep_reaches_the_network():
    torch.manual_seed(0)
    rec = _Recorder(UViT(CFG))
    z0, c0, y0 = _batch(B=4)
    bidiffuser_loss(rec, NS, z0, c0, y0, objective="reference", shared_timestep=True)
    assert rec.calls[-1]["t_text"].unique().numel() == 1 and torch.all(rec.calls[-1]["t_img"] == 0)
    bidiffuser_loss(rec, NS, z0, c0, y0, generator=torch.Generator().manual_seed(0))
    t_img, t_text = rec.calls[-1]["t_img"], rec.calls[-1]["t_text"]
    assert torch.all(t_text[:4] == 0) and torch.all(t_img[4:] == 0) and t_img[:4].unique().numel() > 1


# EMA.


def test_ema():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * p.detach())
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9
    target = torch.nn.Linear(3, 2)
    other.copy_to(target)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.detach(), ema.shadow[n])
    with pytest.raises(KeyError, match="missing"):
        EMA(torch.nn.Linear(3, 2)).update(torch.nn.Sequential(torch.nn.Linear(3, 2)))
