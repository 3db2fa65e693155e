"""Batch collation for EasyGen with FlanT5 ("Mid-Align", the paper's LLM side).

The T5 encoder reads the text prompt only: the image does not sit inside the prompt but in front of
the encoder's output states (``EasyGenT5.encode``), so the ``<image>`` marker is dropped from the text.
The decoder learns the last answer of the conversation (its labels: the answer's tokens and ``</s>``,
padding -100). Earlier turns of a dialogue become part of the encoder prompt.

For the feature-matching term of Mid-Align the batch also carries the tokenised caption of every
sample (``caption_input_ids``), when every sample of the batch has one; the T5 encoder's states of the
caption are the target the projected diffusion feature is pulled towards.

With a T5 tokenizer (sentencepiece, no BOS, ``</s>`` = 1, ``<pad>`` = 0) every encoder input is the
prompt's pieces followed by ``</s>``, padded with ``<pad>``. The decoder's inputs are not built here:
``T5ForConditionalGeneration`` shifts the labels right itself, starting from ``decoder_start_token_id``
(the pad id) and writing the pad id where a label is -100 (tests/test_t5_tokenizer.py checks both).
"""

from __future__ import annotations

import torch

from easygen.llm.collate import EasyGenCollator
from easygen.llm.templates import IGNORE_INDEX, IMAGE_MARKER


class T5Collator(EasyGenCollator):
    """``EasyGenCollator``'s samples (caption, VQA, conversation) as encoder prompt + decoder labels."""

    def __init__(
        self,
        tokenizer,
        max_length: int = 512,
        max_target_length: int = 128,
        seed: int = 0,
        deferred_features: bool = False,
        **_,
    ):
        super().__init__(
            tokenizer, template="plain", max_length=max_length, seed=seed, deferred_features=deferred_features
        )
        self.max_target_length = max_target_length

    def _tokens(self, text: str, limit: int, sample_id, what: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if len(ids) > limit:
            if self.eval_mode and what == "prompt":
                raise ValueError(f"sample {sample_id}: the prompt has {len(ids)} tokens > max_length={limit}")
            self.num_truncated += 1
            ids = ids[: limit - 1] + ids[-1:]
        return ids

    def encode_t5(self, sample: dict):
        sid = sample.get("id", "?")
        turns, refs = self._turns(sample)
        has_marker = any(IMAGE_MARKER in t.get("value", "") for t in turns)
        if has_marker and not self._has_visual(sample):
            raise ValueError(
                f"sample {sid}: the prompt has an '{IMAGE_MARKER}' marker but no 'features' or 'image'"
            )
        if turns[-1]["from"] == "gpt":
            history, answer = turns[:-1], turns[-1]["value"]
        else:
            history, answer = turns, None
        if not history:
            raise ValueError(f"sample {sid}: no user turn before the answer")
        if answer is None and not self.eval_mode:
            raise ValueError(f"sample {sid}: the last turn must be the answer ('gpt') for training")
        lines = []
        for t in history:
            text = " ".join(t["value"].replace(IMAGE_MARKER, " ").split())
            lines.append(text if t["from"] == "human" else f"Answer: {text}")
        source = self._tokens("\n".join(lines), self.max_length, sid, "prompt")
        target = None if self.eval_mode else self._tokens(answer, self.max_target_length, sid, "answer")
        features = sample.get("features")
        if features is not None:
            if not has_marker:
                raise ValueError(f"sample {sid}: has 'features' but no '{IMAGE_MARKER}' marker to place them")
            features = torch.as_tensor(features)
            if features.dim() != 2:
                raise ValueError(
                    f"sample {sid}: 'features' must be [L, D], got shape {tuple(features.shape)}"
                )
        caption = None
        if sample.get("captions"):
            caption = answer if sample.get("kind") == "caption" and answer else sample["captions"][0]
        return source, target, has_marker, features, refs, caption

    @staticmethod
    def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        return ids, mask

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("empty batch")
        rows = [self.encode_t5(s) for s in samples]
        input_ids, attention_mask = self._pad([r[0] for r in rows], self.pad_id)
        has_image = torch.tensor([r[2] for r in rows], dtype=torch.bool)
        feats = [r[3].float() for r in rows if r[3] is not None]
        if feats and len(feats) != int(has_image.sum()):
            missing = [s.get("id", "?") for s, r in zip(samples, rows) if r[2] and r[3] is None]
            raise ValueError(
                f"samples {missing}: a batch mixes precomputed 'features' with samples lacking them"
            )
        images = [
            torch.as_tensor(s["image"]) for s, r in zip(samples, rows) if r[2] and s.get("image") is not None
        ]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "has_image": has_image,
            "image_positions": torch.full((len(rows),), -1, dtype=torch.long),
            "features": torch.stack(feats) if feats else None,
            "images": torch.stack(images) if images else None,
            "ids": [s.get("id", "?") for s in samples],
        }
        if self.eval_mode:
            out["references"] = [r[4] for r in rows]
            return out
        labels, label_mask = self._pad([r[1] for r in rows], IGNORE_INDEX)
        out["labels"] = labels.masked_fill(label_mask == 0, IGNORE_INDEX)
        captions = [r[5] for r in rows]
        if all(c is not None for c in captions):
            cap = [
                self._tokens(c, self.max_target_length, s.get("id", "?"), "caption")
                for c, s in zip(captions, samples)
            ]
            out["caption_input_ids"], out["caption_attention_mask"] = self._pad(cap, self.pad_id)
        return out
