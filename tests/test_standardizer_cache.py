"""The projector's feature statistics (`model.projector.standardize`) are fitted once per (training
shards, settings), cached beside the shards and read back by every later job; an export reads the
checkpoint only, with the training data gone."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from tests.conftest import compose_at

SMALL = [
    "data.synthetic.n=40",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.bidiffuser.sampler.steps=2",
    "model.projector.standardize_samples=24",
    "logger=none",
    "callbacks=none",
    "data.shuffle_buffer=8",
]


# one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _module(data_dir, out, overrides=()):
    from easygen.stages.build import lightning_module
    from easygen.stages.common import ensure_data

    cfg = compose_at(data_dir, out, [*SMALL, *overrides])
    ensure_data(cfg)
    return lightning_module(cfg)


class CountFeatures:
    """Counts the pictures whose features the module computes (EasyGenModule.image_features)."""

    def __init__(self, monkeypatch):
        from easygen.lit.easygen_module import EasyGenModule

        self.samples = 0
        real = EasyGenModule.image_features

        def counted(module, batch, **kwargs):
            self.samples += int(batch["has_image"].sum())
            return real(module, batch, **kwargs)

        monkeypatch.setattr(EasyGenModule, "image_features", counted)


def fitted(module):
    """The module built as for training, then its statistics fitted as the training callback does."""
    from callbacks.feature_standardizer import fit_feature_standardizer

    module.configure_model()
    fit_feature_standardizer(module)
    return module


def _stats(module):
    p = module.model.projector
    return p.feature_mean.clone(), p.feature_std.clone()


@pytest.mark.parametrize("source", ["captions", "on_the_fly"])
def test_statistics_are_fitted_once_then_read_from_the_cache(tmp_path, monkeypatch, caplog, source):
    data_dir = tmp_path / "data"
    counter = CountFeatures(monkeypatch)
    caplog.set_level(logging.INFO, logger="easygen")

    first = _module(data_dir, tmp_path / "a", [f"stage.feature_source={source}"])
    fitted(first)
    assert counter.samples == 24
    assert "projector standardiser fitted on 24 training samples, cached in" in caplog.text
    cached = list(data_dir.glob("**/.easygen-cache/standardizer-*.safetensors"))
    assert len(cached) == 1 and cached[0].parent.parent.name == "train"
    mean, std = _stats(first)

    # the statistics are those of the first 24 training samples' features (the reference: torch's own
    # mean and std over the same features, std floored at 1e-3 x its mean)
    from data_modules.shards import ShardIndexDataset

    cfg = first.cfg
    ds = ShardIndexDataset(
        cfg["data"]["train"][0]["urls"], int(cfg["model"]["image_size"]), load_images=source != "captions"
    )
    samples = [ds[i] for i in range(24)]
    batch = {"ids": [s["id"] for s in samples], "has_image": torch.ones(24, dtype=torch.bool)}
    if source == "captions":
        batch["feature_texts"] = [s["captions"][0] for s in samples]
    else:
        batch["images"] = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    with torch.no_grad():
        feats = first.image_features(batch, use_cache=False).double()
    if source == "on_the_fly":
        # one process: the fit keeps the features it computed (float16, as the in-memory cache holds them),
        # so the first epoch does not run the sampler again for these pictures
        assert sorted(first._feature_cache) == sorted(batch["ids"])
        kept = torch.stack([first._feature_cache[i] for i in batch["ids"]])
        assert torch.equal(kept, feats.to(torch.float16))
    else:
        assert not first._feature_cache
    ref_std = feats.std(0)
    torch.testing.assert_close(mean, feats.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, ref_std.clamp_min(1e-3 * ref_std.mean()).float(), rtol=1e-5, atol=1e-6)

    # a second job on the same shards and settings (a sweep trial, another rank, a resume) reads them
    counter.samples = 0
    caplog.clear()
    second = _module(data_dir, tmp_path / "b", [f"stage.feature_source={source}", "optim.lr=1e-4"])
    fitted(second)
    assert counter.samples == 0
    assert f"projector standardiser read from the cache {cached[0]} (24 training samples)" in caplog.text
    assert torch.equal(_stats(second)[0], mean) and torch.equal(_stats(second)[1], std)
    assert not second.model.projector.needs_fit


def test_cache_key_follows_the_shards_and_the_settings(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    counter = CountFeatures(monkeypatch)
    fitted(_module(data_dir, tmp_path / "a", ["stage.feature_source=captions"]))
    assert counter.samples == 24
    # another sample count: fitted again
    counter.samples = 0
    fitted(_module(
        data_dir, tmp_path / "b", ["stage.feature_source=captions", "model.projector.standardize_samples=16"]
    ))
    assert counter.samples == 16
    # a rewritten shard (new modification time): fitted again
    shard = sorted((data_dir).glob("*/train/*.tar"))[0]  # a caption shard (not one of dialogue/train/)
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counter.samples = 0
    fitted(_module(data_dir, tmp_path / "c", ["stage.feature_source=captions"]))
    assert counter.samples == 24
    # no cache: fitted every time, nothing written
    counter.samples = 0
    fitted(_module(
        data_dir,
        tmp_path / "d",
        ["stage.feature_source=captions", "+model.projector.standardize_cache=false"],
    ))
    assert counter.samples == 24


def test_export_reads_the_checkpoint_only(tmp_path):
    """`python -m easygen.stages.export CKPT OUT` with the training data deleted: the exported projector carries
    the checkpoint's own statistics."""
    from easygen.checkpoint import load_state_dict_file
    from easygen.stages.export import export_checkpoint

    data_dir = tmp_path / "data"
    module = fitted(_module(data_dir, tmp_path / "run", ["stage.feature_source=captions"]))
    state = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("model.projector.")}
    # statistics no fit on these shards gives, so that the test tells the checkpoint's from a refit
    state["model.projector.feature_mean"] += 0.5
    state["model.projector.feature_std"] *= 2.0
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"cfg": module.cfg}, "state_dict": state, "global_step": 2}, ckpt)
    shutil.rmtree(data_dir)

    out = export_checkpoint(str(ckpt), str(tmp_path / "exported"))
    proj = load_state_dict_file(out / "projector.safetensors")
    for k in ("feature_mean", "feature_std", "fc1.weight"):
        assert torch.equal(proj[k], state[f"model.projector.{k}"]), k
    assert float(proj["feature_fitted"]) == 1.0
    assert not any((data_dir).glob("**/*.tar"))  # nothing read or rewritten from the training data
