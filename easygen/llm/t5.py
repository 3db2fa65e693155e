"""EasyGen with FlanT5: the "Mid-Align" variant of the paper (the paper's LLM side).

The frozen T5 encoder reads the text prompt; the projected BiDiffuser feature (77 soft tokens of width
``d_model``) is inserted into the encoder *output* sequence, in front of the prompt's encoder states,
and the T5 decoder cross-attends to both. Training adds a feature-matching term that pulls the
projected diffusion feature towards the T5 encoder's representation of the image's caption:

    loss = LM loss + align_weight * MSE(mean_n P(f)_n, mean_t Enc(caption)_t)

Mean pooling (over the 77 latent positions and over the caption's real tokens) is our choice: the 77
positions of the CLIP-L text latent and the caption's T5 tokens come from different tokenizers and are
not aligned one to one, so a token-aligned MSE would compare unrelated positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from easygen.llm.projector import Projector


@dataclass
class T5Output:
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    align_loss: torch.Tensor | None
    logits: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class EasyGenT5(nn.Module):
    def __init__(
        self,
        t5: nn.Module,
        projector: nn.Module | None = None,
        feature_dim: int = 768,
        align_weight: float = 1.0,
    ):
        super().__init__()
        self.t5 = t5
        d_model = t5.config.d_model
        self.projector = (
            projector if projector is not None else Projector(feature_dim, 4 * feature_dim, d_model)
        )
        self.align_weight = align_weight
        for p in self.t5.get_encoder().parameters():
            p.requires_grad_(False)

    def encode(self, input_ids, attention_mask, features=None):
        """Encoder states with the projected image tokens in front; returns ``(states, mask, projected)``."""
        # The encoder is frozen and the image enters after it, so no gradient is needed here.
        with torch.no_grad():
            states = self.t5.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        if features is None:
            return states, attention_mask, None
        if features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"features has {features.shape[0]} samples, the prompts {input_ids.shape[0]}")
        projected = self.projector(features.to(next(self.projector.parameters()).dtype)).to(states.dtype)
        ones = attention_mask.new_ones(projected.shape[:2])
        return torch.cat([projected, states], 1), torch.cat([ones, attention_mask], 1), projected

    def forward(
        self,
        input_ids,
        attention_mask,
        labels=None,
        features=None,
        caption_input_ids=None,
        caption_attention_mask=None,
    ) -> T5Output:
        states, mask, projected = self.encode(input_ids, attention_mask, features)
        out = self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask, labels=labels
        )
        lm_loss = out.loss
        align_loss = None
        if caption_input_ids is not None and projected is not None:
            if caption_attention_mask is None:
                caption_attention_mask = torch.ones_like(caption_input_ids)
            with torch.no_grad():
                target = self.t5.get_encoder()(
                    input_ids=caption_input_ids, attention_mask=caption_attention_mask
                ).last_hidden_state
            align_loss = F.mse_loss(
                projected.float().mean(1), masked_mean(target.float(), caption_attention_mask)
            )
        loss = lm_loss
        if align_loss is not None:
            loss = align_loss * self.align_weight if loss is None else loss + self.align_weight * align_loss
        return T5Output(loss=loss, lm_loss=lm_loss, align_loss=align_loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, features=None, **generate_kwargs):
        states, mask, _ = self.encode(input_ids, attention_mask, features)
        return self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask, **generate_kwargs
        )
