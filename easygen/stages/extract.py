"""`stage=extract` (the paper's training recipe): a dataset's shards rewritten with BiDiffuser outputs
beside each sample.

`stage.what` chooses what is added (a name or a list):
- `features`: BiDiffuser i2t `decode_prefix(y)` as `KEY.features.npy` [L, D], the LLM stages' image feature;
- `encoders`: the frozen encoders' outputs the BiDiffuser stage trains from, `KEY.moments.npy`,
  `KEY.clip_img.npy` and `KEY.text_latents.npy` (one per json caption; see `data_modules.encoder_outputs`).
Arrays are stored as `stage.dtype` (float16 by default).

Each rank takes every world_size-th shard (RANK / WORLD_SIZE, or the initialised process group). A shard is
written to a temporary file; its record (`.parts/<split>/<shard>.json`: samples, skipped images, settings)
is written next, and the shard is renamed into place last, so a restarted extract skips exactly the shards
that are complete and never leaves half a shard. `manifest.json` (the converters' format, plus the skipped
samples with reasons) is rebuilt from the records of every finished shard, whichever rank or run wrote it."""

from __future__ import annotations

import fnmatch
import hashlib
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

from data_modules.encoder_outputs import ENCODER_MEMBERS, npy_bytes
from data_modules.shards import expand_urls
from easygen.checkpoint import loaded_weights
from easygen.errors import ConfigError
from easygen.factories import build_bidiffuser
from easygen.images import load_image
from easygen.stages.common import container, ensure_data

log = logging.getLogger("easygen")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WHAT = ("features", "encoders")
DTYPES = {"float16": np.float16, "float32": np.float32}
FEATURES_MEMBER = "features.npy"
MEMO_PICTURES = 1024  # pictures whose features extract keeps for later shards (extract_shard's memo)


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


def parse_what(what) -> list[str]:
    names = [what] if isinstance(what, str) else list(what or [])
    bad = [n for n in names if n not in WHAT]
    if not names or bad:
        raise ConfigError(f"stage.what={what!r}: choose features, encoders, or [features,encoders]")
    return sorted(set(names))


def _captions(fields: dict[str, bytes]) -> list[str]:
    try:
        meta = json.loads(fields["json"]) if "json" in fields else {}
    except (ValueError, UnicodeDecodeError):
        return []
    caps = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(caps, list) and caps and all(isinstance(c, str) and c.strip() for c in caps):
        return caps
    return []


