"""The frozen CLIP encoders of BiDiffuser (SPEC §1).

- ``ClipImageEncoder``: CLIP ViT-B/32's projected image embedding (``image_embeds``, 512-d) as the
  one-token ``clip_img`` input of the U-ViT, ``[B, 1, 512]``. UniDiffuser feeds the OpenAI CLIP
  preprocessing (bicubic resize of the short side to 224, center crop, CLIP mean/std); it is done here
  in torch on ``[0, 1]`` tensors so it runs batched on the accelerator.
- ``ClipTextEncoder``: CLIP ViT-L/14's text transformer, ``last_hidden_state`` of the prompt padded to
  77 tokens, ``[B, 77, 768]`` (UniDiffuser's ``FrozenCLIPEmbedder``: no attention mask, so the padded
  positions are encoded too; CLIP's causal mask keeps them from changing the earlier ones).

Both load from a local folder (``from_pretrained(..., local_files_only=True)``) or build a tiny random
preset with a locally trained tokenizer. They are frozen: eval mode, no gradients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from easygen.tokenization import build_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {path}")
    return path


def _freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class ClipImageEncoder(nn.Module):
    """``[B, 3, H, W]`` images in [0, 1] -> CLIP ``image_embeds`` ``[B, 1, projection_dim]``."""

    def __init__(
        self,
        model: CLIPVisionModelWithProjection,
        image_size: int | None = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__()
        self.model = model
        self.image_size = int(image_size or model.config.image_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipImageEncoder:
        """Load a CLIP (vision) checkpoint folder; preprocessing from its ``preprocessor_config.json`` if present."""
        path = _existing_dir(path, "CLIP image encoder")
        model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
        size, mean, std = None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.exists():
            cfg = json.loads(pre.read_text())
            crop = cfg.get("crop_size", model.config.image_size)
            size = crop["height"] if isinstance(crop, dict) else crop
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(model, image_size=size, mean=mean, std=std)

    @classmethod
    def tiny(cls, embed_dim: int = 32, image_size: int = 32, seed: int = 0) -> ClipImageEncoder:
        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            projection_dim=embed_dim,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIPVisionModelWithProjection(config)
        return cls(model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """OpenAI CLIP's transform in torch: bicubic short-side resize, center crop, normalise."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"ClipImageEncoder: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}"
            )
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = images.float()
        if (new_h, new_w) != (h, w):
            # antialias matches PIL's bicubic when shrinking (the usual case: 512 -> 224)
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds.unsqueeze(1)


class ClipTextEncoder(nn.Module):
    """List of prompts -> CLIP text ``last_hidden_state`` ``[B, max_length, hidden]``."""

    def __init__(self, model: CLIPTextModel, tokenizer, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model.config.max_position_embeddings)
        _freeze(self)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 77) -> ClipTextEncoder:
        """A folder with a CLIP text model and its tokenizer (``openai/clip-vit-large-patch14`` layout)."""
        path = _existing_dir(path, "CLIP text encoder")
        model = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(model, tokenizer, max_length=max_length)

    @classmethod
    def tiny(
        cls, corpus: Sequence[str] = (), hidden_size: int = 64, max_length: int = 16, seed: int = 0
    ) -> ClipTextEncoder:
        tokenizer = build_tokenizer("clip", corpus, vocab_size=400, model_max_length=max_length)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIPTextModel(config)
        return cls(model, tokenizer, max_length=max_length)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not texts:
            raise ValueError("ClipTextEncoder: expected a non-empty list of strings")
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return enc["input_ids"]

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = self.tokenize(texts).to(device)
        return self.model(input_ids=ids).last_hidden_state
