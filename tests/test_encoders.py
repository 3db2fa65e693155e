"""The frozen encoders: SD KL-f8 VAE (LDM checkpoint conversion) and the two CLIP encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from transformers import CLIPImageProcessorPil

from easygen.bidiffuser.autoencoder import (
    SCALE_FACTOR,
    TINY_COLOUR_GAIN,
    TINY_NORM_GROUPS,
    decode,
    encode_moments,
    load_autoencoder,
    sample_latent,
    set_tiny_weights,
    tiny_autoencoder,
)
from easygen.bidiffuser.clip import ClipImageEncoder, ClipTextEncoder
from tests.ldm_vae import diffusers_to_ldm_state_dict


@pytest.fixture(scope="module")
def vae():
    model = tiny_autoencoder(seed=3, linear=False)
    with torch.no_grad():  # move norms and biases off their (1, 0) init so a mixed-up key shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ldm_pth(vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "autoencoder_kl.pth"
    torch.save(diffusers_to_ldm_state_dict(vae.state_dict(), num_levels=4), path)
    return path


def _images(seed=0, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ldm_names_are_the_ldm_layout(vae):
    ldm = diffusers_to_ldm_state_dict(vae.state_dict(), num_levels=4)
    assert ldm["encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    assert "encoder.down.2.block.0.nin_shortcut.weight" in ldm
    assert "encoder.norm_out.weight" in ldm and "decoder.norm_out.weight" in ldm
    # LDM numbers decoder levels from full resolution: up.0 is diffusers' last up block
    assert torch.equal(
        ldm["decoder.up.0.block.0.conv1.weight"],
        vae.state_dict()["decoder.up_blocks.3.resnets.0.conv1.weight"],
    )
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in ldm)


def test_ldm_names_are_the_inverse_of_diffusers_converter(vae, ldm_pth):
    """tests/ldm_vae.py's map followed by diffusers' converter (what the loader runs) gives every tensor back."""
    ldm = diffusers_to_ldm_state_dict(vae.state_dict(), num_levels=4)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    loaded = load_autoencoder(ldm_pth, norm_num_groups=TINY_NORM_GROUPS).state_dict()
    assert set(back) == set(loaded) == set(vae.state_dict())
    for k, v in vae.state_dict().items():
        assert torch.equal(back[k], v) and torch.equal(loaded[k], v), k


def test_ldm_checkpoint_loads_exactly(vae, ldm_pth):
    # the tiny widths (80 is not a multiple of SD's 32 groups) make the loader ask for the group count
    with pytest.raises(ValueError, match="norm_num_groups"):
        load_autoencoder(ldm_pth)
    loaded = load_autoencoder(ldm_pth, norm_num_groups=TINY_NORM_GROUPS)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _images()
    with torch.no_grad():
        m_ref, m = encode_moments(vae, x), encode_moments(loaded, x)
        assert m.shape == (2, 8, 4, 4)
        assert torch.equal(m, m_ref)
        z = sample_latent(m, torch.Generator().manual_seed(0))
        assert torch.equal(decode(loaded, z), decode(vae, z))


def _affine_fit_error(means: torch.Tensor, images: torch.Tensor) -> float:
    """Largest error of the best affine map from 8x8-pooled colours to the latent means, relative to their spread."""
    pooled = torch.nn.functional.avg_pool2d(images, 8).permute(0, 2, 3, 1).reshape(-1, 3).double()
    means = means.permute(0, 2, 3, 1).reshape(-1, means.shape[1]).double()
    design = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=torch.double)], 1)
    fit = design @ torch.linalg.lstsq(design, means).solution
    return float((fit - means).abs().max() / means.std(0).mean())


def test_tiny_encoder_latent_is_the_pooled_colour_plus_structure():
    """Latent channels 0-2 of the tiny VAE are the 8x8-pooled colours times a fixed gain (what the decoder
    inverts), channel 3 carries local structure (not affine in the pooled colours); a fully random
    encoder is far from affine; the posterior is sharp."""
    blocky = torch.nn.functional.interpolate(
        torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1, size=64
    )
    with torch.no_grad():
        moments = encode_moments(tiny_autoencoder(seed=1), blocky)
        pooled = torch.nn.functional.avg_pool2d(blocky, 8)
        torch.testing.assert_close(moments[:, :3], TINY_COLOUR_GAIN * pooled, atol=1e-3, rtol=1e-4)
        assert _affine_fit_error(moments[:, 3:4], blocky) > 0.05
        assert torch.all(moments[:, 4:] == -12.0)
        random_means = encode_moments(tiny_autoencoder(seed=1, linear=False), blocky)[:, :4]
        assert _affine_fit_error(random_means, blocky) > 0.1


def test_tiny_decoder_inverts_the_colour_latent():
    """Decoding a latent whose colour channels hold a picture's pooled colours gives that picture back
    (one colour per 8x8 cell), whatever the structure channel holds."""
    cells = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.cat([TINY_COLOUR_GAIN * cells, torch.randn(3, 1, 8, 8)], 1) * SCALE_FACTOR
    with torch.no_grad():
        out = decode(tiny_autoencoder(seed=4), z)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(cells, size=64), atol=1e-3, rtol=1e-4)


def test_set_tiny_weights_rejects_other_topologies():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    with pytest.raises(ValueError, match="widths"):
        set_tiny_weights(vae, torch.Generator().manual_seed(0))


def test_helpers_follow_diffusers_and_the_reference_scaling(vae):
    x = _images(1)
    with torch.no_grad():
        moments = encode_moments(vae, x)
        dist = vae.encode(x).latent_dist
        assert torch.equal(moments, dist.parameters)
        z = sample_latent(moments, torch.Generator().manual_seed(5))
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(z, (dist.mean + dist.std * eps) * SCALE_FACTOR)
        torch.testing.assert_close(decode(vae, z), vae.decode(z / SCALE_FACTOR).sample)


def test_diffusers_folder_loads(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(tmp_path / "vae")
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(encode_moments(loaded, x), encode_moments(vae, x))


def test_ldm_checkpoint_key_errors(vae, tmp_path):
    ldm = diffusers_to_ldm_state_dict(vae.state_dict(), num_levels=4)
    extra = dict(ldm, **{"encoder.mid.attn_2.q.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*encoder\.mid\.attn_2\.q\.weight"):
        load_autoencoder(tmp_path / "extra.pth", norm_num_groups=TINY_NORM_GROUPS)
    missing = {k: v for k, v in ldm.items() if k != "decoder.mid.attn_1.v.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['decoder\.mid_block\.attentions\.0\.to_v\.bias'\]"):
        load_autoencoder(tmp_path / "missing.pth", norm_num_groups=TINY_NORM_GROUPS)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_autoencoder(tmp_path / "nowhere.pth")


# ---------------------------------------------------------------- CLIP


def test_clip_image_preprocess_matches_clip_processor():
    enc = ClipImageEncoder.tiny(embed_dim=32, image_size=32)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = torch.as_tensor(np.asarray(ref(images=Image.fromarray(pixels))["pixel_values"][0]))
    ours = enc.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0)[0]
    assert ours.shape == expected.shape == (3, 32, 32)
    # the same PIL bicubic resize and crop of the same uint8 picture: equal to float rounding
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    # no resize needed: exactly CLIP's normalisation of the center crop
    same = ref(images=Image.fromarray(pixels[24:56, 32:64]))["pixel_values"][0]
    torch.testing.assert_close(
        enc.preprocess(torch.from_numpy(pixels[24:56, 32:64]).permute(2, 0, 1)[None].float() / 255.0)[0],
        torch.as_tensor(np.asarray(same)),
    )


def test_clip_image_encoder_shapes_frozen_and_reload(tmp_path):
    enc = ClipImageEncoder.tiny(embed_dim=32, image_size=32, seed=1)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert out.shape == (3, 1, 32)
    enc.model.save_pretrained(tmp_path / "clip-b32")
    again = ClipImageEncoder.from_pretrained(tmp_path / "clip-b32")
    torch.testing.assert_close(again(x), out)
    with pytest.raises(FileNotFoundError, match="no-such-clip"):
        ClipImageEncoder.from_pretrained(tmp_path / "no-such-clip")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.rand(3, 64, 64))


def test_clip_text_encoder_pads_to_fixed_length_and_is_causal(tmp_path):
    enc = ClipTextEncoder.tiny(["a red circle on a blue background"], hidden_size=64, max_length=16)
    assert not any(p.requires_grad for p in enc.parameters())
    short, long = "a red circle", "a red circle on a blue background"
    out = enc([short, long])
    assert out.shape == (2, 16, 64)
    ids = enc.tokenize([short, long])
    assert (ids[0] == enc.tokenizer.pad_token_id).sum() > (ids[1] == enc.tokenizer.pad_token_id).sum()
    shared = int((ids[0] == ids[1]).int().cumprod(0).sum())
    assert shared >= 2
    # no attention mask (as UniDiffuser): CLIP's causal mask alone keeps the common prefix identical
    torch.testing.assert_close(out[0, :shared], out[1, :shared])
    assert not torch.allclose(out[0, shared:], out[1, shared:])
    enc.model.save_pretrained(tmp_path / "clip-l14")
    enc.tokenizer.save_pretrained(tmp_path / "clip-l14")
    again = ClipTextEncoder.from_pretrained(tmp_path / "clip-l14", max_length=16)
    torch.testing.assert_close(again([short, long]), out)
    with pytest.raises(FileNotFoundError, match="missing-l14"):
        ClipTextEncoder.from_pretrained(tmp_path / "missing-l14")
