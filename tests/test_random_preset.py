"""`model=random`: the paper's shapes with random weights and no files (built on the meta device here;
a GPU benchmark builds it on the card)."""

from __future__ import annotations

from easygen.bidiffuser import BiDiffuser


def test_random_v1_has_the_real_shapes():
    pipe = BiDiffuser.random_v1(device="meta")
    assert sum(p.numel() for p in pipe.uvit.parameters()) == 952_509_520
    assert pipe.image_size == 512
    assert pipe.caption_decoder.feature_dim == 768 and pipe.caption_decoder.text_dim == 64
    assert pipe.clip_image.embed_dim == pipe.uvit.config.clip_img_dim == 512
    assert pipe.clip_text.max_length == pipe.uvit.config.num_text_tokens == 77
    assert pipe.clip_text.hidden_size == 768
    vae_channels = pipe.vae.config.block_out_channels
    assert tuple(vae_channels) == (128, 256, 512, 512) and pipe.vae.config.latent_channels == 4
