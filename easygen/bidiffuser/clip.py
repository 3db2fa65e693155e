"""The frozen CLIP encoders of BiDiffuser (SPEC §1).

- ``ClipImageEncoder``: CLIP ViT-B/32's projected image embedding (``image_embeds``, 512-d) as the
  one-token ``clip_img`` input of the U-ViT, ``[B, 1, 512]``. UniDiffuser (and the paper's image-to-text
  feature) feed the 512-pixel picture to OpenAI CLIP's own preprocessing as a PIL image: PIL bicubic
  resize of the short side to 224, center crop, CLIP mean/std. It is done the same way here, with PIL on
  the uint8 picture (easygen/images.py), so that the embedding is the paper's.
- ``ClipTextEncoder``: CLIP ViT-L/14's text transformer, ``last_hidden_state`` of the prompt padded to
  77 tokens, ``[B, 77, 768]`` (UniDiffuser's ``FrozenCLIPEmbedder``: no attention mask, so the padded
  positions are encoded too; CLIP's causal mask keeps them from changing the earlier ones).

Both load from a local folder (``from_pretrained(..., local_files_only=True)``) or build a tiny random
preset with a locally trained tokenizer. They are frozen: eval mode, no gradients.

``fit_clip`` gives the tiny preset's random towers what makes CLIP CLIP: a text embedding that says what
the picture shows. A random text tower's output is mostly phrasing and word position: on the synthetic
set's captions the five attributes explain 27 % of its variance, and a U-ViT trained on that text latent
(stage=bidiffuser, 1500 and 4000 steps) predicts the image noise as well with another caption's latent as
with its own, i.e. text-to-image ignores the prompt (experiments/t2i_probe.py). The fit trains both towers
with CLIP's symmetric contrastive loss on the training pairs, before the U-ViT is trained on their outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from easygen.llm.tokenization import build_tokenizer

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
        """OpenAI CLIP's transform of each picture as a PIL image: the ``[0, 1]`` values back to uint8, PIL
        bicubic resize of the short side to ``image_size`` (the long side ``int(size * long / short)``),
        center crop (offsets ``round((h - size) / 2)``), / 255, CLIP's mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"ClipImageEncoder: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}"
            )
        size = self.image_size
        pixels = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        out = []
        for array in pixels.numpy():
            img = Image.fromarray(array, "RGB")
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            if short != size:
                new_long = int(size * long / short)
                img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
            w, h = img.size
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
            out.append(torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
        x = torch.stack(out).to(images.device)
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


def fit_clip(
    text: ClipTextEncoder,
    image: ClipImageEncoder,
    images: torch.Tensor,
    captions: Sequence[Sequence[str]],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 0.07,
    paraphrase: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Fit the two towers to each other on image-caption pairs with CLIP's contrastive loss; returns the loss
    of every step. ``images`` ``[N, 3, H, W]`` in [0, 1], ``captions[i]`` the captions of picture i.

    Each step draws ``batch_size`` pictures and one caption of each; the symmetric cross-entropy over the
    batch's caption-picture cosine similarities (divided by ``temperature``) scores each caption against
    its own picture. A picture that the drawn caption also describes (a caption of it: the same picture
    drawn twice, or another picture with the same captions) is not counted as a negative. The image side is
    the tower's projected embedding (``clip_img``); the text side is the mean over all tokens of
    ``last_hidden_state`` through a linear head used only here: the U-ViT reads every token of the text
    latent (UniDiffuser feeds CLIP's whole last hidden state), so every token is asked to carry the content,
    not only the end-of-text one.

    ``paraphrase`` weighs the same loss between the drawn caption and a second caption drawn for the same
    picture. The picture side alone lets the text tower drop what the young image tower does not yet see
    (on the synthetic set: position and shape words), which the picture-to-caption direction needs; two
    captions of one picture differ only in phrasing, so this term keeps every word that tells pictures
    apart and removes the phrasing. Deterministic given ``seed``; the towers are frozen again afterwards."""
    n = _check_pairs(images, captions)
    if steps < 0 or batch_size < 2 or lr <= 0 or temperature <= 0 or paraphrase < 0:
        raise ValueError(
            f"fit_clip: need steps >= 0, batch_size >= 2, lr > 0, temperature > 0 and paraphrase >= 0, got "
            f"steps={steps}, batch_size={batch_size}, lr={lr}, temperature={temperature}, paraphrase={paraphrase}"
        )
    device = next(text.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    flat = sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(flat)}
    token_ids = text.tokenize(flat).to(device)
    caption_ids = [[index[c] for c in caps] for caps in captions]
    # owners[c, i]: flat caption c describes picture i
    owners = torch.zeros(len(flat), n, dtype=torch.bool)
    for i, ids in enumerate(caption_ids):
        owners[ids, i] = True
    pixels = image.preprocess(images.to(device)).to(image.model.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(text.hidden_size, image.embed_dim).to(device)
    params = [*text.model.parameters(), *image.model.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def draw_captions(pick: torch.Tensor) -> torch.Tensor:
        rows = [caption_ids[i] for i in pick.tolist()]
        return torch.tensor([r[int(torch.randint(0, len(r), (1,), generator=generator))] for r in rows])

    def embed_texts(drawn: torch.Tensor) -> torch.Tensor:
        hidden = text.model(input_ids=token_ids[drawn.to(device)]).last_hidden_state
        return F.normalize(head(hidden.mean(dim=1)).float(), dim=-1)

    def contrastive(a: torch.Tensor, b: torch.Tensor, not_negative: torch.Tensor) -> torch.Tensor:
        logits = (a @ b.T / temperature).masked_fill(not_negative, float("-inf"))
        target = torch.arange(len(a), device=device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                pick = torch.randint(0, n, (batch_size,), generator=generator)
                drawn = draw_captions(pick)
                t = embed_texts(drawn)
                v = F.normalize(
                    image.model(pixel_values=pixels[pick.to(device)]).image_embeds.float(), dim=-1
                )
                not_negative = (owners[drawn][:, pick] & ~torch.eye(batch_size, dtype=torch.bool)).to(device)
                loss = contrastive(t, v, not_negative)
                if paraphrase:
                    loss = loss + paraphrase * contrastive(t, embed_texts(draw_captions(pick)), not_negative)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        _freeze(text)
        _freeze(image)
    return losses


def _check_pairs(images: torch.Tensor, captions: Sequence[Sequence[str]]) -> int:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or not len(images):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"fit_clip: expected images [N, 3, H, W] in [0, 1], got {shape}")
    if isinstance(captions, str) or len(captions) != len(images):
        raise ValueError(
            f"fit_clip: expected one list of captions per picture ({len(images)}), got {len(captions)}"
        )
    for i, caps in enumerate(captions):
        if isinstance(caps, str) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(
                f"fit_clip: picture {i} needs a non-empty list of non-empty captions, got {caps!r}"
            )
    return len(images)
