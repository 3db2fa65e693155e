"""The projector's feature statistics (`model.projector.standardize`, see `easygen.llm.projector`) fitted once
per (training features, settings) and kept in a small file beside the training shards, so that sweep
trials, every rank of a multi-process job and a resumed job read them instead of running the i2t sampler
again over `model.projector.standardize_samples` pictures.

The file is named by a hash of what the statistics depend on:
- the training shards (`data.train[*].urls` expanded): path, size and modification time of each;
- the settings: feature source, sample count, image size, feature shape, the floor `eps`;
- where the features are computed rather than read (`stage.feature_source` other than `extracted`):
  the BiDiffuser config (preset, sampler, seed of the tiny preset) and the size and modification time
  of every weight file it names.

Location: `model.projector.standardize_cache` = `auto` (default: `.easygen-cache/` in the folder of the
first training shard, else `~/.cache/easygen/standardizer/` where that folder is read-only), a folder,
or `false` (no cache: fit every time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_modules.shards import expand_urls

log = logging.getLogger("easygen")

FORMAT = "easygen-standardizer/1"


def _file_id(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def shard_urls(cfg: dict) -> list[str]:
    return [u for src in cfg["data"]["train"] for u in expand_urls(src["urls"])]


def cache_key(cfg: dict, feature_source: str, limit: int, eps: float) -> dict:
    """What the fitted statistics depend on (see the module docstring), as a JSON-able dict."""
    m = cfg["model"]
    key = {
        "format": FORMAT,
        "shards": [
            _file_id(u) if "://" not in u and not u.startswith("pipe:") else [u] for u in shard_urls(cfg)
        ],
        "settings": {
            "feature_source": feature_source,
            "standardize_samples": int(limit),
            "image_size": int(m["image_size"]),
            "num_image_tokens": int(m["num_image_tokens"]),
            "feature_dim": int(m["feature_dim"]),
            "eps": float(eps),
        },
    }
    if feature_source != "extracted":
        b = m.get("bidiffuser") or {}
        key["bidiffuser"] = b
        key["seed"] = int(cfg.get("seed", 0))  # the tiny preset's weights are built from it
        key["weights"] = sorted(_file_id(v) for v in _strings(b) if os.path.isfile(os.path.expanduser(v)))
    return key


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_dirs(cfg: dict) -> list[Path]:
    """Folders to look in, the first writable one is where a new file goes."""
    setting = (cfg["model"].get("projector") or {}).get("standardize_cache", "auto")
    if setting in (False, None, "false", "off", ""):
        return []
    if setting != "auto":
        return [Path(os.path.expanduser(str(setting)))]
    dirs = []
    local = [u for u in shard_urls(cfg) if "://" not in u and not u.startswith("pipe:")]
    if local:
        dirs.append(Path(local[0]).resolve().parent / ".easygen-cache")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    dirs.append(home / "easygen" / "standardizer")
    return dirs


def cache_name(key: dict) -> str:
    return f"standardizer-{key_hash(key)}.safetensors"


def read_cached(dirs: list[Path], key: dict) -> tuple[torch.Tensor, torch.Tensor, int, Path] | None:
    """(mean, std, samples, path) from the first folder holding this key's file, else None."""
    name = cache_name(key)
    for d in dirs:
        path = d / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != json.loads(json.dumps(key, default=str)):
                    continue  # a hash collision or a hand-copied file: not ours
                return f.get_tensor("feature_mean"), f.get_tensor("feature_std"), int(meta["samples"]), path
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: fit again
            log.warning("model.projector.standardize: ignoring unreadable cache file %s (%s)", path, e)
    return None


def write_cached(
    dirs: list[Path], key: dict, mean: torch.Tensor, std: torch.Tensor, samples: int
) -> Path | None:
    """Write the statistics atomically (temporary file + rename) into the first writable folder."""
    name = cache_name(key)
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{name}.{os.getpid()}.tmp"
            save_file(
                {"feature_mean": mean.contiguous(), "feature_std": std.contiguous()},
                str(tmp),
                metadata={"key": json.dumps(key, default=str), "samples": str(int(samples))},
            )
            os.replace(tmp, d / name)
            return d / name
        except OSError as e:
            log.info("model.projector.standardize: cannot write the cache in %s (%s)", d, e)
    return None
