"""Lightning DataModule over EasyGen WebDataset shards (data_modules/shards.py).

Training streams one or several weighted sources. Each source is webdataset 1.0's resampled shard
stream (``ResampledShards`` -> ``split_by_node`` -> ``split_by_worker`` -> tar samples) followed by
a shuffle buffer; sources are mixed by weight, decoded, batched inside the workers, and
``WebLoader(...).with_epoch(n_batches)`` gives every rank the same number of batches per epoch:
a finite shard list split across ranks gives uneven ranks, and the short one hangs DDP's collectives.
Shard sampling and shuffling are seeded from (seed, rank, worker, epoch), so a run is reproducible.

Validation, test and predict sets are map-style (``ShardIndexDataset``): Lightning adds its
distributed sampler, and predictions carry the shard url and key (``__url__``, ``__key__``) so the
extract stage can write its outputs shard by shard.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import webdataset as wds
from webdataset.utils import make_seed, pytorch_worker_info

from data_modules.shards import (
    SampleDecoder,
    ShardIndexDataset,
    SkipCounter,
    expand_urls,
    manifest_sample_count,
    read_manifest,
)

__all__ = ["ShardDataModule", "list_collate", "read_manifest"]


def list_collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Default collate: the batch is the list of sample dicts, untouched."""
    return list(samples)


def weighted_source(source, name: str) -> tuple[list[str], float]:
    """One `{urls, weight}` entry of a training mix as (expanded urls, weight); `name` says which in errors."""
    if not isinstance(source, Mapping) or "urls" not in source:
        raise ValueError(f"{name} has no 'urls' (expected {{urls: spec, weight: float}}), got {source!r}")
    weight = float(source.get("weight", 1.0))
    if not weight > 0:
        raise ValueError(f"{name} ({source['urls']!r}) has weight {weight}; weights must be > 0")
    return expand_urls(source["urls"]), weight


class _DropNone:
    """Collate wrapper for map-style sets: an unreadable sample comes back as None and is dropped."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate

    def __call__(self, batch: list[Any]) -> Any:
        return self.collate([sample for sample in batch if sample is not None])


class _TarErrorHandler:
    """A shard that cannot be opened or read to its end is counted as one skip; the stream goes on."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends the shard url to the exception's args.
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "?"
        self.counter.skip(url, "?", f"tar read error: {exn!r}")
        return True


