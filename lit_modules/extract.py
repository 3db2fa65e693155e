"""`stage=extract` (SPEC §5): BiDiffuser i2t over every image of a dataset, written as new shards that
carry each sample's original members plus `features.npy` (fp16 [L, D]).

Each rank takes every world_size-th shard; a shard's output is written to a temporary file and renamed
when complete, so a restarted extract skips finished shards and never leaves half a shard. A sample
whose image cannot be read is skipped, counted and listed in the output manifest."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from easygen.images import load_image
from lit_modules.builders import build_bidiffuser
from lit_modules.errors import ConfigError

log = logging.getLogger("easygen")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def read_tar_samples(path: str):
    """Members of a local shard grouped by key, in order: {key: {field: bytes}}."""
    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, field = base.partition(".")
            samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def extract_shard(pipe, src: str, dst: Path, image_size: int, batch_size: int, device) -> dict:
    samples = read_tar_samples(src)
    skipped, ok = [], []
    for key, fields in samples.items():
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        if ext is None:
            ok.append((key, None))  # text-only sample: copied without features
            continue
        try:
            ok.append((key, load_image(fields[ext], image_size)))
        except Exception as exc:  # noqa: BLE001 - any decode failure skips the sample, never the shard
            skipped.append({"shard": src, "key": key, "reason": f"unreadable image .{ext}: {exc}"})
    feats: dict[str, np.ndarray] = {}
    with_img = [(k, im) for k, im in ok if im is not None]
    for i in range(0, len(with_img), batch_size):
        chunk = with_img[i : i + batch_size]
        images = torch.stack([im for _, im in chunk]).to(device)
        with torch.no_grad():
            out = pipe.i2t_features(images).float().cpu().numpy().astype(np.float16)
        feats.update({k: f for (k, _), f in zip(chunk, out)})
    tmp = dst.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, _ in ok:
            for field, data in samples[key].items():
                if field != "features.npy":
                    _add(tar, f"{key}.{field}", data)
            if key in feats:
                buf = io.BytesIO()
                np.save(buf, feats[key], allow_pickle=False)
                _add(tar, f"{key}.features.npy", buf.getvalue())
    os.replace(tmp, dst)
    return {"samples": len(ok), "skipped": skipped}


def extract_stage(cfg) -> dict:
    from data_modules.shards import expand_urls

    rank, world = _rank_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and str(
        cfg.trainer.accelerator) != "cpu" else torch.device("cpu")
    from lit_modules.runner import container, ensure_data

    ensure_data(cfg)
    torch.manual_seed(int(cfg.seed))
    pipe = build_bidiffuser(container(cfg), device=device)
    out_root = Path(str(cfg.stage.out_dir))
    report = {"splits": {}, "skipped": [], "source": {}}
    t0 = time.time()
    n_images = 0
    for split in cfg.stage.splits:
        spec = cfg.data.get(split) if split != "train" else [s["urls"] for s in cfg.data.train]
        if not spec:
            continue
        urls = expand_urls(list(spec) if not isinstance(spec, str) else spec)
        local = [u for u in urls if not u.startswith("pipe:")]
        if len(local) != len(urls):
            raise ConfigError(f"stage=extract reads local shards only; data.{split} has pipe: urls")
        report["source"][split] = urls
        (out_root / split).mkdir(parents=True, exist_ok=True)
        shards = {}
        for i, url in enumerate(urls):
            dst = out_root / split / Path(url).name
            if i % world != rank:
                continue
            if dst.exists():
                log.info("extract: %s already done, skipped", dst)
                continue
            res = extract_shard(pipe, url, dst, int(cfg.model.image_size), int(cfg.stage.batch_size), device)
            shards[f"{split}/{dst.name}"] = res["samples"]  # the converters' manifest keys
            n_images += res["samples"]
            report["skipped"] += res["skipped"]
            for s in res["skipped"]:
                log.warning("extract: skipped %s in %s: %s", s["key"], s["shard"], s["reason"])
        report["splits"][split] = {"shards": shards}
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, report)
    else:
        gathered = [report]
    elapsed = time.time() - t0
    manifest = _merge_manifest(out_root, gathered)
    if rank == 0:
        (out_root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {
        "global_step": 0,
        "metrics": {"extract/images": float(n_images), "extract/images_per_sec": n_images / max(elapsed, 1e-9),
                    "extract/skipped": float(len(manifest["skipped"]))},
        "best": {},
        "checkpoints": {},
        "artifacts": {"shards": str(out_root), "manifest": str(out_root / "manifest.json")},
        "is_global_zero": rank == 0,
    }


def _merge_manifest(out_root: Path, reports: list[dict]) -> dict:
    """One manifest over every shard in the output (finished ones from an earlier run included)."""
    splits: dict[str, dict] = {}
    skipped = []
    for r in reports:
        skipped += r["skipped"]
    old = {}
    if (out_root / "manifest.json").exists():
        old = json.loads((out_root / "manifest.json").read_text()).get("splits", {})
    for split_dir in sorted(p for p in out_root.iterdir() if p.is_dir()):
        shards = dict(old.get(split_dir.name, {}).get("shards", {}))
        for r in reports:
            shards.update(r["splits"].get(split_dir.name, {}).get("shards", {}))
        shards = {k: v for k, v in shards.items() if (out_root / k).exists()}
        splits[split_dir.name] = {"samples": sum(shards.values()), "shards": shards}
    return {"source": "extract", "splits": splits, "skipped": skipped}
