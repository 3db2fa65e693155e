"""UniDiffuser's caption decoder: GPT-2 prompted with the text latent (the paper).

The text latent ``y`` (``[B, 77, 64]``) is mapped back to CLIP-L's width by ``decode_prefix``
(Linear 64 -> 768) and fed to GPT-2 small as 77 prefix embeddings, then the caption tokens follow
(UniDiffuser ``libs/caption_decoder.py::ClipCaptionModel``, after ClipCap). ``encode_prefix``
(Linear 768 -> 64) is the other half of that bottleneck: it maps CLIP-L text features into the
U-ViT's text space.

Captions come from beam search exactly as UniDiffuser's ``generate_beam`` scores and stops:

- log-probabilities are ``log(softmax(logits / T))``;
- a beam that produced ``<|EOS|>`` is stopped: it keeps one candidate, token 0 at zero cost, and its
  length no longer grows;
- candidates are ranked by ``(sum of log-probs) / length``, where a live beam's length counts the
  token being added (the EOS included); the top ``beam`` of all ``beam x vocab`` candidates survive;
- after ``max_length`` steps, or once every beam is stopped, the best normalised score wins and its
  first ``length`` tokens are decoded with special tokens skipped.

The reference recomputes the whole sequence at every step and runs one image at a time; here the
GPT-2 keys/values are cached and reordered with the beams, and the images of a batch are searched
together (each image's search is independent and stops exactly where the reference's would).
When ``beam`` exceeds the vocabulary the surplus beams start dead (score -inf), which lets a beam
wide enough to hold every hypothesis search exhaustively.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, DynamicCache, GPT2Config, GPT2LMHeadModel

from easygen.checkpoint import load_state_dict_file

EOS_TOKEN = "<|EOS|>"

# Buffers older transformers versions stored in GPT-2 state dicts (causal mask); not parameters.
_GPT_BUFFER = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class CaptionDecoder(nn.Module):
    """GPT-2 with a ``decode_prefix(y)`` prefix; ``encode_prefix`` maps CLIP text features to ``y``."""

    def __init__(self, gpt: GPT2LMHeadModel, tokenizer, text_dim: int):
        super().__init__()
        self.gpt = gpt
        self.tokenizer = tokenizer
        feature_dim = gpt.config.n_embd
        self.encode_prefix = nn.Linear(feature_dim, text_dim)
        self.decode_prefix = nn.Linear(text_dim, feature_dim)
        eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN) if tokenizer is not None else None
        if tokenizer is not None and (eos is None or eos == tokenizer.unk_token_id):
            raise ValueError(f"CaptionDecoder: the tokenizer has no {EOS_TOKEN} token")
        self.eos_token_id = eos

    @property
    def feature_dim(self) -> int:
        return self.gpt.config.n_embd

    @property
    def text_dim(self) -> int:
        return self.encode_prefix.out_features

    # ------------------------------------------------------------------ constructors

    @classmethod
    def tiny(
        cls,
        tokenizer,
        feature_dim: int = 64,
        text_dim: int = 16,
        n_layer: int = 2,
        n_head: int = 2,
        n_positions: int = 128,
        seed: int = 0,
    ) -> CaptionDecoder:
        """A random small GPT-2 over ``tokenizer`` (e.g. ``build_tokenizer("gpt2", corpus)``)."""
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=feature_dim,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(GPT2LMHeadModel(config), tokenizer, text_dim)

    @classmethod
    def load(cls, path: str | Path, tokenizer_path: str | Path, n_head: int | None = None) -> CaptionDecoder:
        """Read UniDiffuser's ``caption_decoder.pth`` and a local GPT-2 tokenizer folder.

        The architecture is read off the weights (vocabulary, width, depth, positions); the head count
        is not in the weights and defaults to GPT-2's 64-wide heads (12 for GPT-2 small).
        """
        path, tokenizer_path = Path(path), Path(tokenizer_path)
        if not path.exists():
            raise FileNotFoundError(f"caption decoder checkpoint not found: {path}")
        if not tokenizer_path.is_dir():
            raise FileNotFoundError(f"GPT-2 tokenizer folder not found: {tokenizer_path}")
        raw = load_state_dict_file(path)
        # load_state_dict_file strips one "module." already; strip again in case it did not apply
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
        sd = {
            k: v
            for k, v in raw.items()
            if k.startswith(("gpt.", "encode_prefix.", "decode_prefix.")) and not _GPT_BUFFER.match(k)
        }
        for key in ("gpt.transformer.wte.weight", "gpt.transformer.wpe.weight", "encode_prefix.weight"):
            if key not in sd:
                raise ValueError(f"{path}: not a UniDiffuser caption decoder (missing {key!r})")
        vocab, n_embd = sd["gpt.transformer.wte.weight"].shape
        n_positions = sd["gpt.transformer.wpe.weight"].shape[0]
        n_layer = 1 + max(int(m[1]) for k in sd if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k)))
        text_dim = sd["encode_prefix.weight"].shape[0]

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        if EOS_TOKEN not in tokenizer.get_vocab():
            # as UniDiffuser: GPT-2's tokenizer plus <|EOS|> as the end of a caption (id 50257)
            tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        if len(tokenizer) != vocab:
            raise ValueError(
                f"{tokenizer_path}: tokenizer has {len(tokenizer)} tokens with {EOS_TOKEN}, but {path} "
                f"has a vocabulary of {vocab}"
            )
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head or n_embd // 64,
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        )
        model = cls(GPT2LMHeadModel(config), tokenizer, text_dim)
        expected = set(model.state_dict())
        if "gpt.lm_head.weight" not in sd:
            sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]  # tied to the input embedding
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: caption decoder keys do not match: missing {missing}, unexpected {unexpected}"
            )
        model.load_state_dict(sd, strict=True)
        model.eval().requires_grad_(False)
        return model

    # ------------------------------------------------------------------ training

    def forward(
        self, tokens: torch.Tensor, prefix_features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced caption loss.

        ``tokens`` ``[B, T]`` (caption ids ending with ``<|EOS|>``), ``prefix_features`` ``[B, L, feature_dim]``
        (CLIP-L text features; they pass through ``encode_prefix`` then ``decode_prefix`` as in
        UniDiffuser's training), ``mask`` ``[B, T]`` with 1 on real tokens. The prefix positions are not
        predicted (the reference scores them against dummy zeros; we leave them out of the loss).
        """
        if tokens.ndim != 2 or prefix_features.ndim != 3 or prefix_features.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"CaptionDecoder: expected tokens [B, T] and prefix_features [B, L, {self.feature_dim}], "
                f"got {tuple(tokens.shape)} and {tuple(prefix_features.shape)}"
            )
        if mask is None:
            mask = torch.ones_like(tokens)
        if mask.shape != tokens.shape:
            raise ValueError(
                f"CaptionDecoder: mask {tuple(mask.shape)} must match tokens {tuple(tokens.shape)}"
            )
        prefix = self.decode_prefix(self.encode_prefix(prefix_features))
        embeds = torch.cat([prefix, self.gpt.transformer.wte(tokens)], dim=1)
        attn = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1)
        logits = self.gpt(inputs_embeds=embeds, attention_mask=attn).logits
        # position L-1+j predicts token j
        pred = logits[:, prefix.shape[1] - 1 : -1]
        target = tokens.masked_fill(mask == 0, -100)
        return F.cross_entropy(
            pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), ignore_index=-100
        )

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate_beam(
        self,
        prefix_embeds: torch.Tensor,
        beam_size: int = 5,
        max_length: int = 67,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Beam search from GPT-2 prefix embeddings ``[B, L, feature_dim]``.

        Returns ``(tokens [B, beam, T], lengths [B, beam], scores [B, beam])`` sorted best first; row
        ``b, k`` is the caption ``tokens[b, k, :lengths[b, k]]`` with length-normalised score ``scores[b, k]``.
        """
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ValueError("generate_beam: no <|EOS|> id (pass eos_token_id)")
        if prefix_embeds.ndim != 3 or prefix_embeds.shape[-1] != self.feature_dim:
            raise ValueError(
                f"generate_beam: expected prefix embeddings [B, L, {self.feature_dim}], got {tuple(prefix_embeds.shape)}"
            )
        B, K, device = prefix_embeds.shape[0], beam_size, prefix_embeds.device
        temp = temperature if temperature > 0 else 1.0
        cache = DynamicCache()

        def log_probs(logits: torch.Tensor) -> torch.Tensor:
            # softmax().log() as the reference (not log_softmax): identical ranking, identical -inf underflow
            return (logits.float() / temp).softmax(-1).log()

        logits = self.gpt(inputs_embeds=prefix_embeds, cache=cache, use_cache=True).logits[:, -1]
        logp = log_probs(logits)  # [B, V]
        V = logp.shape[-1]
        k0 = min(K, V)
        scores, next_tokens = logp.topk(k0, dim=-1)
        if k0 < K:
            scores = torch.cat([scores, scores.new_full((B, K - k0), -float("inf"))], dim=1)
            next_tokens = torch.cat([next_tokens, next_tokens.new_zeros((B, K - k0))], dim=1)
        cache.reorder_cache(torch.arange(B, device=device).repeat_interleave(K))
        tokens = next_tokens.unsqueeze(-1)  # [B, K, 1]
        seq_lengths = torch.ones(B, K, device=device)
        is_stopped = next_tokens == eos
        done = is_stopped.all(-1)
        batch_offset = (torch.arange(B, device=device) * K).unsqueeze(1)

        for _ in range(max_length - 1):
            if bool(done.all()):
                break
            logits = self.gpt(input_ids=next_tokens.reshape(B * K, 1), cache=cache, use_cache=True).logits[
                :, -1
            ]
            logp = log_probs(logits).view(B, K, V)
            logp = logp.masked_fill(is_stopped.unsqueeze(-1), -float("inf"))
            logp[..., 0] = torch.where(is_stopped, torch.zeros_like(logp[..., 0]), logp[..., 0])
            scores_sum = scores.unsqueeze(-1) + logp
            lengths = seq_lengths + (~is_stopped).float()
            avg = scores_sum / lengths.unsqueeze(-1)
            avg_top, flat = avg.view(B, K * V).topk(K, dim=-1)
            source, new_tokens = flat // V, flat % V
            new_lengths = lengths.gather(1, source)
            new_scores = avg_top * new_lengths
            new_stopped = is_stopped.gather(1, source) | (new_tokens == eos)
            new_seq = torch.cat(
                [tokens.gather(1, source.unsqueeze(-1).expand_as(tokens)), new_tokens.unsqueeze(-1)], -1
            )

            # an image whose beams had all stopped keeps its result (the reference breaks there)
            keep = done.unsqueeze(1)
            source = torch.where(keep, torch.arange(K, device=device).expand(B, K), source)
            cache.reorder_cache((batch_offset + source).reshape(-1))
            scores = torch.where(keep, scores, new_scores)
            seq_lengths = torch.where(keep, seq_lengths, new_lengths)
            is_stopped = torch.where(keep, is_stopped, new_stopped)
            pad = torch.cat([tokens, tokens.new_zeros(B, K, 1)], -1)
            tokens = torch.where(keep.unsqueeze(-1), pad, new_seq)
            next_tokens = torch.where(keep, torch.zeros_like(new_tokens), new_tokens)
            done = done | is_stopped.all(-1)

        final = scores / seq_lengths
        order = final.argsort(dim=-1, descending=True)
        tokens = tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
        return tokens, seq_lengths.gather(1, order).long(), final.gather(1, order)

    @torch.no_grad()
    def generate_captions(
        self, text_latents: torch.Tensor, beam_size: int = 5, max_length: int = 67
    ) -> list[str]:
        """Text latents ``y`` ``[B, L, text_dim]`` -> one caption per row (best beam)."""
        if text_latents.ndim != 3 or text_latents.shape[-1] != self.text_dim:
            raise ValueError(
                f"generate_captions: expected text latents [B, L, {self.text_dim}], got {tuple(text_latents.shape)}"
            )
        if self.tokenizer is None:
            raise ValueError("generate_captions: the caption decoder has no tokenizer")
        prefix = self.decode_prefix(text_latents.to(self.decode_prefix.weight.dtype))
        tokens, lengths, _ = self.generate_beam(prefix, beam_size=beam_size, max_length=max_length)
        return [
            self.tokenizer.decode(tokens[b, 0, : int(lengths[b, 0])].tolist(), skip_special_tokens=True)
            for b in range(tokens.shape[0])
        ]
