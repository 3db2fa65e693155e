"""Evaluation metrics, one module per family (the paper's evaluation and the benchmarks it reports):

- ``captions``: COCO caption scores through pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE), NoCaps;
- ``vqa``: VQA accuracy as the official VQAv2 evaluation computes it (VQAv2, OK-VQA), and TextVQA's
  (the EvalAI answer processor);
- ``gqa``: GQA accuracy as GQA's own evaluation computes it on the balanced splits;
- ``choice``: multiple choice with circular evaluation and rule-based answer extraction (MMBench);
- ``pictures``: FID and CLIP score for text-to-image.

The names below import from ``easygen.metrics`` directly.
"""

from easygen.metrics.captions import (
    NOCAPS_DOMAINS,
    caption_scores,
    close_meteor,
    nocaps_scores,
    prewarm_meteor,
    ptb_tokenize,
    spice_models_available,
)
from easygen.metrics.choice import circular_scores, extract_choice, rotations
from easygen.metrics.gqa import gqa_normalize, gqa_scores
from easygen.metrics.pictures import clip_score, fid_score, require_torch_fidelity
from easygen.metrics.vqa import (
    evalai_normalize,
    textvqa_accuracy,
    textvqa_scores,
    vqa_accuracy,
    vqa_normalize,
    vqa_scores,
)

__all__ = [
    "caption_scores",
    "ptb_tokenize",
    "vqa_normalize",
    "vqa_accuracy",
    "vqa_scores",
    "fid_score",
    "require_torch_fidelity",
    "clip_score",
    "spice_models_available",
    "prewarm_meteor",
    "close_meteor",
    "nocaps_scores",
    "NOCAPS_DOMAINS",
    "evalai_normalize",
    "textvqa_accuracy",
    "textvqa_scores",
    "gqa_normalize",
    "gqa_scores",
    "extract_choice",
    "rotations",
    "circular_scores",
]
