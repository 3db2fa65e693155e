"""ShardDataModule: url specs, equal batches per rank, weighted mixing, skipping bad samples, Lightning."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import ShardDataModule, SkipThresholdError, expand_urls, read_manifest
from data_modules.shards import SkipCounter, load_image


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(size=(48, 32)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _caption_sample(key: str, value: int) -> dict[str, bytes]:
    meta = {"id": key, "kind": "caption", "captions": [f"caption {key}"]}
    return {"png": _png(value), "json": json.dumps(meta).encode()}


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_split(root: Path, split: str, sizes: list[int], prefix: str = "s") -> None:
    """Shards of the given sizes plus the manifest the converters would write."""
    shards = {}
    for i, size in enumerate(sizes):
        name = f"{split}/shard-{i:06d}.tar"
        write_shard(
            root / name, {f"{prefix}{i}_{j}": _caption_sample(f"{prefix}{i}_{j}", j) for j in range(size)}
        )
        shards[name] = size
    manifest = {"splits": {split: {"samples": sum(sizes), "shards": shards}}, "skipped": []}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_expand_urls(tmp_path: Path):
    write_split(tmp_path, "train", [1, 1, 1])
    shards = [str(tmp_path / "train" / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "train" / "*.tar")) == shards
    assert expand_urls(str(tmp_path / "train" / "shard-{000000..000002}.tar")) == shards
    assert expand_urls(str(tmp_path / "train")) == shards
    assert expand_urls([shards[0], str(tmp_path / "train" / "shard-00000[12].tar")]) == shards
    assert expand_urls(f"{shards[2]}::pipe:cat {shards[0]}") == [shards[2], f"pipe:cat {shards[0]}"]
    with pytest.raises(FileNotFoundError, match=r"no shards match the spec .*nothing-\*\.tar"):
        expand_urls(str(tmp_path / "train" / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"shard-000003\.tar.*does not exist"):
        expand_urls(str(tmp_path / "train" / "shard-{000000..000009}.tar"))
    assert read_manifest(tmp_path)["splits"]["train"]["samples"] == 3
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path / "train")


def _gradient(size=(48, 32)) -> Image.Image:
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    array = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray((array * 255).astype(np.uint8))


def test_load_image_is_unidiffusers_center_crop():
    # Against a direct computation of UniDiffuser's center_crop (PNG: exact): the centred square of the
    # shorter side, then a Lanczos resize, as uint8
    buffer = io.BytesIO()
    _gradient().save(buffer, format="PNG")
    image = load_image(buffer.getvalue(), 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    reference = _gradient().crop((8, 0, 40, 32)).resize((16, 16), Image.Resampling.LANCZOS)
    reference = np.asarray(reference, dtype=np.float32) / 255
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), reference, atol=1e-6)
    # JPEG: the whole picture is decoded (no reduced-scale draft), then the same crop and resize
    buffer = io.BytesIO()
    _gradient((96, 64)).save(buffer, format="JPEG", quality=95)
    image = load_image(buffer.getvalue(), 16)
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").crop((16, 0, 80, 64))
    full = np.asarray(full.resize((16, 16), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), full, atol=1e-6)
    assert 0.0 <= image.min() and image.max() <= 1.0


def _run_rank(monkeypatch, root: Path, rank: int, epochs: int = 2) -> list[list[list[str]]]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = ShardDataModule(
        train=str(root / "train"), batch_size=3, num_workers=2, image_size=8, shuffle_buffer=16, seed=7
    )
    loader = dm.train_dataloader()
    assert len(loader) == 4  # 28 samples / 2 ranks / batch 3
    return [[[(s["__url__"], s["__key__"]) for s in batch] for batch in loader] for _ in range(epochs)]


def test_two_ranks_two_workers_equal_batches(tmp_path: Path, monkeypatch):
    write_split(tmp_path, "train", [3, 8, 17])  # uneven shards: a finite split would give uneven ranks
    per_rank = {rank: _run_rank(monkeypatch, tmp_path, rank) for rank in (0, 1)}
    for rank, epochs in per_rank.items():
        for batches in epochs:
            assert len(batches) == 4, f"rank {rank} ran {len(batches)} batches"
            assert all(len(batch) == 3 for batch in batches)
            shards = {url for batch in batches for url, _ in batch}
            assert len(shards) >= 2, f"rank {rank} saw only {shards}"
        # Epochs draw fresh shards and shuffles.
        assert epochs[0] != epochs[1]
    assert per_rank[0][0] != per_rank[1][0]
    # Reproducible given the seed.
    assert _run_rank(monkeypatch, tmp_path, 1) == per_rank[1]


def test_weighted_mix(tmp_path: Path):
    write_split(tmp_path / "a", "train", [10, 10], prefix="a")
    write_split(tmp_path / "b", "train", [10], prefix="b")
    dm = ShardDataModule(
        train=[
            {"urls": str(tmp_path / "a" / "train"), "weight": 3.0},
            {"urls": str(tmp_path / "b" / "train"), "weight": 1.0},
        ],
        batch_size=10,
        num_workers=0,
        image_size=8,
        shuffle_buffer=8,
        samples_per_epoch=600,
    )
    counts = Counter(s["__key__"][0] for batch in dm.train_dataloader() for s in batch)
    assert sum(counts.values()) == 600
    assert counts["a"] / 600 == pytest.approx(0.75, abs=0.06)
    assert dm.num_train_batches() == 60
    dm.samples_per_epoch = None
    assert dm.num_train_batches() == 3  # (20 + 10) manifest samples / 1 rank / batch 10
    with pytest.raises(ValueError, match="weight"):
        ShardDataModule(train=[{"urls": str(tmp_path / "a" / "train"), "weight": 0}]).train_sources()


def _broken_shard(path: Path, n_good: int) -> None:
    samples = {f"g{i}": _caption_sample(f"g{i}", i) for i in range(n_good)}
    jpeg = _jpeg()
    samples["truncated"] = {
        "jpg": jpeg[: len(jpeg) // 2],
        "json": json.dumps({"id": "t", "kind": "caption", "captions": ["x"]}).encode(),
    }
    samples["nocaption"] = {"png": _png(1), "json": json.dumps({"id": "n", "kind": "caption"}).encode()}
    samples["nojson"] = {"png": _png(2)}
    write_shard(path, samples)


def test_bad_samples_are_skipped_and_counted(tmp_path: Path):
    _broken_shard(tmp_path / "train" / "shard-000000.tar", n_good=20)
    dm = ShardDataModule(
        train=str(tmp_path / "train"),
        batch_size=4,
        num_workers=0,
        image_size=8,
        shuffle_buffer=4,
        samples_per_epoch=40,
        max_skip_fraction=0.2,
        min_skip_samples=10,
    )
    keys = [s["__key__"] for batch in dm.train_dataloader() for s in batch]
    assert len(keys) == 40 and all(k.startswith("g") for k in keys)
    skipped = dm.skipped()
    assert skipped["skipped"] >= 3 and skipped["seen"] >= 43
    assert 3 / 23 * skipped["seen"] == pytest.approx(skipped["skipped"], abs=3)

    # The same shard as a map-style eval split: the json problems are found while indexing, the
    # truncated image when read; the batch goes on without it.
    dm.val = str(tmp_path / "train")
    dm.skip_counter.reset()
    loader = dm.val_dataloader()
    assert len(loader.dataset) == 21  # 20 good + the truncated image (its json is fine)
    keys = [s["__key__"] for batch in loader for s in batch]
    assert sorted(keys) == sorted(f"g{i}" for i in range(20))
    assert dm.skipped() == {"seen": 23, "skipped": 3}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_threshold_raises(tmp_path: Path, num_workers: int):
    _broken_shard(tmp_path / "train" / "shard-000000.tar", n_good=5)
    dm = ShardDataModule(
        train=str(tmp_path / "train"),
        batch_size=2,
        num_workers=num_workers,
        image_size=8,
        shuffle_buffer=2,
        samples_per_epoch=200,
        max_skip_fraction=0.05,
        min_skip_samples=20,
    )
    with pytest.raises((SkipThresholdError, RuntimeError), match="max_skip_fraction"):
        for _ in dm.train_dataloader():
            pass
    # One early bad sample does not kill the run: below min_samples the threshold is not applied.
    counter = SkipCounter(max_skip_fraction=0.01, min_samples=100)
    counter.skip("shard.tar", "k", "broken")
    counter.skip("shard.tar", "k2", "broken")
    for _ in range(97):
        counter.ok()
    assert (counter.seen, counter.skipped) == (99, 2)
    with pytest.raises(SkipThresholdError, match="2 of 100"):
        counter.ok()


class _TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 1)
        self.seen_batches = 0
        self.val_keys: list[str] = []

    @staticmethod
    def collate(samples):
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "keys": [s["__key__"] for s in samples],
            "urls": [s["__url__"] for s in samples],
        }

    def training_step(self, batch, batch_idx):
        self.seen_batches += 1
        return self.layer(batch["image"].flatten(1)).square().mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["keys"])

    def predict_step(self, batch, batch_idx):
        return list(zip(batch["urls"], batch["keys"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_validate_predict(tmp_path: Path):
    write_split(tmp_path, "train", [5, 7])
    write_split(tmp_path / "v", "val", [4, 3])
    module = _TinyModule()
    dm = ShardDataModule(
        train=str(tmp_path / "train"),
        val=str(tmp_path / "v" / "val"),
        predict=str(tmp_path / "v" / "val"),
        batch_size=4,
        num_workers=0,
        image_size=8,
        shuffle_buffer=4,
    )
    dm.collate_fn = module.collate
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert module.seen_batches == 2 * 3  # 12 samples // batch 4, per epoch
    assert trainer.global_step == 6
    assert sorted(module.val_keys) == sorted(
        [f"s{i}_{j}" for i, n in enumerate([4, 3]) for j in range(n)] * 2
    )
    predictions = [item for batch in trainer.predict(module, datamodule=dm) for item in batch]
    # Ordered by shard then key, carrying the shard url for per-shard outputs.
    assert [(Path(url).name, key) for url, key in predictions] == [
        (f"shard-{i:06d}.tar", f"s{i}_{j}") for i, n in enumerate([4, 3]) for j in range(n)
    ]
