"""Text-to-image of a BiDiffuser stage's weights on a set's test captions, read back from the pixels.

    python experiments/t2i_probe.py --weights RUN/bidiffuser/bidiffuser.safetensors [--data DATA] [--n 64]
        [--seeds 1234 1 2 3] [--cfg-scale S] [--steps N]

DATA is the synthetic set (the default) or any set of a kind `data_modules/t2i_kinds.py` reads (e.g. one
written by `python -m data_modules.patterns`). Prints, as JSON:
- `attributes`: per sampler seed, the per-attribute accuracy of the set's pixel reader on the
  pictures generated for the first caption of the first `--n` test samples (every picture of a call starts
  from the same noise, as `model.bidiffuser.sampler.shared_noise` has it; the recipe's `stage=eval task=t2i`
  reports seed 1234), and their mean over the seeds;
- `noise_error`: the U-ViT's image-noise prediction error (the t2i half of easygen/bidiffuser/loss.py) on the
  test pictures with their own caption's text latent and with their neighbour's, same noise and indices.
  Equal errors mean the caption-to-picture direction does not use its text;
- `text_tokens`: the CLIP text tokenizer's token counts of those captions against its context (longer
  captions are cut: what follows the cut never reaches the U-ViT);
- `text_latent_r2`: the share of the text latents' variance (every caption of those samples) explained by
  each attribute the captions name, and by the template (the phrasing): what the U-ViT can tell apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_modules.shards import ShardIndexDataset
from data_modules.t2i_kinds import attribute_accuracy, kind_for
from easygen.bidiffuser.loss import bidiffuser_loss
from easygen.factories import build_bidiffuser


@torch.no_grad()
def noise_error(pipe, samples: list[dict], repeats: int = 4) -> dict[str, float]:
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    y = pipe.encode_texts([s["captions"][0] for s in samples])
    other = torch.roll(torch.arange(len(samples)), 1)
    errors = {"own_caption": 0.0, "other_caption": 0.0}
    for rep in range(repeats):
        for name, text in (("own_caption", y), ("other_caption", y[other])):
            g = torch.Generator().manual_seed(rep)
            enc = pipe.encode_images(images, generator=g)
            errors[name] += (
                float(
                    bidiffuser_loss(pipe.uvit, pipe.schedule, enc["z"], enc["clip_img"], text, generator=g)[
                        "loss_img"
                    ]
                )
                / repeats
            )
    return errors


@torch.no_grad()
def text_latent_r2(pipe, samples: list[dict], kind) -> dict[str, float]:
    """R^2 of the text latents grouped by each attribute (and by template index): 1 - within / total."""
    captions = [(c, t) for s in samples for t, c in enumerate(s["captions"])]
    y = pipe.encode_texts([c for c, _ in captions]).flatten(1).double()
    total = float(((y - y.mean(0)) ** 2).sum())
    named = [kind.parse_caption(c) for c, _ in captions]
    factors = {a: [n[a] for n in named] for a in kind.attributes}
    factors["template"] = [t for _, t in captions]
    out = {}
    for name, labels in factors.items():
        within = 0.0
        for v in set(labels):
            rows = y[[i for i, label in enumerate(labels) if label == v]]
            within += float(((rows - rows.mean(0)) ** 2).sum())
        out[name] = round(1 - within / total, 4)
    return out


def text_tokens(pipe, samples: list[dict]) -> dict[str, float]:
    tok = pipe.clip_text.tokenizer
    lengths = [len(tok(c)["input_ids"]) for s in samples for c in s["captions"]]
    context = int(tok.model_max_length)
    return {"context": context, "mean": sum(lengths) / len(lengths), "max": max(lengths),
            "cut_fraction": sum(n > context for n in lengths) / len(lengths)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", default="data/synthetic-64px-n768-seed0")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="the tiny preset's weight seed (the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234], help="sampler seeds")
    parser.add_argument(
        "--cfg-scale", type=float, default=None, help="text-to-image guidance scale (default: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the preset's)")
    args = parser.parse_args(argv)

    model = OmegaConf.to_container(OmegaConf.load("conf/model/tiny.yaml"))
    model["bidiffuser"]["weights"] = args.weights
    if args.steps is not None:
        model["bidiffuser"]["sampler"]["steps"] = args.steps
    pipe = build_bidiffuser({"model": model, "seed": args.seed})
    if args.cfg_scale is not None:
        pipe.t2i_cfg_scale = args.cfg_scale
    ds = ShardIndexDataset(str(Path(args.data) / "test" / "*.tar"), pipe.image_size)
    samples = [s for s in (ds[i] for i in range(min(args.n, len(ds)))) if s is not None]
    prompts = [s["captions"][0] for s in samples]
    kind = kind_for(prompts, args.data)
    if kind is None:
        raise SystemExit(f"{args.data}: a set of no known kind (data_modules/t2i_kinds.py)")
    named = [kind.parse_caption(p) for p in prompts]
    per_seed, images = {}, []
    for seed in args.seeds:
        images = []
        for i in range(0, len(prompts), 16):
            images += pipe.generate(prompts[i : i + 16], seed=seed)
        per_seed[seed] = attribute_accuracy([kind.read_picture(im) for im in images], named, kind.attributes)
    mean = {k: sum(acc[k] for acc in per_seed.values()) / len(per_seed) for k in per_seed[args.seeds[0]]}
    report = {"kind": kind.name, "attributes": {"per_seed": per_seed, "mean": mean},
              "noise_error": noise_error(pipe, samples), "text_tokens": text_tokens(pipe, samples),
              "text_latent_r2": text_latent_r2(pipe, samples, kind)}
    print(json.dumps(report, indent=1))
    return images, prompts


if __name__ == "__main__":
    main()
