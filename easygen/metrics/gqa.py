"""GQA accuracy on the balanced splits, as GQA's own evaluation computes it (``eval.py`` of the GQA
release, gqadataset.org):

- only the questions marked ``isBalanced`` are scored (all of ``testdev_balanced_questions.json``);
- a question scores 1 when the prediction string equals the gold ``answer`` exactly, else 0
  (``correct = (predicted == gold)``); accuracy is the mean over questions;
- the breakdown: ``binary`` / ``open`` (open when ``types["structural"] == "query"``), accuracy per
  structural type (query, verify, logical, choose, compare) and per semantic type (obj, attr, cat, rel,
  global).

``eval.py`` compares the prediction file's strings as they are; the prediction a model writes there is
its answer with trailing periods removed and lower-cased (LLaVA's ``scripts/convert_gqa_for_eval.py``,
``text.rstrip('.').lower()``), which :func:`gqa_normalize` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

__all__ = ["gqa_normalize", "gqa_scores"]


def gqa_normalize(prediction: str) -> str:
    """The answer as written to GQA's predictions file: trailing periods removed, lower case."""
    if not isinstance(prediction, str):
        raise ValueError(f"gqa_normalize: prediction must be a str, got {type(prediction).__name__}")
    return prediction.rstrip(".").lower()


def gqa_scores(predictions: Mapping[Hashable, str], questions: Mapping[Hashable, Mapping]) -> dict[str, float]:
    """GQA accuracy of ``predictions`` (id -> the prediction file's string, see :func:`gqa_normalize`)
    over ``questions`` (id -> the questions file's record: ``answer``, ``isBalanced``,
    ``types: {structural, semantic}``). Every balanced question needs a prediction.

    Returns ``accuracy``, ``binary``, ``open``, ``structural/<type>`` and ``semantic/<type>`` (fractions
    in [0, 1]; eval.py prints them x100)."""
    balanced = {i: q for i, q in questions.items() if q.get("isBalanced", True)}
    missing = [i for i in balanced if i not in predictions]
    if missing:
        raise ValueError(
            f"gqa_scores: {len(missing)} balanced question(s) without a prediction: {missing[:20]!r}"
        )
    if not balanced:
        raise ValueError("gqa_scores: nothing to score (no balanced question)")
    groups: dict[str, list[float]] = {"accuracy": [], "binary": [], "open": []}
    for i, q in balanced.items():
        for key in ("answer", "types"):
            if key not in q:
                raise ValueError(f"gqa_scores: question {i!r} has no {key!r}")
        score = float(predictions[i] == q["answer"])
        structural, semantic = q["types"].get("structural"), q["types"].get("semantic")
        groups["accuracy"].append(score)
        groups["open" if structural == "query" else "binary"].append(score)
        groups.setdefault(f"structural/{structural}", []).append(score)
        groups.setdefault(f"semantic/{semantic}", []).append(score)
    return {k: sum(v) / len(v) for k, v in groups.items() if v}
