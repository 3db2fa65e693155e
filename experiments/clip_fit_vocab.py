"""What the tiny BiDiffuser's text latents say about a caption set, with the tokenizer vocabulary it has and
with one trained on the set's own captions as well.

    python experiments/clip_fit_vocab.py DATA [DATA ...] [--n-train 1024] [--n-test 64]

Each DATA is a set `data_modules/t2i_kinds.py` reads (the synthetic set, or one written by
`python -m data_modules.patterns`). For each, the tiny preset's CLIP towers (conf/model/tiny.yaml, seed 42)
are fitted as stage=bidiffuser fits them (`model.bidiffuser.clip_fit`, the first training pairs), once with
the tokenizers trained on `easygen.factories.tiny_corpus()` (the synthetic captions: what the recipe builds
today) and once on that corpus plus the set's own captions. Printed per set and vocabulary, as JSON:

- `tokens`: the CLIP text tokenizer's mean and max tokens per test caption and the fraction longer than
  its context (the tail of those never reaches the U-ViT);
- `r2`: the share of the fitted text latents' variance (every caption of the test samples) explained by
  each attribute the captions name and by the template (phrasing): what text-to-image can tell apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_modules.shards import ShardIndexDataset
from data_modules.t2i_kinds import kind_for
from easygen.bidiffuser.pipeline import BiDiffuser
from easygen.factories import tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from t2i_probe import text_latent_r2, text_tokens  # noqa: E402  (the probe's measures, one copy)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml"))
    fit = dict(model["bidiffuser"]["clip_fit"])
    fit.pop("max_pairs", None)
    report = {}
    for data in args.data:
        train_ds = ShardIndexDataset(str(Path(data) / "train" / "*.tar"), 64)
        test_ds = ShardIndexDataset(str(Path(data) / "test" / "*.tar"), 64)
        train = [s for s in (train_ds[i] for i in range(min(args.n_train, len(train_ds)))) if s is not None]
        test = [s for s in (test_ds[i] for i in range(min(args.n_test, len(test_ds)))) if s is not None]
        kind = kind_for([s["captions"][0] for s in test], data)
        if kind is None:
            raise SystemExit(f"{data}: a set of no known kind (data_modules/t2i_kinds.py)")
        own = sorted({c for s in train for c in s["captions"]})
        images = torch.stack([torch.as_tensor(s["image"]) for s in train])
        captions = [s["captions"] for s in train]
        for vocabulary, corpus in (("synthetic captions", tiny_corpus()), ("+ the set's captions", tiny_corpus() + own)):
            start = time.time()
            pipe = BiDiffuser.tiny(corpus, seed=args.seed, image_size=64)
            pipe.fit_clip(images, captions, seed=args.seed, **fit)
            report[f"{kind.name} / {vocabulary}"] = {
                "tokens": text_tokens(pipe, test), "r2": text_latent_r2(pipe, test, kind),
                "seconds": round(time.time() - start, 1)}
            print(json.dumps({f"{kind.name} / {vocabulary}": report[f"{kind.name} / {vocabulary}"]}), flush=True)
    return report


if __name__ == "__main__":
    main()
