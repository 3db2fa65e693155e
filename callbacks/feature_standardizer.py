"""The projector's feature standardiser (`model.projector.standardize`, on in the tiny preset only: the
features of a briefly trained BiDiffuser vary from picture to picture by a tenth of their common
component) fitted at the start of training from the DataModule's training shards: per (position, channel)
mean and standard deviation of the first `model.projector.standardize_samples` samples' features, the
extracted ones or those the stage computes on the fly. A no-op for projectors without a standardiser and
for ones whose statistics came with `init_from` or a resumed checkpoint."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import numpy as np
import torch
from tqdm.auto import tqdm

from data_modules.shards import ShardIndexDataset
from easygen.errors import ConfigError
from easygen.lit import feature_stats

log = logging.getLogger("easygen")


class FitFeatureStandardizer(pl.Callback):
    """Fits the projector's standardiser at fit start when it has no statistics yet (see the module doc)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        projector = getattr(getattr(pl_module, "model", None), "projector", None)
        if getattr(projector, "needs_fit", False):
            fit_feature_standardizer(pl_module, trainer)


def fit_feature_standardizer(module, trainer=None) -> None:
    """`model.projector.standardize`: the projector's per-(position, channel) statistics from the first
    `model.projector.standardize_samples` training samples (their extracted features, else the features
    this stage would compute for them). Fitted once per (training shards, settings) and cached beside the
    shards (`easygen.lit.feature_stats`); under several processes rank 0 fits or reads, the others get
    the result by broadcast. Checkpoints and `init_from` carry the statistics."""
    limit = int(module.cfg["model"]["projector"].get("standardize_samples") or 1024)
    datamodule = getattr(trainer, "datamodule", None)
    train = datamodule.train if datamodule is not None else module.cfg["data"]["train"]
    urls = [src["urls"] for src in train] if isinstance(train, (list, tuple)) else [train]
    eps = 1e-3
    world = trainer.world_size if trainer is not None else 1
    rank0 = trainer is None or trainer.is_global_zero
    result, error = None, None
    if rank0:
        try:
            key = feature_stats.cache_key(module.cfg, module.feature_source, limit, eps)
            dirs = feature_stats.cache_dirs(module.cfg)
            found = feature_stats.read_cached(dirs, key)
            if found is not None:
                mean, std, n, path = found
                result = (mean, std, f"read from the cache {path} ({n} training samples)")
            else:
                feats = training_features(module, urls, limit, keep=world == 1)
                mean, std = module.model.projector.standardizer_statistics(feats, eps)
                mean, std = mean.float(), std.float()
                path = feature_stats.write_cached(dirs, key, mean, std, len(feats)) if dirs else None
                where = f"cached in {path}" if path else "not cached (model.projector.standardize_cache)"
                result = (mean, std, f"fitted on {len(feats)} training samples, {where}")
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            if world == 1:
                raise
            error = f"{type(e).__name__}: {e}"
    if world > 1:
        # the other ranks wait here for exactly the fit; a failure on rank 0 reaches them too
        result, error = trainer.strategy.broadcast((result, error), src=0)
    if error is not None:
        raise RuntimeError(f"model.projector.standardize failed on rank 0: {error}")
    mean, std, how = result
    proj = module.model.projector
    proj.set_statistics(mean.to(proj.feature_mean), std.to(proj.feature_std))
    if rank0:
        log.info("projector standardiser %s", how)


@torch.no_grad()
def training_features(module, urls: list, limit: int, keep: bool = False) -> torch.Tensor:
    """The features of the first `limit` training samples ([N, L, C], float32 on the CPU). `keep`: also put
    the features computed on the fly into the module's in-memory feature cache (`model.feature_cache_size`),
    so that the first epoch does not run the sampler again for the same pictures (one process only)."""
    size = int(module.cfg["model"]["image_size"])
    feats, pending = [], []
    load = module.feature_source != "captions"
    datasets = [(spec, ShardIndexDataset(spec, size, load_images=load)) for spec in urls]
    total = min(limit, sum(len(ds) for _, ds in datasets))
    bar = tqdm(total=total, desc="projector standardiser: training features", unit="sample", leave=False)

    def flush():
        if pending:
            ids = [s.get("id", "?") for s in pending]
            batch = {"ids": ids, "has_image": torch.ones(len(pending), dtype=torch.bool)}
            if module.feature_source == "captions":
                batch["feature_texts"] = [s["captions"][0] for s in pending]
            else:
                images = torch.stack([torch.as_tensor(s["image"]) for s in pending])
                batch["images"] = images.to(next(module.bidiffuser.parameters()).device)
            # under several processes not through the in-memory feature cache: it would hold float16 copies
            # on rank 0 only, and the first steps would see other features there than on the other ranks
            feats.append(module.image_features(batch, use_cache=keep).float().cpu())
            bar.update(len(pending))
            pending.clear()

    try:
        for spec, ds in datasets:
            for i in range(len(ds)):
                if sum(len(f) for f in feats) + len(pending) >= limit:
                    break
                s = ds[i]
                if s is None:
                    continue
                if s.get("features") is not None and module.feature_source in ("auto", "extracted"):
                    feats.append(torch.as_tensor(np.asarray(s["features"]), dtype=torch.float32)[None])
                    bar.update(1)
                elif module.feature_source == "extracted":
                    raise ConfigError(
                        f"model.projector.standardize: sample {s.get('id')} of {spec} carries "
                        "no features but stage.feature_source=extracted"
                    )
                elif s.get("image") is not None or (
                    module.feature_source == "captions" and s.get("captions")
                ):
                    pending.append(s)
                    if len(pending) == 32:
                        flush()
        flush()
    finally:
        bar.close()
    if sum(len(f) for f in feats) < 2:
        raise ConfigError(
            f"model.projector.standardize: fewer than 2 training samples with pictures in {urls}"
        )
    return torch.cat(feats)[:limit]
