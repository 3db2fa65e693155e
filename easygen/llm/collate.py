"""Batch collation for the LLM stages: caption, VQA and conversation samples into padded token batches.

Each sample becomes LLaVA-style turns (a caption sample is one "describe the image" turn and its
caption; a VQA sample is ``"<question> please giving an short answer."`` and an answer, the paper's LLM side), is
rendered by ``easygen.llm.templates`` and tokenised with labels computed from the real token boundaries.
The image span (``<Img>`` + N placeholders + ``</Img>``) is recorded by its start index so that
``EasyGen.forward`` can splice the projected BiDiffuser features there.

Training batches are right-padded with labels; eval batches (``eval_mode=True``) stop at the final
``ASSISTANT:`` and are left-padded so that generation continues every row from its last position.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from easygen.llm.templates import (
    CAPTION_PROMPTS,
    IGNORE_INDEX,
    IMAGE_MARKER,
    caption_prompt,
    encode,
    get_template,
    render,
    vqa_prompt,
)

log = logging.getLogger(__name__)


def _as_tensor(x, what: str, sample_id) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"sample {sample_id}: '{what}' must be a numpy array or tensor, got {type(x).__name__}"
        )
    return x


def most_common_answer(answers: Sequence) -> str:
    """The most frequent answer (VQAv2 gives ten per question); ties go to the first seen."""
    texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
    return Counter(texts).most_common(1)[0][0]


class EasyGenCollator:
    """Turn a list of sample dicts into an ``EasyGen`` batch.

    A sample has ``id``, ``kind`` ("caption" | "conversation" | "vqa"), and depending on the kind
    ``captions``, ``conversations`` (LLaVA turns with an ``<image>`` marker), ``question``/``answers``;
    optionally ``features`` ([L, D], the 77x768 i2t feature) and/or ``image`` (a tensor, for features
    computed on the fly).
    """

    def __init__(
        self,
        tokenizer,
        template: str = "vicuna_v1.1",
        max_length: int = 512,
        num_image_tokens: int = 77,
        seed: int = 0,
        image_tokens_from_features: bool = True,
        deferred_features: bool = False,
    ):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length
        self.num_image_tokens = num_image_tokens
        self.image_tokens_from_features = image_tokens_from_features
        # The caller supplies the features of every image row itself (caption-as-image alignment, the
        # paper's LLM side), so a sample may carry neither 'features' nor 'image'.
        self.deferred_features = deferred_features
        self.rng = random.Random(seed)
        self.eval_mode = False
        self.num_truncated = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""

    # -- samples to turns -------------------------------------------------------------------
    def _turns(self, sample: dict) -> tuple[list[dict], list[str] | None]:
        sid, kind = sample.get("id", "?"), sample.get("kind")
        if kind == "caption":
            captions = sample.get("captions")
            # a test split without references (NoCaps test) is generated for, never trained on
            unlabelled = self.eval_mode and captions == []
            if not (captions or unlabelled) or not all(isinstance(c, str) for c in captions):
                raise ValueError(
                    f"sample {sid}: kind 'caption' needs a non-empty list of strings in 'captions'"
                )
            # Eval always asks the same question so that scores do not depend on batch order.
            prompt = f"{IMAGE_MARKER} {CAPTION_PROMPTS[0] if self.eval_mode else caption_prompt(self.rng)}"
            target = "" if unlabelled else captions[0] if self.eval_mode else self.rng.choice(captions)
            return [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}], list(captions)
        if kind == "vqa":
            question, answers = sample.get("question"), sample.get("answers")
            # questions without answers (VQAv2 test-dev) are generated for, never trained on
            unlabelled = self.eval_mode and answers == []
            if not isinstance(question, str) or not (answers or unlabelled):
                raise ValueError(
                    f"sample {sid}: kind 'vqa' needs a string 'question' and a non-empty 'answers'"
                )
            prefix = f"{IMAGE_MARKER} " if self._has_visual(sample) else ""
            refs = [a["answer"] if isinstance(a, dict) else a for a in answers]
            return [
                {"from": "human", "value": prefix + vqa_prompt(question)},
                {"from": "gpt", "value": most_common_answer(answers) if answers else ""},
            ], refs
        if kind == "conversation":
            conv = sample.get("conversations")
            if not isinstance(conv, list) or not conv:
                raise ValueError(f"sample {sid}: kind 'conversation' needs a non-empty 'conversations' list")
            return conv, sample.get("captions")
        raise ValueError(f"sample {sid}: 'kind' must be 'caption', 'conversation' or 'vqa', got {kind!r}")

    def _has_visual(self, sample: dict) -> bool:
        return self.deferred_features or sample.get("features") is not None or sample.get("image") is not None

    # -- one sample --------------------------------------------------------------------------
    def encode_sample(self, sample: dict):
        sid = sample.get("id", "?")
        turns, refs = self._turns(sample)
        has_marker = any(IMAGE_MARKER in t.get("value", "") for t in turns)
        features = sample.get("features")
        if has_marker and not self._has_visual(sample):
            raise ValueError(
                f"sample {sid}: the prompt has an '{IMAGE_MARKER}' marker but no 'features' or 'image'"
            )
        if not has_marker and features is not None:
            raise ValueError(f"sample {sid}: has 'features' but no '{IMAGE_MARKER}' marker to place them")
        n_img = self.num_image_tokens
        if features is not None:
            features = _as_tensor(features, "features", sid)
            if features.dim() != 2:
                raise ValueError(
                    f"sample {sid}: 'features' must be [L, D], got shape {tuple(features.shape)}"
                )
            if self.image_tokens_from_features:
                n_img = features.shape[0]
            elif features.shape[0] != n_img:
                raise ValueError(f"sample {sid}: 'features' has {features.shape[0]} rows, expected {n_img}")
        rendered = render(
            self.template,
            turns,
            n_img if has_marker else 0,
            bos=self.bos,
            eos=self.eos,
            prompt_only=self.eval_mode,
            sample_id=sid,
        )
        enc = encode(self.tokenizer, rendered, placeholder_id=self.pad_id, sample_id=sid)
        ids, labels = enc.input_ids, enc.labels
        if len(ids) > self.max_length:
            if enc.image_start >= 0 and enc.image_start + enc.image_tokens > self.max_length:
                raise ValueError(
                    f"sample {sid}: max_length={self.max_length} would cut through the image span "
                    f"(positions {enc.image_start}..{enc.image_start + enc.image_tokens - 1})"
                )
            self.num_truncated += 1
            log.warning(
                "sample %s: %d tokens truncated to max_length=%d (%d samples truncated so far)",
                sid,
                len(ids),
                self.max_length,
                self.num_truncated,
            )
            if self.eval_mode:
                raise ValueError(
                    f"sample {sid}: the generation prompt has {len(ids)} tokens > max_length={self.max_length}"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(x == IGNORE_INDEX for x in labels):
                raise ValueError(
                    f"sample {sid}: truncation to max_length={self.max_length} removes every learned token"
                )
        return ids, labels, enc.image_start, features, refs

    # -- batch -------------------------------------------------------------------------------
    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("empty batch")
        rows = [self.encode_sample(s) for s in samples]
        width = max(len(r[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        image_positions = torch.full((batch,), -1, dtype=torch.long)
        has_image = torch.zeros(batch, dtype=torch.bool)
        feats, images = [], []
        for b, ((ids, lab, start, f, _), sample) in enumerate(zip(rows, samples)):
            n = len(ids)
            # Left padding for generation (every row continues from the last column), right otherwise.
            off = width - n if self.eval_mode else 0
            input_ids[b, off : off + n] = torch.tensor(ids)
            attention_mask[b, off : off + n] = 1
            labels[b, off : off + n] = torch.tensor(lab)
            if start >= 0:
                image_positions[b] = start + off
                has_image[b] = True
                if f is not None:
                    feats.append(f.float())
                if sample.get("image") is not None:
                    images.append(_as_tensor(sample["image"], "image", sample.get("id", "?")))
        if feats and len(feats) != int(has_image.sum()):
            missing = [s.get("id", "?") for s, r in zip(samples, rows) if r[2] >= 0 and r[3] is None]
            raise ValueError(
                f"samples {missing}: a batch mixes precomputed 'features' with samples lacking them"
            )
        if feats and len({tuple(f.shape) for f in feats}) > 1:
            shapes = {s.get("id", "?"): tuple(r[3].shape) for s, r in zip(samples, rows) if r[3] is not None}
            raise ValueError(f"features of different shapes in one batch: {shapes}")
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_positions": image_positions,
            "has_image": has_image,
            "features": torch.stack(feats) if feats else None,
            "images": torch.stack(images) if images else None,
            "ids": [s.get("id", "?") for s in samples],
        }
        if self.eval_mode:
            out["references"] = [r[4] for r in rows]
        else:
            out["labels"] = labels
        return out
