"""Reconstruction by the tiny preset's VAE on held-out synthetic pictures.

    python experiments/tiny_vae_recon.py [--data data/synthetic-64px-n768-seed0] [--split test]

Prints the mean absolute error of encode + decode in [0, 1] pixels and the attributes that
`data_modules/synthetic_reader.py` reads back from the reconstructions (and from the originals).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_modules.shards import ShardIndexDataset
from data_modules.synthetic_reader import attribute_accuracy, parse_caption, read_picture
from easygen.bidiffuser.autoencoder import decode, encode_moments, sample_latent, tiny_autoencoder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/synthetic-64px-n768-seed0")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0, help="the tiny weights' seed (the recipe's `seed`)")
    args = parser.parse_args(argv)
    ds = ShardIndexDataset(str(Path(args.data) / args.split / "*.tar"), 64)
    samples = [s for s in (ds[i] for i in range(len(ds))) if s is not None]
    pics = torch.stack([s["image"] for s in samples])
    truth = [parse_caption(s["captions"][0]) for s in samples]
    vae = tiny_autoencoder(args.seed).eval()
    with torch.no_grad():
        z = sample_latent(encode_moments(vae, pics * 2 - 1), torch.Generator().manual_seed(0))
        rec = ((decode(vae, z) + 1) / 2).clamp(0, 1)
    out = {
        "pictures": len(samples),
        "mean_abs_error": float((rec - pics).abs().mean()),
        "readback_reconstruction": attribute_accuracy([read_picture(r) for r in rec], truth),
        "readback_original": attribute_accuracy([read_picture(p) for p in pics], truth),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
