"""Reference points for the recipe's test CIDEr, computed in the same run: the best constant caption
(every test image gets the same sentence; the best of the most frequent training captions is taken,
scored against the test references), so that "learned something" is a measured claim."""

from __future__ import annotations

from collections import Counter

from omegaconf import OmegaConf
from pycocoevalcap.cider.cider import Cider

from data_modules.shards import ShardIndexDataset
from easygen.metrics import ptb_tokenize


def _captions(spec, image_size: int) -> dict[str, list[str]]:
    ds = ShardIndexDataset(spec, image_size, load_images=False)
    out = {}
    for i in range(len(ds)):
        s = ds[i]
        if s is not None and s.get("captions"):
            out[str(s["id"])] = list(s["captions"])
    return out


def best_constant_cider(train_captions: list[str], test_refs: dict[str, list[str]], candidates: int = 20) -> tuple[float, str]:
    """The highest CIDEr any one of the `candidates` most frequent training captions gets on the test set.
    Every candidate's copy of the set is PTB-tokenised in one Java call (a call per candidate took seconds
    each); CIDEr is then scored per candidate on its own copy, as a separate evaluation would."""
    pool = [c for c, _ in Counter(train_captions).most_common(candidates)]
    ids = list(test_refs)
    refs = {(k, i): test_refs[i] for k in range(len(pool)) for i in ids}
    gts, res = ptb_tokenize(refs, {(k, i): cand for k, cand in enumerate(pool) for i in ids})
    best = (-1.0, "")
    for k, cand in enumerate(pool):
        score, _ = Cider().compute_score({i: gts[(k, i)] for i in ids}, {i: res[(k, i)] for i in ids})
        best = max(best, (float(score), cand))
    return best


def constant_caption_baseline(cfg, split: str = "val") -> dict:
    """The best constant caption's CIDEr on `split` of the run's data, as `baseline/<split>_constant_CIDEr`
    and the caption itself: the score a model reaches without looking at the pictures."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    size = int(cfg.model.image_size)
    train = [c for src in data["train"] for caps in _captions(src["urls"], size).values() for c in caps]
    refs = _captions(data[split], size)
    if not train or not refs:
        return {}
    score, caption = best_constant_cider(train, refs)
    return {f"baseline/{split}_constant_CIDEr": score, f"baseline/{split}_constant_caption": caption}


def baselines(cfg, root, done: dict) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    size = int(cfg.model.image_size)
    train = [c for src in data["train"] for caps in _captions(src["urls"], size).values() for c in caps]
    test = _captions(data["test"], size)
    score, caption = best_constant_cider(train, test)
    return {"baseline/constant_CIDEr": score, "baseline/constant_caption": caption}
