"""Time COCO caption scoring: pycocoevalcap's standard sequence vs ``easygen.metrics.caption_scores``.

The standard sequence is what ``pycocoevalcap.eval.COCOEvalCap.evaluate`` runs (minus SPICE): PTB
tokenisation of references, then of predictions (two JVM starts), then BLEU, METEOR (one blocking
round trip per image), ROUGE-L and CIDEr one after another. ``caption_scores`` is timed cold (a fresh
METEOR JVM, its start-up included) and warm. All paths score the same synthetic captions of COCO-like length (8-14 words, a caption vocabulary with shared n-grams and punctuation)
in the same process, and the script checks that every score is bit-identical.

    python experiments/bench_scoring.py --images 5000 --refs 5
"""

from __future__ import annotations

import argparse
import os
import random
import time

SUBJECTS = [
    "a man",
    "a woman",
    "two dogs",
    "a cat",
    "a group of people",
    "a young boy",
    "an old truck",
    "a giraffe",
]
VERBS = ["sitting on", "standing next to", "riding", "walking down", "looking at", "holding", "playing with"]
OBJECTS = ["a bench", "a red bus", "the street", "a large field", "a wooden table", "a kite", "a surfboard"]
PLACES = [
    "in a park",
    "near the beach",
    "on a sunny day",
    "in the kitchen",
    "at night",
    "in front of a building",
]


def caption(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.7:
        words.append(rng.choice(PLACES))
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.replace(" ", ", ", 1)
    text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.6 else "")


def make_corpus(n_images: int, n_refs: int, seed: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    rng = random.Random(seed)
    refs = {f"img{i}": [caption(rng) for _ in range(n_refs)] for i in range(n_images)}
    preds = {}
    for k, rs in refs.items():
        # Half the predictions paraphrase a reference, so the scores are not all near zero.
        preds[k] = rng.choice(rs).lower().rstrip(".") if rng.random() < 0.5 else caption(rng)
    return preds, refs


def pycocoevalcap_sequence(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in refs})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)})
    meteor = Meteor()
    out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    del meteor
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from easygen.metrics import caption_scores, close_meteor

    preds, refs = make_corpus(args.images, args.refs, args.seed)
    t0 = time.perf_counter()
    ref_scores = pycocoevalcap_sequence(preds, refs)
    t_ref = time.perf_counter() - t0

    close_meteor()  # a fresh JVM: start-up and paraphrase-table load included
    t0 = time.perf_counter()
    ours = caption_scores(preds, refs)
    t_ours = time.perf_counter() - t0
    # A second call finds METEOR's JVM loaded, as CaptionEvalCallback arranges by starting it when
    # the validation epoch starts.
    t0 = time.perf_counter()
    warm = caption_scores(preds, refs)
    t_warm = time.perf_counter() - t0
    assert warm == ours

    print(f"{args.images} images x {args.refs} references")
    for k, v in ours.items():
        print(
            f"  {k:8s} ours {v:.17g}  pycocoevalcap {ref_scores[k]:.17g}  {'same' if v == ref_scores[k] else 'DIFFERENT'}"
        )
    print(f"pycocoevalcap sequence:                       {t_ref:.2f} s")
    print(f"caption_scores, cold (METEOR started):        {t_ours:.2f} s ({t_ref / t_ours:.2f}x)")
    print(f"caption_scores, METEOR already loaded:        {t_warm:.2f} s ({t_ref / t_warm:.2f}x)")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if ours != ref_scores:
        raise SystemExit("scores differ")


if __name__ == "__main__":
    main()
