"""The reference points the summaries print beside a run's score (easygen/stages/baselines.py)."""

from __future__ import annotations


def test_best_constant_caption_equals_pycocoevalcap_per_candidate():
    """The batched best-constant-caption score equals scoring each candidate on its own with pycocoevalcap's
    PTBTokenizer and Cider (the evaluation the baseline stands for)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from easygen.stages.baselines import best_constant_cider

    refs = {"1": ["a red circle on a white background", "a small red circle"],
            "2": ["a blue square at the top", "blue square, top of the picture"],
            "3": ["a green cross on black", "a large green cross"],
            "4": ["a red square on a white background", "the red square is small"]}
    train = ["a red circle on a white background"] * 3 + ["a blue square at the top"] * 2 + ["a green cross on black"]
    score, caption = best_constant_cider(train, refs, candidates=3)
    expected = []
    for cand in ("a red circle on a white background", "a blue square at the top", "a green cross on black"):
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in refs.items()})
        res = tok.tokenize({i: [{"caption": cand}] for i in refs})
        expected.append((Cider().compute_score(gts, res)[0], cand))
    assert abs(score - max(expected)[0]) < 1e-9 and caption == max(expected)[1]
