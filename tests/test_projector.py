"""The projector's optional feature standardiser: fitted statistics, what it computes, that checkpoints
carry it, and its errors."""

from __future__ import annotations

import pytest
import torch

from easygen.llm.projector import Projector


def _features(n=64, tokens=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim, generator=g) * 3.0  # a large common component
    return base + 0.05 * torch.randn(n, tokens, dim, generator=g)  # small picture-to-picture variation


def test_standardiser_fits_and_applies_the_training_statistics():
    feats = _features()
    torch.manual_seed(0)
    p = Projector(8, 16, 12, standardize_tokens=4)
    assert p.needs_fit
    p.fit_standardizer(feats)
    assert not p.needs_fit
    mean, std = feats.double().mean(0), feats.double().std(0)
    torch.testing.assert_close(p.feature_mean, mean.float())
    torch.testing.assert_close(p.feature_std, std.float())
    # the output is the plain projector's on the standardised features
    torch.manual_seed(0)
    plain = Projector(8, 16, 12)
    out = p(feats[:5])
    ref = plain(((feats[:5].double() - mean) / std).float())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    z = (feats.double() - p.feature_mean.double()) / p.feature_std.double()
    assert abs(float(z.std(0).mean()) - 1.0) < 1e-3


def test_statistics_travel_in_the_state_dict():
    p = Projector(8, 16, 12, standardize_tokens=4)
    p.fit_standardizer(_features())
    sd = p.state_dict()
    assert {"feature_mean", "feature_std", "feature_fitted"} <= set(sd)
    q = Projector(8, 16, 12, standardize_tokens=4)
    q.load_state_dict(sd)
    assert not q.needs_fit
    x = _features(n=3, seed=1)
    torch.testing.assert_close(q(x), p(x))


def test_constant_channels_are_not_blown_up():
    feats = _features()
    feats[:, 0, 0] = 1.0  # no variation at all
    p = Projector(8, 16, 12, standardize_tokens=4)
    p.fit_standardizer(feats)
    assert float(p.feature_std[0, 0]) > 0
    assert torch.isfinite(p(feats)).all()


def test_bad_shapes_are_refused():
    p = Projector(8, 16, 12, standardize_tokens=4)
    with pytest.raises(ValueError, match="fit_standardizer expects"):
        p.fit_standardizer(torch.randn(10, 5, 8))
    with pytest.raises(ValueError, match="standardises 4 feature positions"):
        p(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="built without"):
        Projector(8, 16, 12).fit_standardizer(torch.randn(10, 4, 8))


def test_set_statistics_checks_shapes_and_output_is_not_a_view():
    p = Projector(8, 16, 12, standardize_tokens=4)
    with pytest.raises(ValueError, match=r"standardiser std must have shape \(4, 8\)"):
        p.set_statistics(torch.zeros(4, 8), torch.ones(5, 8))
    feats = _features()
    p.set_statistics(*Projector.standardizer_statistics(feats))
    q = Projector(8, 16, 12, standardize_tokens=4)
    q.fit_standardizer(feats)
    assert torch.equal(p.feature_mean, q.feature_mean) and torch.equal(p.feature_std, q.feature_std)
    # a [B, L, C] input: nn.Linear alone would return a view of its 2-D product (see easygen/lit/fsdp.py)
    x = torch.randn(2, 4, 8, requires_grad=True)
    assert p.fc2(p.act(p.fc1(x)))._base is not None
    out = p(x)
    assert out._base is None and out.shape == (2, 4, 12)
