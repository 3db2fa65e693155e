"""How much of the picture do BiDiffuser's i2t features carry? A linear probe on the synthetic set.

    python experiments/probe_features.py --data DATA_ROOT [--weights RUN/bidiffuser/bidiffuser.safetensors]
                                         [--steps 12] [--cfg-scale 0] [--noise shared|per_sample|both]

For every picture of the train and val splits of a synthetic set (`python -m data_modules.synthetic`),
the i2t features of the tiny BiDiffuser (random, or the weights a `stage=bidiffuser` run wrote) are
computed; one linear classifier per attribute (shape, colour, background, size, position) is fitted on
the standardised train features and scored on val. Printed: the accuracy per attribute and the mean
number of attributes a picture gets wrong (chance: 3.55 of 5). `--noise both` shows why the sampler
draws one noise for the whole batch: with a fresh draw per picture the features are at chance.
"""

from __future__ import annotations

import argparse
import time

import torch


def load_split(root: str, split: str, image_size: int):
    from data_modules.shards import ShardIndexDataset

    ds = ShardIndexDataset(f"{root}/{split}/*.tar", image_size)
    samples = [s for s in (ds[i] for i in range(len(ds))) if s is not None and s.get("attributes")]
    if not samples:
        raise SystemExit(f"{root}/{split}: no samples with `attributes` (write the set with data_modules.synthetic)")
    return torch.stack([torch.as_tensor(s["image"]) for s in samples]), [s["attributes"] for s in samples]


def linear_probe(train: torch.Tensor, val: torch.Tensor, attrs_train, attrs_val, steps: int = 300) -> dict:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = (train - mu) / sd, (val - mu) / sd
    out = {}
    for key in attrs_train[0]:
        classes = sorted({d[key] for d in attrs_train})
        y = torch.tensor([classes.index(d[key]) for d in attrs_train])
        yv = torch.tensor([classes.index(d[key]) if d[key] in classes else -1 for d in attrs_val])
        torch.manual_seed(0)
        lin = torch.nn.Linear(a.shape[1], len(classes))
        opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(a), y).backward()
            opt.step()
        with torch.no_grad():
            out[key] = float((lin(b).argmax(-1) == yv).float().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    from easygen.factories import build_bidiffuser

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a synthetic set's root (train/ and val/ shards)")
    ap.add_argument("--weights", default=None, help="bidiffuser.safetensors of a stage=bidiffuser run")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cfg-scale", type=float, default=0.0)
    ap.add_argument("--noise", choices=["shared", "per_sample", "both"], default="both")
    ap.add_argument("--seed", type=int, default=42, help="the tiny preset's weight seed (run.py's `seed`)")
    args = ap.parse_args(argv)

    (tr, atr), (va, ava) = load_split(args.data, "train", args.image_size), load_split(args.data, "val", args.image_size)
    for noise in (["shared", "per_sample"] if args.noise == "both" else [args.noise]):
        sampler = {"steps": args.steps, "order": 3, "method": "fast", "cfg_scale": args.cfg_scale,
                   "shared_noise": noise == "shared", "seed": 1234}
        cfg = {"seed": args.seed, "model": {"image_size": args.image_size, "bidiffuser": {
            "preset": "tiny", "weights": args.weights, "sampler": sampler}}}
        pipe = build_bidiffuser(cfg)
        t0 = time.perf_counter()
        with torch.no_grad():
            fa = torch.cat([pipe.i2t_features(tr[i:i + 64]) for i in range(0, len(tr), 64)]).flatten(1)
            fb = torch.cat([pipe.i2t_features(va[i:i + 64]) for i in range(0, len(va), 64)]).flatten(1)
        dt = time.perf_counter() - t0
        acc = linear_probe(fa, fb, atr, ava)
        wrong = sum(1 - v for v in acc.values())
        shown = ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
        print(f"noise={noise:10s} steps={args.steps} cfg={args.cfg_scale}: {shown}; wrong/picture {wrong:.2f} "
              f"(chance 3.55); i2t of {len(tr) + len(va)} pictures {dt:.1f} s")


if __name__ == "__main__":
    main()
