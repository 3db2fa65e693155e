"""Text-to-image of a BiDiffuser stage's weights on the synthetic test captions, read back from the pixels.

    python experiments/t2i_probe.py --weights RUN/bidiffuser/bidiffuser.safetensors [--data DATA] [--n 64]

Prints the per-attribute accuracy of `data_modules/synthetic_reader.py` on the generated pictures (the
recipe's `stage=eval task=t2i` reports the same from a whole EasyGen checkpoint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_modules.shards import ShardIndexDataset
from data_modules.synthetic_reader import attribute_accuracy, parse_caption, read_picture
from easygen.factories import build_bidiffuser


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", default="data/synthetic-64px-n640-seed0")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load("conf/model/tiny.yaml"))
    model["bidiffuser"]["weights"] = args.weights
    pipe = build_bidiffuser({"model": model, "seed": args.seed})
    ds = ShardIndexDataset(str(Path(args.data) / "test" / "*.tar"), 64, load_images=False)
    prompts = [ds[i]["captions"][0] for i in range(min(args.n, len(ds)))]
    images = []
    for i in range(0, len(prompts), 16):
        images += pipe.generate(prompts[i : i + 16])
    named = [parse_caption(p) for p in prompts]
    read = [read_picture(im) for im in images]
    print(json.dumps(attribute_accuracy(read, named), indent=1))
    return images, prompts


if __name__ == "__main__":
    main()
