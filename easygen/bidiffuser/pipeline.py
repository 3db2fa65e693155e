"""BiDiffuser assembled: U-ViT, noise schedule, VAE, the two CLIP encoders and the caption decoder (SPEC §1, §3).

This is the inference side of EasyGen's diffusion half, as UniDiffuser's ``sample_multi_v1.py`` wires it:

- image -> ``z`` (VAE moments, one latent sample, x0.18215) and ``clip_img`` (CLIP-B/32 ``image_embeds``);
- i2t: ``y`` sampled from noise by DPM-Solver++ with guidance, the image side clean (t_img = 0);
  ``decode_prefix(y)`` (``[B, 77, 768]``) is the image feature the LLM's projector consumes, and the
  caption decoder turns ``y`` into words;
- t2i: ``y = encode_prefix(CLIP-L(prompt))`` clean (t_text = 0); ``z, clip_img`` sampled; VAE decode;
- ``text_features``: ``decode_prefix(encode_prefix(CLIP-L(caption)))``, the caption standing in for an
  image feature in the alignment stage (SPEC §4).

Every random draw of a call (latent sample, solver noise, guidance noise) comes from one generator seeded
with ``seed``, so a call is a deterministic function of its inputs and the seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from easygen.llm.tokenization import build_tokenizer

from .autoencoder import decode, encode_moments, load_autoencoder, sample_latent, tiny_autoencoder
from .caption_decoder import CaptionDecoder
from .clip import ClipImageEncoder, ClipTextEncoder, fit_clip
from .convert import load_uvit
from .sampling import sample_i2t, sample_t2i
from .schedule import NoiseSchedule
from .uvit import UViT, UViTConfig

VAE_FACTOR = 8  # KL-f8: 3 downsamplings


class BiDiffuser(nn.Module):
    """The frozen BiDiffuser stack with its sampler settings."""

    def __init__(
        self,
        uvit: UViT,
        vae,
        clip_image: ClipImageEncoder,
        clip_text: ClipTextEncoder,
        caption_decoder: CaptionDecoder,
        schedule: NoiseSchedule | None = None,
        *,
        image_size: int | None = None,
        steps: int = 50,
        order: int = 3,
        method: str = "fast",
        cfg_scale: float = 7.0,
        t2i_cfg_scale: float | None = None,
        shared_noise: bool = False,
        seed: int = 1234,
        beam_size: int = 5,
        max_caption_length: int = 67,
    ):
        super().__init__()
        self.uvit = uvit
        self.vae = vae
        self.clip_image = clip_image
        self.clip_text = clip_text
        self.caption_decoder = caption_decoder
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        cfg = uvit.config
        self.image_size = int(image_size if image_size is not None else cfg.img_size * VAE_FACTOR)
        self.steps, self.order, self.method, self.cfg_scale = steps, order, method, cfg_scale
        # text-to-image's own guidance scale (None: cfg_scale for both directions)
        self.t2i_cfg_scale = t2i_cfg_scale
        # every sample of a batch starts from the same noise: outputs depend on the condition only
        self.shared_noise = bool(shared_noise)
        self.seed, self.beam_size, self.max_caption_length = seed, beam_size, max_caption_length
        self._check_shapes()

    def _check_shapes(self) -> None:
        cfg = self.uvit.config
        checks = [
            ("VAE latent channels", self.vae.config.latent_channels, "U-ViT in_chans", cfg.in_chans),
            ("CLIP image embedding", self.clip_image.embed_dim, "U-ViT clip_img_dim", cfg.clip_img_dim),
            ("CLIP text tokens", self.clip_text.max_length, "U-ViT num_text_tokens", cfg.num_text_tokens),
            (
                "CLIP text width",
                self.clip_text.hidden_size,
                "caption decoder feature_dim",
                self.caption_decoder.feature_dim,
            ),
            ("caption decoder text_dim", self.caption_decoder.text_dim, "U-ViT text_dim", cfg.text_dim),
        ]
        for name_a, a, name_b, b in checks:
            if a != b:
                raise ValueError(f"BiDiffuser: {name_a} is {a} but {name_b} is {b}")
        if self.image_size % (VAE_FACTOR * cfg.patch_size):
            raise ValueError(
                f"BiDiffuser: image_size {self.image_size} must be a multiple of {VAE_FACTOR * cfg.patch_size} "
                f"(VAE factor x patch size)"
            )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def tiny(cls, corpus: Sequence[str] = (), seed: int = 0, image_size: int = 64, **sampler) -> BiDiffuser:
        """Every part tiny and random with consistent shapes: 64 px -> latent 4x8x8, CLIP image 32-d,
        CLIP text 16 tokens x 64, text latent 16 x 16. ``seed`` draws the weights and is also the sampler seed."""
        if "seed" in sampler:
            raise ValueError(
                "BiDiffuser.tiny: `seed` is both the weight seed and the sampler seed; pass it once"
            )
        corpus = list(corpus)
        config = dataclasses.replace(UViTConfig.tiny(), img_size=image_size // VAE_FACTOR)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            uvit = UViT(config)
        vae = tiny_autoencoder(seed)
        clip_image = ClipImageEncoder.tiny(embed_dim=config.clip_img_dim, image_size=32, seed=seed)
        clip_text = ClipTextEncoder.tiny(corpus, hidden_size=64, max_length=config.num_text_tokens, seed=seed)
        gpt2_tokenizer = build_tokenizer("gpt2", corpus, vocab_size=400)
        caption_decoder = CaptionDecoder.tiny(
            gpt2_tokenizer, feature_dim=clip_text.hidden_size, text_dim=config.text_dim, seed=seed
        )
        model = cls(
            uvit, vae, clip_image, clip_text, caption_decoder, image_size=image_size, seed=seed, **sampler
        )
        return model.freeze()

    @classmethod
    def random_v1(cls, corpus: Sequence[str] = (), seed: int = 0, device=None, **sampler) -> BiDiffuser:
        """Every part at the real shapes (U-ViT v1, SD KL-f8 VAE, CLIP ViT-B/32 image and ViT-L/14 text
        towers, GPT-2 small caption decoder) with random weights and no files: for benchmarks of the
        recipe at 512² on a GPU. Tokenizers are built locally (a small vocabulary inside the real
        embedding tables)."""
        from diffusers import AutoencoderKL
        from transformers import (
            CLIPTextConfig,
            CLIPTextModel,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            GPT2Config,
            GPT2LMHeadModel,
        )

        corpus = list(corpus)
        config = UViTConfig.v1()
        with torch.random.fork_rng(), torch.device(device or "cpu"):
            torch.manual_seed(seed)
            uvit = UViT(config)
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
            )
            vision = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    image_size=224,
                    patch_size=32,
                    projection_dim=config.clip_img_dim,
                )
            )
            clip_tok = build_tokenizer(
                "clip", corpus, vocab_size=1024, model_max_length=config.num_text_tokens
            )
            text = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=config.num_text_tokens,
                    bos_token_id=clip_tok.bos_token_id,
                    eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id,
                )
            )
            gpt_tok = build_tokenizer("gpt2", corpus, vocab_size=1024)
            gpt = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50258))
            decoder = CaptionDecoder(gpt, gpt_tok, text_dim=config.text_dim)
        model = cls(
            uvit,
            vae,
            ClipImageEncoder(vision),
            ClipTextEncoder(text, clip_tok, max_length=config.num_text_tokens),
            decoder,
            seed=seed,
            **sampler,
        )
        return model.freeze()

    @classmethod
    def from_paths(
        cls,
        *,
        uvit: str | Path,
        autoencoder: str | Path,
        clip_image: str | Path,
        clip_text: str | Path,
        caption_decoder: str | Path,
        gpt2_tokenizer: str | Path,
        image_size: int | None = None,
        uvit_config: dict | None = None,
        caption_decoder_heads: int | None = None,
        autoencoder_norm_groups: int | None = None,
        **sampler,
    ) -> BiDiffuser:
        """The real weights: a U-ViT checkpoint (original or diffusers format), ``autoencoder_kl.pth`` or a
        diffusers ``vae/`` folder, CLIP ViT-B/32 and ViT-L/14 folders, ``caption_decoder.pth`` and a GPT-2
        tokenizer folder. Nothing is downloaded. Head counts are not in the weights: ``uvit_config`` (e.g.
        ``{"num_heads": 24}``) and ``caption_decoder_heads`` override the 64-wide-head defaults; GroupNorm
        group counts neither: ``autoencoder_norm_groups`` for an LDM autoencoder file that does not use SD's
        32 (the tiny preset's: ``TINY_NORM_GROUPS``)."""
        for name, path in [
            ("uvit", uvit),
            ("autoencoder", autoencoder),
            ("clip_image", clip_image),
            ("clip_text", clip_text),
            ("caption_decoder", caption_decoder),
            ("gpt2_tokenizer", gpt2_tokenizer),
        ]:
            if not Path(path).exists():
                raise FileNotFoundError(f"BiDiffuser.from_paths: {name} not found: {path}")
        net = load_uvit(uvit, **(uvit_config or {}))
        model = cls(
            net,
            load_autoencoder(autoencoder, norm_num_groups=autoencoder_norm_groups),
            ClipImageEncoder.from_pretrained(clip_image),
            ClipTextEncoder.from_pretrained(clip_text, max_length=net.config.num_text_tokens),
            CaptionDecoder.load(caption_decoder, gpt2_tokenizer, n_head=caption_decoder_heads),
            image_size=image_size,
            **sampler,
        )
        return model.freeze()

    def fit_clip(
        self, images: torch.Tensor, captions: Sequence[Sequence[str]], unit_text_latent: bool = True, **kwargs
    ) -> list[float]:
        """Fit the two CLIP towers to each other on image-caption pairs (``clip.fit_clip``; ``kwargs``: steps,
        batch_size, lr, temperature, paraphrase, seed); returns the loss per step. For the tiny
        preset, whose towers are random: stage=bidiffuser runs it before training the U-ViT
        (``model.bidiffuser.clip_fit``), so that the text latent names what the pictures show.

        ``unit_text_latent``: then scale ``encode_prefix`` so that the text latents of these captions have
        unit root mean square. The U-ViT diffuses the text latent with unit-variance noise, as it does the
        image latent, which the VAE's 0.18215 puts at about unit scale; the tiny random ``encode_prefix``
        leaves the fitted text latent at 0.63, and the caption-to-picture half then leans on the text less
        (synthetic set, 1500 steps at batch 32, image-noise prediction error with its own caption / another
        one: 0.071 / 0.131 at 0.63, 0.068 / 0.138 at 1, 0.064 / 0.173 at 1.25). ``decode_prefix`` trains
        after this."""
        losses = fit_clip(self.clip_text, self.clip_image, self._check_images(images), captions, **kwargs)
        if unit_text_latent:
            flat = sorted({c for caps in captions for c in caps})
            with torch.no_grad():
                latents = torch.cat(
                    [self.encode_texts(flat[i : i + 256]).flatten() for i in range(0, len(flat), 256)]
                )
                scale = 1.0 / float(latents.pow(2).mean().sqrt())
                self.caption_decoder.encode_prefix.weight.mul_(scale)
                self.caption_decoder.encode_prefix.bias.mul_(scale)
        return losses

    def freeze(self) -> BiDiffuser:
        self.eval()
        self.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.uvit.parameters()).device

    def _generator(self, seed: int | None = None) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        expected = f"images as a float tensor [B, 3, {s}, {s}] with values in [0, 1]"
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"BiDiffuser: expected {expected}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"BiDiffuser: expected {expected}, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[0] == 0 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"BiDiffuser: expected {expected}, got shape {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"BiDiffuser: expected {expected}, got values in [{lo:.4g}, {hi:.4g}]")
        return images.to(self.device, torch.float32)

    @staticmethod
    def _check_texts(texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise ValueError(f"BiDiffuser: expected a non-empty list of prompts, got {texts!r}")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"BiDiffuser: prompt {i} must be a non-empty string, got {text!r}")
        return list(texts)

    def _sampler_kwargs(self, t2i: bool = False) -> dict:
        scale = self.t2i_cfg_scale if t2i and self.t2i_cfg_scale is not None else self.cfg_scale
        return dict(
            steps=self.steps,
            order=self.order,
            method=self.method,
            cfg_scale=scale,
            shared_noise=self.shared_noise,
        )

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, shared_noise: bool = False
    ) -> dict:
        """``[B, 3, H, W]`` in [0, 1] -> ``moments`` ``[B, 8, h, w]``, ``z`` (x0.18215) and ``clip_img`` ``[B, 1, D]``;
        ``shared_noise``: one posterior draw for the whole batch."""
        images = self._check_images(images)
        generator = generator if generator is not None else self._generator()
        moments = encode_moments(self.vae, images * 2.0 - 1.0)
        z = sample_latent(moments, generator, shared=shared_noise)
        clip_img = self.clip_image(images)
        return {"moments": moments, "z": z, "clip_img": clip_img}

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> clean text latents ``y = encode_prefix(CLIP-L(texts))`` ``[B, L, text_dim]``."""
        return self.caption_decoder.encode_prefix(self.clip_text(self._check_texts(texts)))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``decode_prefix(encode_prefix(CLIP-L(texts)))`` ``[B, L, feature_dim]``: a caption as an image feature."""
        return self.caption_decoder.decode_prefix(self.encode_texts(texts))

    # ------------------------------------------------------------------ i2t

    @torch.no_grad()
    def i2t_latents(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Images -> text latents ``y`` ``[B, L, text_dim]`` sampled with the image clean."""
        generator = self._generator(seed)
        enc = self.encode_images(images, generator=generator, shared_noise=self.shared_noise)
        return sample_i2t(
            self.uvit, self.schedule, enc["z"], enc["clip_img"], generator=generator, **self._sampler_kwargs()
        )

    @torch.no_grad()
    def i2t_features(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Images -> ``decode_prefix(y)`` ``[B, L, feature_dim]`` (``[B, 77, 768]`` for the real model)."""
        return self.caption_decoder.decode_prefix(self.i2t_latents(images, seed=seed))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, seed: int | None = None) -> list[str]:
        """Images -> one caption each (i2t, then the caption decoder's beam search)."""
        y = self.i2t_latents(images, seed=seed)
        return self.caption_decoder.generate_captions(
            y, beam_size=self.beam_size, max_length=self.max_caption_length
        )

    # ------------------------------------------------------------------ t2i

    @torch.no_grad()
    def t2i_latents(self, texts: Sequence[str], seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> sampled ``(z [B, 4, h, w], clip_img [B, 1, D])``."""
        y = self.encode_texts(texts)
        side = self.image_size // VAE_FACTOR
        img_shape = (self.uvit.config.in_chans, side, side)
        return sample_t2i(
            self.uvit,
            self.schedule,
            y,
            img_shape=img_shape,
            generator=self._generator(seed),
            **self._sampler_kwargs(t2i=True),
        )

    @torch.no_grad()
    def generate_tensors(self, texts: Sequence[str], seed: int | None = None) -> torch.Tensor:
        """Prompts -> images ``[B, 3, H, W]`` in [0, 1]."""
        z, _ = self.t2i_latents(texts, seed=seed)
        return ((decode(self.vae, z) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], seed: int | None = None) -> list[Image.Image]:
        """Prompts -> RGB PIL images of ``image_size`` pixels."""
        images = self.generate_tensors(texts, seed=seed)
        arrays = (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arrays]
