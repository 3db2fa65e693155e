"""The LightningModule of EasyGen's FlanT5 variant, "Mid-Align" (paper §3.4; easygen/llm/t5.py): the
projected BiDiffuser feature enters after the frozen T5 encoder, in front of its output states, and
training adds the feature-matching term. `model=tiny_t5` and `model=flant5xl` name it (`model.module`).
Everything else (feature sources, the standardiser, checkpoints, the optimiser) is `EasyGenModule`'s;
this class overrides the steps where an encoder-decoder differs from a decoder-only LLM."""

from __future__ import annotations

import logging

import torch
from torch import nn

from easygen.errors import ConfigError
from easygen.factories import build_projector
from easygen.lit.easygen_module import EasyGenModule
from easygen.lit.fsdp import shard_easygen_t5
from easygen.llm.t5 import EasyGenT5
from easygen.llm.t5_collate import T5Collator

log = logging.getLogger("easygen")


class EasyGenT5Module(EasyGenModule):
    # the prompt (image marker dropped) for the encoder, the answer as decoder labels, the caption for
    # the feature-matching term (easygen/llm/t5_collate.py)
    collator_class = T5Collator
    # easygen.export writes decoder-only LLMs (merged LoRA, transformers folders): not an encoder-decoder
    standalone_llm_export = False

    def check_config(self) -> None:
        if self.lora_cfg.get("enabled") and self.stage_cfg.get("train_llm"):
            raise ConfigError(
                "lora=on is for decoder-only LLMs; with model.llm.preset=t5|tiny-t5 use lora=off"
            )

    def build_model(self, llm: nn.Module) -> nn.Module:
        weight = float(self.cfg["model"]["llm"].get("mid_align_weight", 1.0))
        return EasyGenT5(llm, build_projector(self.cfg), align_weight=weight)

    def shard(self, device_mesh, strategy_cfg: dict) -> None:
        """FSDP2 (`strategy=fsdp`): one unit per T5 encoder and decoder block (easygen/lit/fsdp.py)."""
        shard_easygen_t5(self, device_mesh, strategy_cfg)

    @property
    def llm(self):
        """The T5 inside the Mid-Align wrapper (`EasyGenT5.t5`)."""
        return self.model.t5

    def _set_llm_trainable(self, m: nn.Module) -> None:
        """Mid-Align: the T5 encoder stays frozen (the image enters after it); `stage.train_llm` trains
        the decoder."""
        if self.stage_cfg.get("train_llm"):
            for name, p in m.t5.named_parameters():
                if not name.startswith("encoder.") and name != "shared.weight":
                    p.requires_grad_(True)
        head = m.t5.get_output_embeddings().weight
        if self.stage_cfg.get("train_lm_head"):
            if head is m.t5.get_input_embeddings().weight:
                # transformers ties T5's lm_head to the shared (encoder) embeddings: Mid-Align keeps them frozen
                log.info(
                    "stage.train_lm_head: the T5 lm_head is the frozen encoder's embedding table; not trained"
                )
            else:
                head.requires_grad_(True)
        m.t5.train(bool(self.stage_cfg.get("train_llm", False)))

    def t5_features(self, batch: dict, feats: torch.Tensor | None) -> torch.Tensor:
        """Mid-Align puts the image in front of every encoder output: each sample needs a picture."""
        if feats is None or not bool(batch["has_image"].all()):
            ids = [i for i, h in zip(batch["ids"], batch["has_image"].tolist()) if not h]
            raise ValueError(f"samples {ids[:5]}: the FlanT5 Mid-Align model needs an image in every sample "
                             "(the synthetic set's draw requests have none: set stage.extra_train=null)")
        return feats

    def forward_loss(self, batch: dict, feats: torch.Tensor | None):
        """LM loss + `model.llm.mid_align_weight` x the feature-matching MSE (easygen/llm/t5.py); the latter
        is logged on its own as `train/mid_align_loss`."""
        out = self.model(
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            features=self.t5_features(batch, feats),
            caption_input_ids=batch.get("caption_input_ids"),
            caption_attention_mask=batch.get("caption_attention_mask"),
        )
        if out.align_loss is not None:
            self.log("train/mid_align_loss", out.align_loss, batch_size=batch["input_ids"].shape[0])
        return out

    def generate_texts(
        self, batch: dict, feats: torch.Tensor | None, max_new_tokens: int, num_beams: int
    ) -> list[str]:
        ids = self.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            features=self.t5_features(batch, feats),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
        )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def flops_per_token(self, seq_len: int) -> float:
        # 2 FLOPs per weight and token forward, backward to the inputs 2 more, weight gradients 2 if trained
        n = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return float(4 * n + 2 * trained)
