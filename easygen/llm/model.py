"""The EasyGen model on the LLM side: projector + decoder-only LLM (the paper's overview and LLM side).

The 77x768 i2t feature of an image (BiDiffuser's text latent through ``decode_prefix``) goes through
the projector to 77 soft tokens of the LLM's width, which replace the placeholder positions of the
``<Img>...</Img>`` span that the collator left in the prompt. The LLM then runs on ``inputs_embeds``;
the loss is its usual next-token loss over the labels (-100 everywhere but the answers).

Position ids are derived from the attention mask so that a left-padded (generation) and a
right-padded (training) batch give every real token the position it would have alone.
"""

from __future__ import annotations

import torch
from torch import nn

from easygen.llm.projector import Projector


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; padded positions get 0 (they are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class EasyGen(nn.Module):
    def __init__(
        self, llm: nn.Module, projector: nn.Module | None = None, tokenizer=None, feature_dim: int = 768
    ):
        super().__init__()
        self.llm = llm
        hidden = llm.get_input_embeddings().embedding_dim
        self.projector = (
            projector if projector is not None else Projector(feature_dim, 4 * feature_dim, hidden)
        )
        self.tokenizer = tokenizer

    # -- the splice -------------------------------------------------------------------------
    def embed(self, input_ids, features=None, image_positions=None, has_image=None) -> torch.Tensor:
        """Token embeddings with the projected features written over each image span."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if features is None or has_image is None or not bool(has_image.any()):
            return embeds
        if image_positions is None:
            raise ValueError("features were given without image_positions")
        rows = has_image.nonzero().squeeze(1)
        if features.shape[0] != rows.numel():
            raise ValueError(
                f"features has {features.shape[0]} rows but has_image marks {rows.numel()} samples with images"
            )
        n = features.shape[1]
        starts = image_positions.to(rows.device)[rows]
        if bool((starts < 0).any()) or bool((starts + n > input_ids.shape[1]).any()):
            raise ValueError(
                f"image spans out of range: starts {starts.tolist()} with {n} tokens in a sequence of {input_ids.shape[1]}"
            )
        proj_param = next(self.projector.parameters())
        projected = self.projector(features.to(device=proj_param.device, dtype=proj_param.dtype)).to(
            embeds.dtype
        )
        cols = starts[:, None] + torch.arange(n, device=starts.device)
        # index_put (out of place) keeps the graph to both the embeddings and the projector.
        return embeds.index_put((rows[:, None].expand(-1, n), cols), projected)

    def forward(
        self,
        input_ids,
        attention_mask,
        labels=None,
        features=None,
        image_positions=None,
        has_image=None,
        position_ids=None,
        **llm_kwargs,
    ):
        embeds = self.embed(input_ids, features, image_positions, has_image)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            **llm_kwargs,
        )

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask,
        features=None,
        image_positions=None,
        has_image=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        stop_strings=None,
        streamer=None,
        return_ids: bool = False,
    ):
        """Decode answers for a left-padded prompt batch (KV cache through the LLM's ``generate``).

        Returns the decoded strings, each cut at the first stop string; with ``return_ids`` also the
        generated token ids.
        """
        if self.tokenizer is None:
            raise ValueError("EasyGen.generate needs the model's tokenizer (EasyGen(llm, tokenizer=...))")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "generation prompts must be left-padded (the last column is padding in some rows)"
            )
        embeds = self.embed(input_ids, features, image_positions, has_image)
        tok = self.tokenizer
        kwargs = dict(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
            use_cache=True,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            streamer=streamer,
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            # Explicit neutral values so a checkpoint's generation_config does not turn sampling knobs on.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kwargs.update(
                stop_strings=list(stop_strings) if not isinstance(stop_strings, str) else [stop_strings]
            )
            kwargs.update(tokenizer=tok)
        out = self.llm.generate(**kwargs)
        # With inputs_embeds only, decoder-only generate returns just the new tokens.
        texts = tok.batch_decode(out, skip_special_tokens=True)
        texts = [cut_at_stop(t, stop_strings).strip() for t in texts]
        return (texts, out) if return_ids else texts

    # -- training helpers -------------------------------------------------------------------
    def freeze_llm(self, train_lm_head: bool = False) -> None:
        """Freeze the LLM (alignment stage). The reference leaves ``lm_head`` trainable by accident;
        here it is a choice."""
        for p in self.llm.parameters():
            p.requires_grad_(False)
        if train_lm_head:
            for p in self.llm.get_output_embeddings().parameters():
                p.requires_grad_(True)

    def trainable_parameter_groups(
        self, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: the projector (own lr, as LLaVA's ``mm_projector_lr``), then the LLM's
        trainable weights with and without weight decay (biases and norms get none)."""
        groups = []
        proj = [p for p in self.projector.parameters() if p.requires_grad]
        if proj:
            groups.append(
                {
                    "name": "projector",
                    "params": proj,
                    "lr": projector_lr if projector_lr is not None else lr,
                    "weight_decay": weight_decay,
                }
            )
        decay, no_decay = [], []
        for name, p in self.llm.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
        if decay:
            groups.append({"name": "llm", "params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": "llm_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
        return groups

    def flops_per_token(self, seq_len: int = 512, training: bool = True) -> float:
        """Model FLOPs per token (the MFU numerator).

        Forward: 2 FLOPs per weight of every matmul (embedding lookups excluded, ``lm_head`` included)
        plus attention's QK^T and AV, 4 * layers * seq_len * width. Training adds the backward pass
        to the inputs (2N, paid even by a frozen LLM because the projector needs the gradient, experiments/RESULTS.md)
        and weight gradients (2N) for trainable weights only; attention backward is twice its forward.
        """
        emb = self.llm.get_input_embeddings().weight
        matmul, trainable = 0, 0
        for module in self.llm.modules():
            if isinstance(module, nn.Linear):
                matmul += module.weight.numel()
                trainable += module.weight.numel() if module.weight.requires_grad else 0
        if matmul == 0:  # e.g. GPT-2's Conv1D: count all non-embedding weights instead
            matmul = sum(p.numel() for p in self.llm.parameters() if p.dim() == 2 and p is not emb)
            trainable = sum(
                p.numel() for p in self.llm.parameters() if p.dim() == 2 and p is not emb and p.requires_grad
            )
        cfg = self.llm.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
        attn = 4 * layers * seq_len * width
        if not training:
            return 2.0 * matmul + attn
        return 4.0 * matmul + 2.0 * trainable + 3.0 * attn


def cut_at_stop(text: str, stop_strings) -> str:
    """Cut ``text`` at the earliest stop string (the LLM's ``generate`` stops after it, keeping it)."""
    if not stop_strings:
        return text
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
