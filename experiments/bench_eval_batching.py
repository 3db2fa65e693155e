"""Evaluation speed on the tiny preset: samples/s of `stage=eval` answer generation with one question
per batch against the default batch (`data.eval_batch_size`), per benchmark, in one process.

    python experiments/bench_eval_batching.py [--n 48] [--tasks okvqa,nocaps,gqa,textvqa,mmbench]

Each benchmark's public-format files (tests/benchmark_files.py) are written and converted to a temporary
folder; the timing is the eval stage's generation (`easygen.stages.evaluate.generate_predictions`:
on-the-fly BiDiffuser features, then the LLM's batched greedy decoding with the KV cache), the same code
`python run.py stage=eval task=<name>` runs. Batch 1 runs first, then the default batch; the ratio is
printed. Record the machine's load (`uptime`) with the figures."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_modules.convert import main as convert  # noqa: E402
from tests import benchmark_files as bf  # noqa: E402


def write_sets(tmp: Path, n: int) -> Path:
    d = tmp / "data"
    path, images = bf.write_nocaps(tmp / "nocaps", n=n)
    convert(["nocaps", "--input", str(path), "--images", str(images), "--out", str(d / "nocaps")])
    q, a, images = bf.write_vqa_format(tmp / "okvqa", n=n)
    convert(["okvqa", "--input", str(q), "--annotations", str(a), "--images", str(images), "--out", str(d / "okvqa")])
    path, images = bf.write_gqa(tmp / "gqa", n=n)
    convert(["gqa", "--input", str(path), "--images", str(images), "--out", str(d / "gqa")])
    path, images = bf.write_textvqa(tmp / "textvqa", n=n)
    convert(["textvqa", "--input", str(path), "--images", str(images), "--out", str(d / "textvqa")])
    path = bf.write_mmbench(tmp / "mmbench", n=max(2, n * 2 // 7))  # ~n passes (3 or 4 rotations each)
    convert(["mmbench", "--input", str(path), "--out", str(d / "mmbench")])
    return d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=48, help="questions (pictures) per benchmark")
    p.add_argument("--tasks", default="okvqa,nocaps,gqa,textvqa,mmbench")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    from omegaconf import OmegaConf

    from easygen.stages.evaluate import _module, benchmark_shards, generate_predictions
    from tests.conftest import compose_at

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        d = write_sets(Path(tmp), args.n)
        cfg = compose_at(d, Path(tmp) / "out", ["stage=eval", "logger=none", "trainer.enable_progress_bar=false",
                                                "model.max_length=256"])  # fmt: skip
        module = _module(cfg)
        default = int(cfg.data.eval_batch_size)
        print(f"tiny preset, {torch.get_num_threads()} threads, default batch {default}; load {os.getloadavg()}")
        print(f"{'task':10s} {'samples':>7s} {'batch 1':>12s} {'batch ' + str(default):>12s} {'ratio':>7s}")
        for task in args.tasks.split(","):
            shards = benchmark_shards(cfg, task)
            rates = []
            for batch in (1, default):
                OmegaConf.update(cfg, "stage.batch_size", batch)
                preds, seconds = generate_predictions(cfg, module, shards)
                rates.append(len(preds) / seconds)
            print(f"{task:10s} {len(preds):7d} {rates[0]:9.2f} /s {rates[1]:9.2f} /s {rates[1] / rates[0]:6.2f}x",
                  flush=True)  # fmt: skip
        print(f"load at the end {os.getloadavg()}; {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    main()
