"""BiDiffuser's image side sees a picture as the paper's image-to-text path prepares it (UniDiffuser's
`center_crop` in its `get_image_feature` and its COCO dataset class), re-derived here on non-square
pictures: a square crop of the shorter side at the centre (integer offsets), a PIL Lanczos resize to
512 x 512 as uint8; for the CLIP image tower, CLIP's own preprocessing of that picture as a PIL image
(transformers' CLIPImageProcessor, the PIL one: bicubic resize to 224, centre crop, CLIP mean/std); for
the VAE, pixels / 127.5 - 1, its moments, then a sample of them (diffusers' own posterior) with the same
noise. Resizing first and cropping after (bicubic), or resampling CLIP's input in torch, fails here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from easygen.bidiffuser import BiDiffuser
from easygen.bidiffuser.autoencoder import SCALE_FACTOR
from easygen.bidiffuser.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImageEncoder
from easygen.images import load_image


def paper_center_crop(array: np.ndarray, size: int = 512) -> np.ndarray:
    """UniDiffuser's center_crop(size, size, img), as its code does it."""
    crop = min(array.shape[:2])
    h, w = array.shape[:2]
    array = array[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    return np.array(Image.fromarray(array, "RGB").resize((size, size), Image.Resampling.LANCZOS)).astype(np.uint8)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A picture with edges and texture everywhere (where crop/resize order shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, ((x // 23 + y // 17) % 2) * 255], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(640, 480), (600, 400), (451, 300), (640, 427), (300, 451), (512, 512)])
def test_pictures_are_unidiffusers_center_crop(size):
    array = photo(*size)
    ours = load_image(png(array), 512)
    want = paper_center_crop(array)
    assert torch.equal((ours * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(want))


@pytest.fixture(scope="module")
def picture():
    array = photo(640, 480, seed=1)
    return load_image(png(array), 512), paper_center_crop(array)


def test_clip_input_is_clips_own_preprocessing(picture):
    ours, paper = picture
    encoder = ClipImageEncoder.tiny(embed_dim=32, image_size=224, seed=0)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                      image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    want = torch.as_tensor(np.asarray(processor(images=Image.fromarray(paper))["pixel_values"][0]))
    got = encoder.preprocess(ours[None])[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        embeds = encoder.model(pixel_values=want[None]).image_embeds
    torch.testing.assert_close(encoder(ours[None])[:, 0], embeds, atol=1e-6, rtol=1e-5)


def test_vae_input_moments_and_sample(picture):
    ours, paper = picture
    pipe = BiDiffuser.tiny(image_size=512, seed=0)
    x = torch.from_numpy(paper / 127.5 - 1.0).float().permute(2, 0, 1)[None]
    torch.testing.assert_close(ours[None] * 2.0 - 1.0, x, atol=1e-6, rtol=0)
    enc = pipe.encode_images(ours[None], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist  # diffusers' DiagonalGaussianDistribution
    # the inputs differ by float32 rounding only (x / 255 * 2 - 1 against x / 127.5 - 1): so do the moments
    scale = float(posterior.parameters.abs().max())
    torch.testing.assert_close(enc["moments"], posterior.parameters, atol=1e-5 * scale, rtol=0)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    want = (posterior.mean + posterior.std * noise) * SCALE_FACTOR
    torch.testing.assert_close(enc["z"], want, atol=1e-5 * float(want.abs().max()), rtol=0)
