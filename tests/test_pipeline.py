"""The assembled BiDiffuser on the tiny preset: shapes, determinism, outputs, input validation, and the
same model rebuilt from files in the real checkpoint formats."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from easygen.bidiffuser.autoencoder import TINY_NORM_GROUPS
from easygen.bidiffuser.clip import ClipImageEncoder
from easygen.bidiffuser.convert import save_uvit
from easygen.bidiffuser.pipeline import BiDiffuser
from tests.ldm_vae import diffusers_to_ldm_state_dict

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


def test_from_paths_rebuilds_the_same_model(images, tmp_path):
    # every part of the tiny preset, its VAE included, is plain weights in the real formats
    model = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, **SAMPLER)
    features = model.i2t_features(images)
    pictures = model.generate_tensors(CORPUS[:2])
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
        **paths,
        uvit_config=uvit_config,
        caption_decoder_heads=n_head,
        autoencoder_norm_groups=TINY_NORM_GROUPS,
        seed=model.seed,
        **SAMPLER,
    )
    torch.testing.assert_close(rebuilt.i2t_features(images), features)
    torch.testing.assert_close(rebuilt.generate_tensors(CORPUS[:2]), pictures)
    with pytest.raises(FileNotFoundError, match="clip_text not found"):
        BiDiffuser.from_paths(**dict(paths, clip_text=tmp_path / "nope"))


def test_shared_noise_makes_features_independent_of_the_batch(images):
    """With shared_noise a picture's features are the same whatever batch it is in and wherever in it;
    with a fresh draw per sample they change with the position."""
    third = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    shared = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, shared_noise=True, **SAMPLER)
    a = shared.i2t_features(images)  # [img0, img1]
    b = shared.i2t_features(torch.cat([third, images[1:], images[:1]]))  # [third, img1, img0]
    torch.testing.assert_close(a[0], b[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # still a function of the picture
    alone = shared.i2t_features(images[1:])
    # batch size 1 vs 2 changes only the conv kernels' float32 summation order (~1e-5 here)
    torch.testing.assert_close(alone[0], a[1], rtol=1e-5, atol=1e-4)
    fresh = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, shared_noise=False, **SAMPLER)
    c = fresh.i2t_features(images)
    d = fresh.i2t_features(torch.cat([images[1:], images[:1]]))
    assert not torch.allclose(c[0], d[1], atol=1e-3)


def test_tiny_autoencoder_has_a_sharp_posterior_and_unit_scale_latents():
    """The tiny VAE behaves like a trained KL-f8 one: two posterior draws of a picture agree closely (the
    picture, not the draw, decides the latent) and the scaled latents of different pictures spread
    about as widely as unit-variance latents."""
    model = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, **SAMPLER)
    gen = torch.Generator().manual_seed(3)
    pics = torch.zeros(8, 3, 64, 64)
    for i in range(8):  # plain backgrounds with one coloured square each, like the synthetic set
        pics[i] += torch.rand(3, 1, 1, generator=gen)
        x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=gen))
        pics[i, :, y:y + 20, x:x + 20] = torch.rand(3, 1, 1, generator=gen)
    z1 = model.encode_images(pics, generator=torch.Generator().manual_seed(0))["z"]
    z2 = model.encode_images(pics, generator=torch.Generator().manual_seed(1))["z"]
    spread = float(z1.std(0).mean())
    assert float((z1 - z2).abs().max()) < 0.01 * spread
    assert 0.2 < spread < 5.0


def test_t2i_cfg_scale_guides_text_to_image_only(images):
    """`t2i_cfg_scale` is text-to-image's guidance scale (the sampler called with it, as sample_t2i is
    called by hand here); picture-to-caption keeps `cfg_scale`; unset, both use `cfg_scale`."""
    from easygen.bidiffuser.sampling import sample_i2t, sample_t2i

    sampler = {**SAMPLER, "cfg_scale": 0.0}
    both = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, **sampler)
    own = BiDiffuser.tiny(CORPUS, seed=0, image_size=64, t2i_cfg_scale=3.0, **sampler)
    prompts = CORPUS[:2]
    z, _ = own.t2i_latents(prompts, seed=5)
    kwargs = dict(steps=3, order=3, method="fast", shared_noise=False)
    by_hand, _ = sample_t2i(own.uvit, own.schedule, own.encode_texts(prompts), img_shape=tuple(z.shape[1:]),
                            generator=torch.Generator().manual_seed(5), cfg_scale=3.0, **kwargs)  # fmt: skip
    torch.testing.assert_close(z, by_hand, rtol=0, atol=0)
    assert not torch.allclose(z, both.t2i_latents(prompts, seed=5)[0], atol=1e-3)
    # picture-to-caption unchanged by it
    torch.testing.assert_close(own.i2t_latents(images, seed=5), both.i2t_latents(images, seed=5))
    g = torch.Generator().manual_seed(5)  # one generator: the latent draw, then the sampler's noise
    enc = own.encode_images(images, generator=g)
    with torch.no_grad():
        y = sample_i2t(own.uvit, own.schedule, enc["z"], enc["clip_img"], generator=g, cfg_scale=0.0, **kwargs)
    torch.testing.assert_close(own.i2t_latents(images, seed=5), y)
