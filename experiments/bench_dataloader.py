"""Throughput of ShardDataModule's training loader against a plain webdataset pipeline doing the same work.

    python experiments/bench_dataloader.py [--n 256] [--size 512] [--batch 16] [--workers 1] [--batches 48]

Writes ``n`` JPEG shards of 640x480 pictures (smooth content plus noise, like photos compress),
then times, in the same run and interleaved, (a) ShardDataModule.train_dataloader() and (b) a
hand-written ``wds.WebDataset(...).shuffle().map(decode).batched()`` loader: both decode the JPEG,
resize the shorter side to ``size``, center-crop, convert to float [0, 1] and collate into a list.
Prints samples/s of both, their ratio (target >= 0.9) and a single-process breakdown of where the
time goes (tar reading, JPEG decode, resize+crop, to-tensor, json).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from data_modules.convert import convert
from data_modules.datamodule import ShardDataModule, list_collate
from data_modules.shards import decode_sample, load_image


def make_shards(root: Path, n: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    yy, xx = np.mgrid[0:480, 0:640]
    lines = []
    for i in range(n):
        base = np.stack([np.sin(xx / (30 + i % 17)), np.cos(yy / (25 + i % 13)), np.sin((xx + yy) / 40)], -1)
        pixels = np.clip((base * 0.4 + 0.5) * 255 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:06d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"{i:06d}.jpg", "captions": [f"picture number {i}"]}))
    (root / "c.jsonl").write_text("\n".join(lines))
    convert(
        "captions",
        input=root / "c.jsonl",
        images=root / "img",
        out=root / "shards",
        shard_size=shard_size,
        progress=False,
    )


def time_loader(loader, batches: int, batch_size: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first shard open are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        assert len(batch) == batch_size
    return batches * batch_size / (time.perf_counter() - start)


def plain_loader(urls: list[str], size: int, batch: int, workers: int):
    def decode(sample):
        meta = json.loads(sample["json"])
        return {
            "__key__": sample["__key__"],
            "image": load_image(sample["jpg"], size),
            "captions": meta["captions"],
        }

    dataset = (
        wds.WebDataset(urls, resampled=True, nodesplitter=wds.split_by_node, shardshuffle=False)
        .shuffle(100)
        .map(decode)
        .batched(batch, collation_fn=list_collate, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def breakdown(urls: list[str], size: int, count: int = 64) -> dict[str, float]:
    """Milliseconds per sample for each step, in one process."""
    times = dict.fromkeys(["tar read", "jpeg decode", "resize+crop", "to tensor", "json+checks"], 0.0)
    start = time.perf_counter()
    samples = []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        samples.append(sample)
        if len(samples) == count:
            break
    times["tar read"] = time.perf_counter() - start
    for sample in samples:
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(sample["jpg"]))
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        t1 = time.perf_counter()
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC).crop(
            ((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size)
        )
        t2 = time.perf_counter()
        torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div_(255)
        t3 = time.perf_counter()
        full = decode_sample(sample, size)
        t4 = time.perf_counter()
        times["jpeg decode"] += t1 - t0
        times["resize+crop"] += t2 - t1
        times["to tensor"] += t3 - t2
        # decode_sample repeats the image work; what it adds beyond the three steps is json + checks.
        times["json+checks"] += max(0.0, (t4 - t3) - (t3 - t0))
        assert full["image"].shape == (3, size, size)
    return {k: 1000 * v / count for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shards(root, args.n, shard_size=64)
        urls = sorted(str(p) for p in (root / "shards" / "train").glob("*.tar"))
        dm = ShardDataModule(
            train=urls,
            batch_size=args.batch,
            num_workers=args.workers,
            image_size=args.size,
            shuffle_buffer=100,
            samples_per_epoch=10**9,
        )
        rates: dict[str, list[float]] = {"ShardDataModule": [], "plain webdataset": []}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
            rates["ShardDataModule"].append(time_loader(dm.train_dataloader(), args.batches, args.batch))
            rates["plain webdataset"].append(
                time_loader(plain_loader(urls, args.size, args.batch, args.workers), args.batches, args.batch)
            )
        best = {name: max(r) for name, r in rates.items()}
        print(
            f"{args.size}px, batch {args.batch}, {args.workers} worker(s), {args.batches} batches x {args.rounds} rounds"
        )
        for name, rate in best.items():
            print(
                f"  {name:18s} {rate:8.1f} samples/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})"
            )
        print(
            f"  ratio ShardDataModule / plain: {best['ShardDataModule'] / best['plain webdataset']:.3f}x (target >= 0.9x)"
        )
        print("where the time goes (ms per sample, one process):")
        for step, ms in breakdown(urls, args.size).items():
            print(f"  {step:12s} {ms:7.2f}")


if __name__ == "__main__":
    main()
