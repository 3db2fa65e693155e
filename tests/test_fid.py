"""FID through torch-fidelity's real InceptionV3 (the network `stage.inception` weights are loaded
into), with seeded random weights saved as a state dict: our ``fid_score`` against

- a float64 reference: torch-fidelity's own ``FeatureExtractorInceptionV3`` forward (TensorFlow 1.x
  bilinear resize to 299) gives 2048-d features, and FID (Heusel et al. 2017, eq. 6) is computed with
  numpy in float64 through the singular values of A1 A2' (see ``_fid64``), another algorithm than
  torchmetrics' eigenvalues of S1 S2;
- the same with torchmetrics' ``NoTrainInceptionV3`` (its copy of that forward, antialiased resize)
  loading the same state dict, which is what our path runs by default;
- torchmetrics' ``FrechetInceptionDistance`` itself on the same file and images.

Needs the ``fid`` extra (torch-fidelity with a torchvision matching torch); skipped without it.
The error paths run everywhere."""

from __future__ import annotations

import sys
from unittest import mock

import numpy as np
import pytest
import torch

from easygen.metrics import fid_score


def _fidelity_inception():
    """torch-fidelity's InceptionV3 module, or a skip naming why it cannot be imported (not installed,
    or a torchvision built for another torch: "operator torchvision::nms does not exist")."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"needs the fid extra (torch-fidelity + matching torchvision): {type(e).__name__}: {e}")
    return fe


def _random_inception_state_dict(seed: int) -> dict:
    """A state dict for torch-fidelity's InceptionV3 with seeded random weights that keep activations
    at a healthy scale (He-normal convolutions, BatchNorm statistics near identity)."""
    fe = _fidelity_inception()
    # Construct the network without its pretrained download: the weights are replaced right after.
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in net.state_dict().items():
        if not t.is_floating_point():
            sd[name] = t.clone()
        elif t.ndim == 4:  # convolution kernels: He-normal
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            sd[name] = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("running_var"):
            sd[name] = 0.5 + torch.rand(t.shape, generator=g)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            sd[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith(".weight") and t.ndim == 1:  # BatchNorm scale
            sd[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:  # the classifier (unused for pool features)
            sd[name] = 0.01 * torch.randn(t.shape, generator=g)
    assert set(sd) == set(net.state_dict())
    return sd


def _fid64(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    """FID (Heusel et al. 2017, eq. 6) in float64, with tr sqrt(S1 S2) taken in sample space: for
    centred features A1 (n1 x D), A2 (n2 x D), S1 S2 = A1'A1 A2'A2 / c with c = (n1-1)(n2-1) has the
    nonzero eigenvalues of M M' with M = A1 A2', so tr sqrt(S1 S2) = (sum of singular values of M) / sqrt(c).
    Exact, and another algorithm than torchmetrics' eigenvalues of the D x D product."""
    a1, a2 = f_real - f_real.mean(0), f_fake - f_fake.mean(0)
    n1, n2 = len(f_real), len(f_fake)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    mean_term = ((f_real.mean(0) - f_fake.mean(0)) ** 2).sum()
    return float(mean_term + (a1**2).sum() / (n1 - 1) + (a2**2).sum() / (n2 - 1) - 2 * tr_sqrt)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(_random_inception_state_dict(seed=0), path)
    return path


def _images():
    g = torch.Generator().manual_seed(1)
    # 64x64 images (resized to 299 inside the network): a "real" set and a darker, smoother "fake" set.
    real = torch.randint(0, 256, (10, 3, 64, 64), generator=g, dtype=torch.uint8)
    fake = torch.nn.functional.avg_pool2d(
        torch.randint(0, 180, (10, 3, 128, 128), generator=g).float(), 2
    ).to(torch.uint8)
    return real, fake


@pytest.mark.slow
def test_fid_real_inception_matches_float64_reference(inception_file):
    fe = _fidelity_inception()
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

    real, fake = _images()
    path = str(inception_file)
    # Reference networks loading the same file: torch-fidelity's own class and forward (TensorFlow 1.x
    # resize), and torchmetrics' subclass of it (antialiased resize by default).
    nets = {
        False: fe.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=path
        ),
        True: NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path),
    }
    values = {}
    for antialias, net in nets.items():
        with torch.no_grad():
            outs = [net(x) for x in (real, fake)]  # torch-fidelity returns a tuple of feature sets
        f_real, f_fake = ((o[0] if isinstance(o, tuple) else o).double().numpy() for o in outs)
        assert f_real.shape == (10, 2048)
        assert 1e-3 < f_real.std() < 1e3  # random weights still give informative features
        reference = _fid64(f_real, f_fake)
        assert reference > 1e-2 * ((f_real.var(0) + f_fake.var(0)).sum())  # the two sets do differ
        # batch_size 4: batches of 4, 4, 2 accumulate into the same statistics.
        ours = fid_score(real, fake, inception_file, batch_size=4, antialias=antialias)
        # float32 features in both; float64 statistics; torchmetrics returns the value as float32.
        assert ours == pytest.approx(reference, rel=1e-6)
        print(f"antialias={antialias}: float64 reference {reference!r}, fid_score {ours!r}")
        values[antialias] = ours
    # torchmetrics' own FrechetInceptionDistance on the same file and images, in one batch each.
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path)
    with torch.no_grad():
        tm.update(real, real=True)
        tm.update(fake, real=False)
        assert values[True] == pytest.approx(float(tm.compute()), rel=1e-6)
    assert abs(values[True] - values[False]) > 1e-3 * values[False]  # the resize matters at 64 px


def test_fid_weights_file_errors(tmp_path):
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="Inception weights not found: .*nope.pth"):
        fid_score(imgs, imgs, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="at least 2"):
        fid_score(imgs[:1], imgs, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: not a state dict of tensors"):
        fid_score(imgs, imgs, garbage)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"step": 3}, not_tensors)
    with pytest.raises(ValueError, match=r"not_tensors.pth: expected a state dict \(name -> tensor\)"):
        fid_score(imgs, imgs, not_tensors)
    # torch-fidelity missing (or not importable): the error names the extra.
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    with mock.patch.dict(
        sys.modules, {"torch_fidelity": None, "torch_fidelity.feature_extractor_inceptionv3": None}
    ):
        with pytest.raises(ImportError, match=r"\.\[fid\]"):
            fid_score(imgs, imgs, weights)


def test_fid_wrong_state_dict(tmp_path):
    _fidelity_inception()
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    weights = tmp_path / "not_inception.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="not a state dict of torch-fidelity's FeatureExtractorInceptionV3"):
        fid_score(imgs, imgs, weights)
