"""What every stage program reads from the composed config: the plain (resolved) config, Hydra's record
of the run (choices, overrides), the output directory, and the data the stage needs on disk."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from data_modules.shards import expand_urls
from data_modules.synthetic import make_synthetic, write_dialogues
from easygen.assets import asset
from easygen.errors import ConfigError

log = logging.getLogger("easygen")

# `${easygen.asset:tiny/llm.safetensors}`: a file shipped in easygen/assets (the tiny preset's trained weights)
OmegaConf.register_new_resolver("easygen.asset", asset, replace=True)


def container(cfg):
    """The config as plain dicts and lists, interpolations resolved (what checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def hydra_choices() -> dict:
    """The config-group choices of this run (`model: tiny`, ...), empty outside a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    choices = dict(HydraConfig.get().runtime.choices)
    return {k: v for k, v in choices.items() if not k.startswith("hydra/") or k == "hydra/launcher"}


def hydra_overrides() -> list[str]:
    """The command line's overrides of this run, empty outside a Hydra app."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def output_dir(cfg) -> Path:
    return Path(str(cfg.paths.output_dir))


def ensure_data(cfg) -> None:
    """Write the synthetic set on first use; check that every shard pattern matches something."""
    if cfg.data.get("synthetic") and cfg.data.name == "synthetic":
        root = Path(str(cfg.data.root))
        s = cfg.data.synthetic
        if not (root / "manifest.json").exists():
            log.info("writing the synthetic set (%d samples) to %s", s.n, root)
            make_synthetic(str(root), n=int(s.n), seed=int(s.seed), image_size=int(s.image_size))
        elif not (root / "dialogue" / "manifest.json").exists():  # a set written before the dialogues
            log.info("writing the synthetic set's dialogues to %s", root / "dialogue")
            write_dialogues(root / "dialogue", n=int(s.n), seed=int(s.seed), image_size=int(s.image_size))
    for i, src in enumerate(cfg.data.train or []):
        _check_urls(src["urls"], f"data.train[{i}].urls")
    for i, src in enumerate(cfg.stage.get("extra_train") or []):
        _check_urls(src["urls"], f"data.instruct_train[{i}].urls (stage.extra_train)")
    for key in ("val", "test"):
        if cfg.data.get(key):
            _check_urls(cfg.data[key], f"data.{key}")


def _check_urls(spec, key) -> None:
    try:
        urls = expand_urls(spec)
    except FileNotFoundError:
        urls = []
    if not urls:
        raise ConfigError(
            f"no shards match {key}={spec!r}: write them with `python -m data_modules.convert` "
            f"(or stage=extract) and set data.root / {key}"
        )


def flatten(node, prefix: str = "") -> dict:
    """A nested config as {"a.b.0.c": value} (empty dicts and lists kept as values)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None or not node:
        return {prefix[:-1]: node}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """`key: old -> new` lines for the flat keys whose values differ (at most `limit`, then a count)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    lines = [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys[:limit]]
    return lines + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])
