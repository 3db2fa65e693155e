"""Evaluation metrics, one module per family (the paper's evaluation and the benchmarks it reports):

- ``captions``: COCO caption scores through pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr, SPICE);
- ``vqa``: VQA accuracy as the official VQAv2 evaluation computes it (VQAv2, OK-VQA);
- ``pictures``: FID and CLIP score for text-to-image.

The names below import from ``easygen.metrics`` directly.
"""

from easygen.metrics.captions import (
    caption_scores,
    close_meteor,
    prewarm_meteor,
    ptb_tokenize,
    spice_models_available,
)
from easygen.metrics.pictures import clip_score, fid_score, require_torch_fidelity
from easygen.metrics.vqa import vqa_accuracy, vqa_normalize, vqa_scores

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
]
