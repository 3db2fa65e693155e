"""The assembled BiDiffuser on the tiny preset: shapes, determinism, outputs, input validation, and the
same model rebuilt from files in the real checkpoint formats."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from easygen.bidiffuser.autoencoder import diffusers_to_ldm_state_dict
from easygen.bidiffuser.clip import ClipImageEncoder
from easygen.bidiffuser.convert import save_uvit
from easygen.bidiffuser.pipeline import BiDiffuser

CORPUS = ["a red circle on a blue background", "two white squares", "a green triangle"]
SAMPLER = dict(steps=3, order=3, method="fast", cfg_scale=7.0, max_caption_length=6)


@pytest.fixture(scope="module")
def model():
    return BiDiffuser.tiny(CORPUS, seed=0, image_size=64, **SAMPLER)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def features(model, images):
    return model.i2t_features(images)


def test_encode_images_shapes(model, images):
    enc = model.encode_images(images)
    assert enc["moments"].shape == (2, 8, 8, 8)
    assert enc["z"].shape == (2, 4, 8, 8)
    assert enc["clip_img"].shape == (2, 1, 32)


def test_i2t_features_shape_and_determinism(model, images, features):
    assert features.shape == (2, 16, 64)
    assert torch.isfinite(features).all()
    other = model.i2t_features(images, seed=model.seed + 1)
    assert not torch.allclose(other, features)
    y = model.i2t_latents(images)
    assert y.shape == (2, 16, 16)
    # same seed, same output (the latents of a second call decode to the very same features)
    assert torch.equal(model.caption_decoder.decode_prefix(y), features)
    # each row depends on its own image only
    assert not torch.allclose(features[0], features[1])


def test_text_features_is_the_prefix_bottleneck(model):
    texts = ["a red circle", "two white squares"]
    y = model.encode_texts(texts)
    assert y.shape == (2, 16, 16)
    feats = model.text_features(texts)
    assert feats.shape == (2, 16, 64)
    cd = model.caption_decoder
    torch.testing.assert_close(feats, cd.decode_prefix(cd.encode_prefix(model.clip_text(texts))))


def test_caption_returns_strings(model, images):
    captions = model.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_generate_returns_pil_images(model):
    out = model.generate(["a red circle", "a green triangle"])
    assert len(out) == 2
    for im in out:
        assert isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB"
    again = model.generate(["a red circle", "a green triangle"])
    assert [list(a.getdata()) for a in out] == [list(b.getdata()) for b in again]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.rand(2, 3, 32, 32), r"\[B, 3, 64, 64\].*shape \(2, 3, 32, 32\)"),
        (torch.rand(3, 64, 64), r"shape \(3, 64, 64\)"),
        (torch.rand(1, 1, 64, 64), r"shape \(1, 1, 64, 64\)"),
        (torch.rand(1, 3, 64, 64) * 2 - 1, r"values in \[-"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "dtype torch.uint8"),
        ([[0.5]], "got list"),
    ],
)
def test_bad_images_are_refused(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.i2t_features(bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([], "non-empty list"),
        ("a red circle", "non-empty list"),
        (["ok", ""], "prompt 1"),
        (["  "], "prompt 0"),
    ],
)
def test_bad_prompts_are_refused(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model.generate(bad)
    with pytest.raises(ValueError, match=match):
        model.text_features(bad)


def test_inconsistent_parts_are_refused(model):
    wrong_clip = ClipImageEncoder.tiny(embed_dim=16)
    with pytest.raises(ValueError, match="CLIP image embedding is 16 but U-ViT clip_img_dim is 32"):
        BiDiffuser(model.uvit, model.vae, wrong_clip, model.clip_text, model.caption_decoder)


def test_from_paths_rebuilds_the_same_model(model, images, features, tmp_path):
    save_uvit(model.uvit, tmp_path / "uvit.pth")
    torch.save(
        diffusers_to_ldm_state_dict(model.vae.state_dict(), num_levels=4), tmp_path / "autoencoder_kl.pth"
    )
    model.clip_image.model.save_pretrained(tmp_path / "clip-b32")
    model.clip_text.model.save_pretrained(tmp_path / "clip-l14")
    model.clip_text.tokenizer.save_pretrained(tmp_path / "clip-l14")
    torch.save(
        {f"module.{k}": v.clone() for k, v in model.caption_decoder.state_dict().items()},
        tmp_path / "caption_decoder.pth",
    )
    model.caption_decoder.tokenizer.save_pretrained(tmp_path / "gpt2")
    paths = dict(
        uvit=tmp_path / "uvit.pth",
        autoencoder=tmp_path / "autoencoder_kl.pth",
        clip_image=tmp_path / "clip-b32",
        clip_text=tmp_path / "clip-l14",
        caption_decoder=tmp_path / "caption_decoder.pth",
        gpt2_tokenizer=tmp_path / "gpt2",
    )
    n_head = model.caption_decoder.gpt.config.n_head
    uvit_config = {
        "num_heads": model.uvit.config.num_heads,
        "num_text_tokens": model.uvit.config.num_text_tokens,
    }
    rebuilt = BiDiffuser.from_paths(
        **paths, uvit_config=uvit_config, caption_decoder_heads=n_head, seed=model.seed, **SAMPLER
    )
    torch.testing.assert_close(rebuilt.i2t_features(images), features)
    with pytest.raises(FileNotFoundError, match="clip_text not found"):
        BiDiffuser.from_paths(**dict(paths, clip_text=tmp_path / "nope"))