class _EpochSeeded:
    """A pipeline stage whose randomness is seeded per (seed, rank, worker, epoch).

    The epoch counter advances each time the stage is iterated; DataLoader workers are persistent,
    so a worker's copy keeps counting across epochs.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = -1

    def rng(self) -> random.Random:
        self.epoch += 1
        rank, _, worker, _ = pytorch_worker_info()
        return random.Random(make_seed(self.seed, rank, worker, self.epoch))


class _Shuffle(_EpochSeeded):
    """Buffer shuffle (webdataset's algorithm, with a reproducible generator)."""

    def __init__(self, bufsize: int, seed: int):
        super().__init__(seed)
        self.bufsize = bufsize

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = self.rng()
        if self.bufsize <= 1:
            yield from src
            return
        buf: list[Any] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class _WeightedMix(torch.utils.data.IterableDataset, _EpochSeeded):
    """Draw each sample from one of several (endless) sources with probability proportional to its weight."""

    def __init__(self, sources: list[Any], weights: list[float], seed: int):
        torch.utils.data.IterableDataset.__init__(self)
        _EpochSeeded.__init__(self, seed)
        self.sources = sources
        self.weights = weights

    def __iter__(self) -> Iterator[Any]:
        rng = self.rng()
        iterators = [iter(source) for source in self.sources]
        indices = range(len(iterators))
        while True:
            (i,) = rng.choices(indices, weights=self.weights)
            try:
                yield next(iterators[i])
            except StopIteration:
                return


def _is_source_list(spec: Any) -> bool:
    return (
        isinstance(spec, Sequence)
        and not isinstance(spec, str)
        and len(spec) > 0
        and all(isinstance(s, Mapping) for s in spec)
    )


class ShardDataModule(pl.LightningDataModule):
    """EasyGen shards as a DataModule.

    Args:
        train: a url spec (see ``expand_urls``) or a list of ``{"urls": spec, "weight": float}`` sources.
        val, test: url specs of the map-style eval splits.
        predict: url spec for ``predict_dataloader`` (the extract stage); defaults to all train urls.
        batch_size: samples per batch per rank.
        num_workers: DataLoader workers per rank.
        image_size: side of the square image tensors.
        shuffle_buffer: samples held per worker and source for shuffling the training stream.
        samples_per_epoch: training samples per rank per epoch; None derives it from the manifests'
            counts of all training shards divided by the world size.
        collate_fn: turns a list of sample dicts into a batch (the training module sets
            ``dm.collate_fn = module.collate``); default ``list_collate``.
        max_skip_fraction: fraction of unreadable samples tolerated once ``min_skip_samples`` were seen.
        seed: seeds shard resampling, shuffling and mixing.
        load_images: decode images (False when precomputed features make them unnecessary).
    """

    def __init__(
        self,
        train: str | Sequence[str] | Sequence[Mapping[str, Any]] | None = None,
        val: str | Sequence[str] | None = None,
        test: str | Sequence[str] | None = None,
        predict: str | Sequence[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        image_size: int = 256,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        max_skip_fraction: float = 0.01,
        min_skip_samples: int = 100,
        seed: int = 0,
        load_images: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train = train
        self.val = val
        self.test = test
        self.predict = predict
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.collate_fn = collate_fn or list_collate
        self.max_skip_fraction = max_skip_fraction
        self.min_skip_samples = min_skip_samples
        self.seed = seed
        self.load_images = load_images
        self.pin_memory = pin_memory
        self.skip_counter = SkipCounter(max_skip_fraction, min_skip_samples)
        self._eval_sets: dict[str, ShardIndexDataset] = {}

    # ---------------------------------------------------------------------------------------------
    # sources and epoch length

    def train_sources(self) -> list[tuple[list[str], float]]:
        """The training sources as (expanded urls, weight)."""
        if self.train is None:
            raise ValueError("ShardDataModule.train is not set: give a url spec or a list of {urls, weight}")
        if not _is_source_list(self.train):
            return [(expand_urls(self.train), 1.0)]
        return [weighted_source(source, f"train source {i}") for i, source in enumerate(self.train)]

    @property
    def world_size(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.world_size)
        return int(pytorch_worker_info()[1])

    def num_train_batches(self) -> int:
        """Batches each rank runs per epoch (the same on every rank)."""
        samples = self.samples_per_epoch
        if samples is None:
            total = 0
            for urls, _ in self.train_sources():
                count = manifest_sample_count(urls)
                if count is None:
                    raise ValueError(
                        f"cannot derive samples_per_epoch: shards {urls[:3]}... are not listed in a "
                        "<root>/manifest.json next to <root>/<split>/; set samples_per_epoch explicitly"
                    )
                total += count
            samples = total // self.world_size
        return max(1, samples // self.batch_size)

    # ---------------------------------------------------------------------------------------------
    # dataloaders

    def _decoder(self) -> SampleDecoder:
        return SampleDecoder(self.image_size, self.load_images, self.skip_counter)

    def train_pipeline(self) -> wds.DataPipeline:
        """The per-worker training pipeline (samples -> batches), without the DataLoader."""
        streams = []
        for i, (urls, _) in enumerate(self.train_sources()):
            streams.append(
                wds.DataPipeline(
                    wds.ResampledShards(urls, seed=self.seed + i, deterministic=True),
                    wds.split_by_node,
                    wds.split_by_worker,
                    wds.tarfile_to_samples(handler=_TarErrorHandler(self.skip_counter)),
                    _Shuffle(self.shuffle_buffer, self.seed + i),
                )
            )
        weights = [weight for _, weight in self.train_sources()]
        mixed = streams[0] if len(streams) == 1 else _WeightedMix(streams, weights, self.seed)
        return wds.DataPipeline(
            mixed,
            wds.map(self._decoder()),
            wds.batched(self.batch_size, collation_fn=self.collate_fn, partial=False),
        )

    def train_dataloader(self) -> wds.WebLoader:
        n_batches = self.num_train_batches()
        loader = wds.WebLoader(
            self.train_pipeline(),
            batch_size=None,
            num_workers=self.num_workers,
            # Workers keep their pipeline (and its epoch counters) between epochs.
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
        return loader.with_epoch(n_batches).with_length(n_batches, silent=True)

    def eval_dataset(self, split: str) -> ShardIndexDataset:
        """The map-style dataset of ``split`` ('val', 'test' or 'predict'), indexed once."""
        if split not in self._eval_sets:
            spec = getattr(self, split)
            if spec is None and split == "predict" and self.train is not None:
                spec = [url for urls, _ in self.train_sources() for url in urls]
            if spec is None:
                raise ValueError(
                    f"ShardDataModule.{split} is not set: give the url spec of the {split} shards"
                )
            self._eval_sets[split] = ShardIndexDataset(
                spec, self.image_size, self.load_images, self.skip_counter
            )
        return self._eval_sets[split]

    def _eval_loader(self, split: str) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.eval_dataset(split),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_DropNone(self.collate_fn),
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader("predict")

    def skipped(self) -> dict[str, int]:
        """Samples seen and skipped so far on this rank (log ``skipped`` as ``data/skipped``)."""
        return {"seen": self.skip_counter.seen, "skipped": self.skip_counter.skipped}
