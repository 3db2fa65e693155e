"""The three BiDiffuser objectives of easygen/bidiffuser/loss.py, each against its formula evaluated
by hand on the same draws (the paper's: tests/test_diffusion.py), and the dispatcher the training step
calls (easygen/lit/bidiffuser_module.py)."""

from __future__ import annotations

import pytest
import torch

from easygen.bidiffuser.loss import (
    OBJECTIVES,
    _offset,
    bidiffuser_loss,
    joint_loss,
    paper_loss,
    reference_loss,
)
from easygen.bidiffuser.schedule import NoiseSchedule
from easygen.bidiffuser.uvit import UViT, UViTConfig

NS = NoiseSchedule()
CFG = UViTConfig.tiny()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UViT(CFG)


def _batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, 4, CFG.img_size, CFG.img_size, generator=g),
        torch.randn(B, 1, CFG.clip_img_dim, generator=g),
        torch.randn(B, CFG.num_text_tokens, CFG.text_dim, generator=g),
    )


def _mse(pred, target):
    return (
        torch.cat([p.flatten(1) for p in pred], 1)
        .sub(torch.cat([t.flatten(1) for t in target], 1))
        .pow(2)
        .mean()
    )


@pytest.mark.parametrize("clean_img_term", [False, True])
def test_reference_loss_is_the_i2t_half(model, clean_img_term):
    """One text index and one noise draw; the clean image goes in at index 0; loss_img is MSE(z_out, 0)
    with the clean-image term, else 0."""
    z0, c0, y0 = _batch()
    out = reference_loss(model, NS, z0, c0, y0, alpha=0.7, clean_img_term=clean_img_term,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    n_text = NS.sample_timesteps(3, generator=g)
    ey = torch.randn(y0.shape, generator=g)
    zo, _, yo = model(z0, c0, NS.add_noise(y0, n_text, ey), 0, n_text, 1)
    loss_text = _mse([yo], [ey])
    loss_img = zo.pow(2).mean() if clean_img_term else torch.zeros(())
    torch.testing.assert_close(out["loss_text"], loss_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_img"], loss_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss_img + 0.7 * loss_text, rtol=1e-5, atol=1e-6)


def test_joint_loss_is_one_mse_over_both_modalities(model):
    """Independent indices for image (z and c share it) and text; one MSE over the concatenated
    prediction of z, c and y, unweighted."""
    z0, c0, y0 = _batch()
    out = joint_loss(model, NS, z0, c0, y0, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    n_img, n_text = NS.sample_timesteps(3, generator=g), NS.sample_timesteps(3, generator=g)
    ez, ec, ey = (torch.randn(x.shape, generator=g) for x in (z0, c0, y0))
    zo, co, yo = model(
        NS.add_noise(z0, n_img, ez),
        NS.add_noise(c0, n_img, ec),
        NS.add_noise(y0, n_text, ey),
        n_img,
        n_text,
        1,
    )
    torch.testing.assert_close(out["loss"], _mse([zo, co, yo], [ez, ec, ey]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_img"], _mse([zo, co], [ez, ec]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_text"], _mse([yo], [ey]), rtol=1e-5, atol=1e-6)
    assert not out["loss_img"].requires_grad and out["loss"].requires_grad


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_dispatcher_runs_the_named_objective_with_its_options(model, objective):
    z0, c0, y0 = _batch()
    options = dict(alpha=0.3, shared_timestep=True, clean_img_term=True)
    out = bidiffuser_loss(model, NS, z0, c0, y0, objective=objective, generator=torch.Generator().manual_seed(2),
                          **options)  # fmt: skip
    own = {
        "bidiffuser": {"alpha", "shared_timestep"},
        "reference": set(options),
        "joint": {"shared_timestep"},
    }
    direct = OBJECTIVES[objective](model, NS, z0, c0, y0, generator=torch.Generator().manual_seed(2),
                                   **{k: v for k, v in options.items() if k in own[objective]})  # fmt: skip
    assert set(out) == set(direct) == {"loss", "loss_img", "loss_text"}
    for key in out:
        assert torch.equal(out[key], direct[key]), key
    assert OBJECTIVES["bidiffuser"] is paper_loss


def test_unknown_objective_names_the_choices(model):
    with pytest.raises(ValueError, match=r"objective must be one of \('bidiffuser', 'reference', 'joint'\)"):
        bidiffuser_loss(model, NS, *_batch(), objective="nope")


def test_paper_loss_with_offset_noise_and_dropped_conditions_by_hand(model):
    """offset_noise: z's noise is white noise plus a per-sample, per-channel constant of that standard
    deviation (drawn after the white noise); cond_drop: the t2i rows whose uniform draw falls below it see
    fresh noise at index N instead of their clean text (drawn after the offsets)."""
    z0, c0, y0 = _batch(B=6)
    out = paper_loss(model, NS, z0, c0, y0, alpha=0.4, offset_noise=0.3, cond_drop=0.5,
                     generator=torch.Generator().manual_seed(7))  # fmt: skip
    g = torch.Generator().manual_seed(7)
    n_img, n_text = NS.sample_timesteps(6, generator=g), NS.sample_timesteps(6, generator=g)
    ez, ec, ey = (torch.randn(x.shape, generator=g) for x in (z0, c0, y0))
    ez = ez + 0.3 * torch.randn(6, 4, generator=g)[:, :, None, None]
    drop = torch.rand(6, generator=g) < 0.5
    assert 0 < int(drop.sum()) < 6  # both kinds of row in this draw
    text_noise = torch.randn(y0.shape, generator=g)
    y_cond = torch.where(drop[:, None, None], text_noise, y0)
    n_cond = torch.where(drop, NS.num_steps, 0)
    zero = torch.zeros(6, dtype=torch.long)
    zo, co, yo = model(
        torch.cat([NS.add_noise(z0, n_img, ez), z0]),
        torch.cat([NS.add_noise(c0, n_img, ec), c0]),
        torch.cat([y_cond, NS.add_noise(y0, n_text, ey)]),
        torch.cat([n_img, zero]),
        torch.cat([n_cond, n_text]),
        1,
    )
    loss_img, loss_text = _mse([zo[:6], co[:6]], [ez, ec]), _mse([yo[6:]], [ey])
    torch.testing.assert_close(out["loss_img"], loss_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_text"], loss_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss_img + 0.4 * loss_text, rtol=1e-5, atol=1e-6)


def test_offset_noise_is_a_flat_shift_per_channel(model):
    """The difference the offset makes to z's noise is constant over each sample's channel, with the
    standard deviation asked for, and the joint objective takes it too."""
    z0, c0, y0 = _batch(B=64)
    g = torch.Generator().manual_seed(3)
    white = torch.randn(z0.shape, generator=g)
    diff = _offset(white, 0.5, g) - white
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff), rtol=0, atol=1e-6)
    assert 0.4 < float(diff[:, :, 0, 0].std()) < 0.6
    a = joint_loss(model, NS, z0, c0, y0, offset_noise=0.5, generator=torch.Generator().manual_seed(4))
    b = joint_loss(model, NS, z0, c0, y0, generator=torch.Generator().manual_seed(4))
    assert abs(float(a["loss_img"]) - float(b["loss_img"])) > 1e-3


def test_options_an_objective_does_not_take_are_refused(model):
    with pytest.raises(ValueError, match="offset_noise: the reference objective never noises the image"):
        bidiffuser_loss(model, NS, *_batch(), objective="reference", offset_noise=0.1)
    with pytest.raises(ValueError, match="cond_drop: only the bidiffuser objective takes it, not 'joint'"):
        bidiffuser_loss(model, NS, *_batch(), objective="joint", cond_drop=0.1)
