"""Text-to-image on the tiny preset: the VAE decodes what its encoder saw, pictures follow their prompts,
and the attribute reader that scores them reads the synthetic set's drawings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from data_modules.synthetic import captions_for, draw, sample_attributes
from data_modules.synthetic_reader import ATTRIBUTES, attribute_accuracy, parse_caption, read_picture
from easygen.bidiffuser.autoencoder import (
    SCALE_FACTOR,
    TINY_COLOUR_GAIN,
    TINY_NORM_GROUPS,
    decode,
    encode_moments,
    load_ldm_autoencoder,
    sample_latent,
    tiny_autoencoder,
)
from easygen.bidiffuser.pipeline import BiDiffuser
from easygen.bidiffuser.sampling import DATA_TYPE
from tests.ldm_vae import diffusers_to_ldm_state_dict

PROMPTS = [
    "a large red circle on the left on a white background",
    "a small blue square at the top on a black background",
    "a large yellow cross in the center on a gray background",
]
SAMPLER = dict(steps=3, order=3, method="fast", cfg_scale=0.0, shared_noise=True, max_caption_length=6)


def _drawings(n: int, seed: int) -> tuple[list[dict], torch.Tensor]:
    rng = random.Random(seed)
    attrs, pics = [], []
    for _ in range(n):
        a = sample_attributes(rng)
        attrs.append(a)
        pics.append(torch.from_numpy(np.array(draw(a, 64, rng))).permute(2, 0, 1).float() / 255.0)
    return attrs, torch.stack(pics)


def _reconstruct(vae, pics: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = sample_latent(encode_moments(vae, pics * 2 - 1), torch.Generator().manual_seed(0))
        return ((decode(vae, z) + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def drawings():
    return _drawings(48, seed=11)


# ---------------------------------------------------------------- the reader


def test_captions_parse_to_their_attributes():
    rng = random.Random(0)
    for _ in range(50):
        a = sample_attributes(rng)
        for caption in captions_for(a):
            assert parse_caption(caption) == a, caption
    assert parse_caption("a red and blue circle")["colour"] is None  # ambiguous: not read
    assert parse_caption("a picture")["shape"] is None


def test_reader_reads_exact_drawings(drawings):
    attrs, pics = drawings
    acc = attribute_accuracy([read_picture(p) for p in pics], attrs)
    for attr in ATTRIBUTES:
        assert acc[attr] >= 0.97, (attr, acc)
    # uint8 arrays and PIL images read the same as float tensors
    rng = random.Random(1)
    a = sample_attributes(rng)
    im = draw(a, 64, rng)
    assert read_picture(im) == read_picture(np.asarray(im)) == a


def test_reader_tells_a_plain_picture_from_a_drawing():
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    found = read_picture(blank)
    assert found["background"] == "gray" and found["colour"] is None and found["position"] is None
    with pytest.raises(ValueError, match="RGB picture"):
        read_picture(np.zeros((64, 64)))


def test_attribute_accuracy_and_chance():
    truth = [{"colour": "red"}, {"colour": "red"}, {"colour": "blue"}, {"colour": "green"}]
    read = [{"colour": "red"}, {"colour": "blue"}, {"colour": "blue"}, {"colour": None}]
    acc = attribute_accuracy(read, truth)
    assert acc == {"colour": 0.5, "colour_chance": 0.5}
    with pytest.raises(ValueError, match="3 readings for 4"):
        attribute_accuracy(read[:3], truth)


# ---------------------------------------------------------------- the tiny VAE


def test_tiny_vae_decodes_what_its_encoder_saw(drawings):
    """Encode + decode keeps what is drawn: small pixel error (one colour per 8x8 cell), and the colour,
    background, position and size read back from the reconstruction."""
    attrs, pics = drawings
    rec = _reconstruct(tiny_autoencoder(0), pics)
    assert float((rec - pics).abs().mean()) < 0.05
    acc = attribute_accuracy([read_picture(r) for r in rec], attrs)
    for attr in ("colour", "background", "position", "size"):
        assert acc[attr] >= 0.9, (attr, acc)


def test_tiny_vae_round_trips_through_an_ldm_checkpoint(drawings, tmp_path):
    """The tiny VAE is plain weights: written as an LDM autoencoder_kl.pth and read by the loader real
    weights go through, it encodes and decodes exactly as before."""
    _, pics = drawings
    vae = tiny_autoencoder(0).eval()
    torch.save(diffusers_to_ldm_state_dict(vae.state_dict(), num_levels=4), tmp_path / "autoencoder_kl.pth")
    loaded = load_ldm_autoencoder(tmp_path / "autoencoder_kl.pth", norm_num_groups=TINY_NORM_GROUPS)
    with torch.no_grad():
        m = encode_moments(vae, pics[:8] * 2 - 1)
        assert torch.equal(encode_moments(loaded, pics[:8] * 2 - 1), m)
        z = sample_latent(m, torch.Generator().manual_seed(0))
        torch.testing.assert_close(decode(loaded, z), decode(vae, z), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def pipe():
    from easygen.factories import tiny_caption_corpus

    return BiDiffuser.tiny(tiny_caption_corpus(), seed=0, image_size=64, **SAMPLER)


def test_t2i_noise_prediction_depends_on_the_text(pipe):
    y = pipe.encode_texts(PROMPTS[:2])
    assert not torch.allclose(y[0], y[1])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g).expand(2, -1, -1, -1)
    c = torch.randn(1, 1, pipe.uvit.config.clip_img_dim, generator=g).expand(2, -1, -1)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        z_out, c_out, _ = pipe.uvit(z, c, y, t, torch.zeros(2), DATA_TYPE)
    assert float((z_out[0] - z_out[1]).abs().max()) > 1e-3
    assert float((c_out[0] - c_out[1]).abs().max()) > 1e-3


def test_different_prompts_give_different_pictures(pipe):
    """Same seed, different prompts: different latents (the random U-ViT moves them only a little with the
    text) and pictures that differ as much as their colour latents do (decoded before the clamp to [0, 1],
    which the random U-ViT's large latents saturate); same prompt and seed: the same picture, also in
    another batch."""
    z, _ = pipe.t2i_latents(PROMPTS, seed=3)
    with torch.no_grad():
        pictures = (decode(pipe.vae, z) + 1) / 2
    per_unit = 1 / (2 * TINY_COLOUR_GAIN * SCALE_FACTOR)  # picture change per unit of scaled colour latent
    for i in range(3):
        for j in range(i):
            dz = float((z[i, :3] - z[j, :3]).abs().mean())
            assert dz > 1e-3, (i, j)
            assert float((pictures[i] - pictures[j]).abs().mean()) > 0.5 * per_unit * dz, (i, j)
    again, _ = pipe.t2i_latents(PROMPTS[::-1], seed=3)
    torch.testing.assert_close(again.flip(0), z, atol=1e-5, rtol=1e-5)
    alone = pipe.generate(PROMPTS[1:2], seed=3)[0]
    assert np.array_equal(np.asarray(alone), np.asarray(pipe.generate(PROMPTS, seed=3)[1]))