def extract_shard(
    pipe,
    src: str,
    dst: Path,
    image_size: int,
    batch_size: int,
    device,
    what=("features",),
    dtype=np.float16,
    record: Path | None = None,
    record_extra: dict | None = None,
    memo: dict | None = None,
) -> dict:
    """Write `dst`: `src`'s samples plus the outputs of `what`. The shard goes through a temporary file;
    `record` (the shard's json record: samples, skipped, `record_extra`) is written before the rename.
    `memo` ({picture file digest: features}, shared across shards) serves a picture seen before (the
    synthetic set's questions ask about the caption set's pictures); only for a sampler whose features do
    not depend on the batch (`shared_noise`).

    Returns {"samples": count written, "skipped": [{shard, key, reason}]}."""
    samples = read_tar_samples(src)
    skipped, ok = [], []
    for key, fields in samples.items():
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        if ext is None:
            ok.append((key, None))  # text-only sample: copied without outputs
            continue
        try:
            ok.append((key, load_image(fields[ext], image_size)))
        except Exception as exc:  # noqa: BLE001 - any decode failure skips the sample, never the shard
            skipped.append({"shard": src, "key": key, "reason": f"unreadable image .{ext}: {exc}"})
    added: dict[str, dict[str, np.ndarray]] = {}
    with_img = [(k, im) for k, im in ok if im is not None]
    for i in range(0, len(with_img), batch_size):
        chunk = with_img[i : i + batch_size]
        images = torch.stack([im for _, im in chunk]).to(device)
        out: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            if "features" in what and memo is not None:
                digests = [hashlib.sha256(samples[k][next(e for e in IMAGE_EXTS if e in samples[k])]).hexdigest()
                           for k, _ in chunk]
                todo = [j for j, d in enumerate(digests) if d not in memo]
                fresh = dict(zip([digests[j] for j in todo],
                                 pipe.i2t_features(images[todo]).float().cpu().numpy() if todo else []))
                out[FEATURES_MEMBER] = [fresh[d] if d in fresh else memo[d] for d in digests]
                for d, f in fresh.items():
                    memo[d] = f.astype(dtype)
                    while len(memo) > MEMO_PICTURES:
                        memo.pop(next(iter(memo)))  # the oldest first
            elif "features" in what:
                out[FEATURES_MEMBER] = list(pipe.i2t_features(images).float().cpu().numpy())
            if "encoders" in what:
                enc = pipe.encode_images(images)
                out[ENCODER_MEMBERS["moments"]] = list(enc["moments"].float().cpu().numpy())
                out[ENCODER_MEMBERS["clip_img"]] = list(enc["clip_img"].float().cpu().numpy())
                caps = [_captions(samples[k]) for k, _ in chunk]
                flat = [c for cs in caps for c in cs]
                y = pipe.encode_texts(flat).float().cpu().numpy() if flat else None
                start, latents = 0, []
                for cs in caps:
                    latents.append(y[start : start + len(cs)] if cs else None)
                    start += len(cs)
                out[ENCODER_MEMBERS["text_latents"]] = latents
        for j, (key, _) in enumerate(chunk):
            added[key] = {m: arrays[j].astype(dtype) for m, arrays in out.items() if arrays[j] is not None}
    replaced = {FEATURES_MEMBER} if "features" in what else set()
    if "encoders" in what:
        replaced |= set(ENCODER_MEMBERS.values())
    tmp = dst.with_name(dst.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, _ in ok:
            for field, data in samples[key].items():
                if field not in replaced:
                    _add(tar, f"{key}.{field}", data)
            for member, array in added.get(key, {}).items():
                _add(tar, f"{key}.{member}", npy_bytes(array))
    result = {"samples": len(ok), "skipped": skipped}
    if record is not None:
        _write_json(record, {**result, "source": src, **(record_extra or {})})
    os.replace(tmp, dst)  # last: the shard's presence marks it complete
    return result


def _settings(cfg, what: list[str]) -> dict:
    """What a finished shard was made with: a restart must not mix shards from other settings."""
    b = cfg.model.bidiffuser
    return {
        "what": what,
        "dtype": str(cfg.stage.get("dtype", "float16")),
        "image_size": int(cfg.model.image_size),
        "bidiffuser": {
            "preset": str(b.preset),
            "uvit": None if b.get("uvit") is None else str(b.uvit),
            "weights": None if b.get("weights") is None else str(b.weights),
            "sampler": {k: v for k, v in dict(b.get("sampler") or {}).items()},
        },
    }


def _record_path(out_root: Path, split: str, shard: str) -> Path:
    return out_root / ".parts" / split / f"{shard}.json"


def _finished(out_root: Path, split: str, dst: Path, settings: dict) -> bool:
    record = _record_path(out_root, split, dst.name)
    if not (dst.exists() and record.exists()):
        return False
    old = json.loads(record.read_text()).get("settings")
    if old != json.loads(json.dumps(settings)):
        raise ConfigError(
            f"stage.out_dir={out_root} holds {split}/{dst.name} extracted with other settings ({old}); "
            "set stage.out_dir to a new folder or delete the old output"
        )
    return True


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _device(cfg) -> torch.device:
    if torch.cuda.is_available() and str(cfg.trainer.accelerator) != "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pipeline(cfg, device: torch.device):
    """The BiDiffuser of `model.bidiffuser`; a file that does not load is a ConfigError naming the preset."""
    torch.manual_seed(int(cfg.seed))
    try:
        return build_bidiffuser(container(cfg), device=device)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
        raise ConfigError(
            f"model.bidiffuser (preset {cfg.model.bidiffuser.preset}) cannot be loaded: {msg}"
        ) from None


def _split_sources(cfg, split: str) -> list[tuple[str, list[str]]]:
    """The local shards of a data split, per source: (config key, its urls). The train split has the
    sources of `data.train` and, when the image features are extracted, of `data.instruct_train` (what the
    instruct stage adds to them; the encoders' outputs feed stage=bidiffuser, which trains on `data.train`
    only); val and test one each (none when the split is not configured)."""
    if split == "train":
        specs = [(f"data.train[{i}]", s["urls"]) for i, s in enumerate(cfg.data.train or [])]
        if "encoders" not in parse_what(cfg.stage.get("what", "features")):
            specs += [(f"data.instruct_train[{i}]", s["urls"])
                      for i, s in enumerate(cfg.data.get("instruct_train") or [])]
    else:
        spec = cfg.data.get(split)
        specs = [(f"data.{split}", spec)] if spec else []
    out = []
    for key, spec in specs:
        urls = expand_urls(list(spec) if not isinstance(spec, str) else spec)
        if any(u.startswith("pipe:") for u in urls):
            raise ConfigError(f"stage=extract reads local shards only; {key} has pipe: urls")
        out.append((key, urls))
    names = [Path(u).name for _, urls in out for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.{split}: shard file names repeat across folders; extract writes them to one folder")
    return out


def _split_urls(cfg, split: str) -> list[str]:
    """The local shards of a data split (every source's, in order)."""
    return [u for _, urls in _split_sources(cfg, split) for u in urls]


def extracted_spec(spec, urls: list[str], folder: Path) -> str:
    """Where a source's shards are after extraction (`folder` holds the split's shards of every source):
    the source's own file pattern in `folder` when it matches exactly its shards there, else the shards
    one by one, joined by `::` (data_modules/shards.py expand_urls)."""
    names = sorted(Path(u).name for u in urls)
    if isinstance(spec, str) and "::" not in spec:
        pattern = Path(spec).name if not Path(spec).is_dir() else "*.tar"
        present = sorted(p.name for p in folder.glob("*.tar")) if folder.is_dir() else names
        if sorted(fnmatch.filter(present, pattern)) == names:
            return str(folder / pattern)
    return "::".join(str(folder / n) for n in names)


def extracted_sources(cfg, out_root: Path) -> dict:
    """The data config's sources pointed at the extracted shards: `train` and `instruct_train` as lists of
    {urls, weight}, `val` and `test` as patterns (what the recipe hands to the LLM stages)."""
    out: dict = {}
    for split in cfg.stage.splits:
        sources = _split_sources(cfg, split)
        folder = out_root / split
        if split != "train":
            if sources:
                out[split] = extracted_spec(cfg.data.get(split), sources[0][1], folder)
            continue
        nodes = [*(("train", s) for s in cfg.data.train or []),
                 *(("instruct_train", s) for s in cfg.data.get("instruct_train") or [])]
        for (group, node), (_, urls) in zip(nodes, sources):
            out.setdefault(group, []).append(
                {"urls": extracted_spec(node["urls"], urls, folder), "weight": float(node.get("weight", 1.0))})
    return out


def extract_stage(cfg) -> dict:
    rank, world = _rank_world()
    what = parse_what(cfg.stage.get("what", "features"))
    dtype_name = str(cfg.stage.get("dtype", "float16"))
    if dtype_name not in DTYPES:
        raise ConfigError(f"stage.dtype={dtype_name!r}: choose {'|'.join(DTYPES)}")
    device = _device(cfg)
    ensure_data(cfg)
    pipe = _pipeline(cfg, device)
    out_root = Path(str(cfg.stage.out_dir))
    settings = _settings(cfg, what)
    done, resumed, n_images, t0 = [], [], 0, time.time()
    memo = {} if getattr(pipe, "shared_noise", False) else None  # features of pictures seen in earlier shards
    for split in cfg.stage.splits:
        urls = _split_urls(cfg, split)
        (out_root / split).mkdir(parents=True, exist_ok=True)
        for url in urls[rank::world]:  # shards split across ranks
            dst = out_root / split / Path(url).name
            if _finished(out_root, split, dst, settings):
                log.info("extract: %s already done, skipped", dst)
                resumed.append(f"{split}/{dst.name}")
                continue
            res = extract_shard(pipe, url, dst, int(cfg.model.image_size), int(cfg.stage.batch_size), device,
                                what=what, dtype=DTYPES[dtype_name], record=_record_path(out_root, split, dst.name),
                                record_extra={"settings": settings}, memo=memo)
            n_images += res["samples"]
            done.append(f"{split}/{dst.name}")
            for s in res["skipped"]:
                log.warning("extract: skipped %s in %s: %s", s["key"], s["shard"], s["reason"])
    elapsed = time.time() - t0
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    manifest = build_manifest(out_root, what)
    if rank == 0 or not distributed:
        # without a process group each rank writes it: the last to finish lists every shard
        _write_json(out_root / "manifest.json", manifest)
    return {
        "global_step": 0,
        "metrics": {
            "extract/images": float(n_images),
            "extract/images_per_sec": n_images / max(elapsed, 1e-9),
            "extract/skipped": float(len(manifest["skipped"])),
        },
        "best": {},
        "checkpoints": {},
        "extract": {"rank": rank, "world_size": world, "written": done, "resumed": resumed},
        "loaded": loaded_weights(pipe),
        "artifacts": {"shards": str(out_root), "manifest": str(out_root / "manifest.json"),
                      "sources": extracted_sources(cfg, out_root)},
    }


def build_manifest(out_root: Path, what: list[str]) -> dict:
    """One manifest over every finished shard in the output (earlier runs and other ranks included)."""
    splits: dict[str, dict] = {}
    skipped = []
    parts = out_root / ".parts"
    for record_file in sorted(parts.glob("*/*.json")) if parts.is_dir() else []:
        split, shard = record_file.parent.name, record_file.name[: -len(".json")]
        if not (out_root / split / shard).exists():
            continue
        record = json.loads(record_file.read_text())
        entry = splits.setdefault(split, {"samples": 0, "shards": {}})
        entry["shards"][f"{split}/{shard}"] = int(record["samples"])
        entry["samples"] += int(record["samples"])
        skipped += record["skipped"]
    return {
        "source": "extract",
        "what": what,
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "skipped": skipped,
    }
