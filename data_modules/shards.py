"""Reading EasyGen WebDataset shards: URL expansion, per-sample decoding, skip accounting, eval indexes.

One sample is one key in a tar shard (data_modules/shards.py): ``KEY.jpg``/``KEY.png``, ``KEY.json`` with at least
``{"id", "kind"}`` and the fields of its kind, and optionally ``KEY.features.npy`` (float16 [L, D])
written by the extract stage. Training streams shards through webdataset 1.0
(``data_modules.datamodule``); evaluation reads a split once into an index of tar members
(``ShardIndexDataset``) so Lightning's distributed sampler can split it by position.

Bad data inside a shard (a truncated image, a sample without its json or a required field) is
skipped, logged with the shard url and key, and counted in a ``SkipCounter`` shared by the DataLoader
workers of one rank; passing ``max_skip_fraction`` raises once enough samples have been seen.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
from PIL import Image

from easygen.images import load_image  # noqa: F401 - re-exported: the shards' decode step

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURES_FIELD = "features.npy"
KINDS = ("caption", "conversation", "vqa")
# Fields a sample of each kind must carry in its json, and the Python type each must have.
REQUIRED_FIELDS: dict[str, dict[str, type]] = {
    "caption": {"captions": list},
    "conversation": {"conversations": list},
    "vqa": {"question": str, "answers": list},
}
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# webdataset's own rule: the key is everything up to the first dot of the basename.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# --------------------------------------------------------------------------------------------------
# URL specs


def _is_stream_url(url: str) -> bool:
    return url.startswith("pipe:") or (bool(_REMOTE.match(url)) and not url.startswith("file://"))


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of urls.

    Accepts a local path, a glob (``data/train/*.tar``), a brace pattern
    (``shard-{000000..000009}.tar``), a directory (all ``*.tar`` inside), a ``pipe:`` command or a
    remote url (kept as is), several of these joined by ``::``, or a list of any of them.
    Raises FileNotFoundError naming the spec when a named local shard is missing or nothing matches.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = str(spec).split("::")
    elif isinstance(spec, Iterable):
        parts = [str(s) for s in spec]
    else:
        raise TypeError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}")
    urls: list[str] = []
    for part in parts:
        for url in braceexpand.braceexpand(part):
            if _is_stream_url(url):
                urls.append(url)
                continue
            path = os.path.expanduser(url.removeprefix("file://"))
            if glob.has_magic(path):
                urls.extend(sorted(glob.glob(path)))
            elif os.path.isdir(path):
                urls.extend(sorted(glob.glob(os.path.join(path, "*.tar"))))
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise FileNotFoundError(f"shard {url!r} (from spec {spec!r}) does not exist")
    if not urls:
        raise FileNotFoundError(f"no shards match the spec {spec!r}")
    return urls


# --------------------------------------------------------------------------------------------------
# manifests


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` written by the converters (``root`` is its folder or the file itself)."""
    path = Path(root)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path} (expected the manifest.json written by the converter)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid json ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path}: expected an object with a 'splits' mapping of per-split counts")
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), dict):
            raise ValueError(f"{path}: splits.{split} must have 'samples' and a 'shards' mapping")
    return manifest


def manifest_sample_count(urls: Sequence[str]) -> int | None:
    """Total samples in local shards ``<root>/<split>/<shard>.tar`` according to ``<root>/manifest.json``.

    Returns None when a shard is remote or not listed in a manifest (the caller must then be told
    the epoch length explicitly).
    """
    manifests: dict[Path, dict[str, Any]] = {}
    total = 0
    for url in urls:
        if _is_stream_url(url):
            return None
        shard = Path(url).resolve()
        root = shard.parent.parent
        if root not in manifests:
            if not (root / "manifest.json").is_file():
                return None
            manifests[root] = read_manifest(root)
        split = manifests[root]["splits"].get(shard.parent.name)
        name = f"{shard.parent.name}/{shard.name}"
        if split is None or name not in split["shards"]:
            return None
        total += int(split["shards"][name])
    return total


# --------------------------------------------------------------------------------------------------
# skip accounting


class SkipThresholdError(RuntimeError):
    """Too many samples of a rank's stream were unreadable."""


class SkipCounter:
    """Counts samples seen and skipped, shared across the DataLoader workers of one process.

    The counts live in shared memory (``multiprocessing.Value``) so the training module can read
    ``skipped`` in the main process and log it as ``data/skipped`` while workers do the decoding.
    """

    def __init__(self, max_skip_fraction: float = 0.01, min_samples: int = 100):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_samples = int(min_samples)
        self._seen = multiprocessing.Value("q", 0)
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def seen(self) -> int:
        return int(self._seen.value)

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def reset(self) -> None:
        with self._seen.get_lock():
            self._seen.value = 0
        with self._skipped.get_lock():
            self._skipped.value = 0

    def ok(self) -> None:
        with self._seen.get_lock():
            self._seen.value += 1
        self.check()

    def skip(self, url: str, key: str, reason: str) -> None:
        log.warning("skipping sample %r in shard %s: %s", key, url, reason)
        with self._seen.get_lock():
            self._seen.value += 1
        with self._skipped.get_lock():
            self._skipped.value += 1
        self.check(f"last skipped: shard {url}, key {key!r}: {reason}")

    def check(self, detail: str = "") -> None:
        seen, skipped = self.seen, self.skipped
        if seen >= self.min_samples and skipped > self.max_skip_fraction * seen:
            raise SkipThresholdError(
                f"{skipped} of {seen} samples were unreadable ({skipped / seen:.2%}), more than "
                f"max_skip_fraction={self.max_skip_fraction:.2%}; {detail}".rstrip("; ")
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:
            # Plain pickling (not a worker being started) cannot carry shared memory: the copy
            # starts from the current counts in its own memory.
            state["_seen"], state["_skipped"] = self.seen, self.skipped
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("_seen", "_skipped"):
            if isinstance(state[name], int):
                state[name] = multiprocessing.Value("q", state[name])
        self.__dict__.update(state)


# --------------------------------------------------------------------------------------------------
# decoding


class SampleError(ValueError):
    """A sample that cannot be used (the message says which field and why)."""


def validate_meta(meta: Any) -> dict[str, Any]:
    """Check a sample's json against the shard format; raise SampleError naming the field."""
    if not isinstance(meta, dict):
        raise SampleError(f".json must be an object, got {type(meta).__name__}")
    if not isinstance(meta.get("id"), str) or not meta["id"]:
        raise SampleError(".json field 'id' must be a non-empty string")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise SampleError(f".json field 'kind' must be one of {KINDS}, got {kind!r}")
    for field, expected in REQUIRED_FIELDS[kind].items():
        if field not in meta:
            raise SampleError(f".json of a {kind} sample has no {field!r} field")
        if not isinstance(meta[field], expected):
            raise SampleError(
                f".json field {field!r} must be a {expected.__name__}, got {type(meta[field]).__name__}"
            )
    if kind == "caption" and (
        not meta["captions"] or not all(isinstance(c, str) and c.strip() for c in meta["captions"])
    ):
        raise SampleError(".json field 'captions' must be a non-empty list of non-empty strings")
    return meta


def decode_sample(raw: Mapping[str, Any], image_size: int, load_images: bool = True) -> dict[str, Any]:
    """Turn webdataset's ``{__key__, __url__, ext: bytes}`` into EasyGen's sample dict.

    Raises SampleError for a sample that must be skipped.
    """
    if "json" not in raw:
        raise SampleError("no .json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(f"unreadable .json: {exc}") from exc
    meta = validate_meta(meta)
    features = None
    if FEATURES_FIELD in raw:
        try:
            features = np.load(io.BytesIO(raw[FEATURES_FIELD]), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SampleError(f"unreadable .{FEATURES_FIELD}: {exc}") from exc
    image = None
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if load_images:
        if image_ext is not None:
            try:
                image = load_image(raw[image_ext], image_size)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise SampleError(f"unreadable image .{image_ext}: {exc}") from exc
        elif meta["kind"] != "conversation":
            # Text-only dialogue is valid; a caption or VQA sample without its picture is not.
            raise SampleError(f"a {meta['kind']} sample has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    sample = dict(meta)
    sample.update(
        __key__=raw.get("__key__"),
        __url__=raw.get("__url__"),
        image=image,
        features=features,
    )
    return sample


class SampleDecoder:
    """Picklable pipeline step: decode a raw sample, or count it as skipped and return None."""

    def __init__(self, image_size: int, load_images: bool = True, counter: SkipCounter | None = None):
        self.image_size = image_size
        self.load_images = load_images
        self.counter = counter

    def __call__(self, raw: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            sample = decode_sample(raw, self.image_size, self.load_images)
        except SampleError as exc:
            url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
            if self.counter is None:
                log.warning("skipping sample %r in shard %s: %s", key, url, exc)
            else:
                self.counter.skip(url, key, str(exc))
            return None
        if self.counter is not None:
            self.counter.ok()
        return sample


# --------------------------------------------------------------------------------------------------
# map-style eval set


def _split_member(name: str) -> tuple[str, str] | None:
    match = _KEY_FIELD.match(name)
    return (match.group(1), match.group(2)) if match else None


class ShardIndexDataset(torch.utils.data.Dataset):
    """Map-style dataset over a split's shards, indexed once by tar member (ordered: shard, then key).

    Local shards are indexed by byte offset and read with ``os.pread`` (safe across forked workers);
    ``pipe:``/remote shards are read into memory once (eval splits are small). Samples whose json is
    missing or invalid are counted as skipped while indexing; an unreadable image is found (and
    counted) when the sample is read, and ``__getitem__`` then returns None.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        image_size: int = 256,
        load_images: bool = True,
        counter: SkipCounter | None = None,
    ):
        self.urls = expand_urls(urls)
        self.decoder = SampleDecoder(image_size, load_images, counter)
        self.counter = counter
        self._fds: dict[str, int] = {}
        self._fd_pid = -1
        self.index: list[tuple[str, str, dict[str, Any]]] = []
        for url in self.urls:
            self.index.extend(self._index_shard(url))

    def _index_shard(self, url: str) -> list[tuple[str, str, dict[str, Any]]]:
        samples: dict[str, dict[str, Any]] = {}
        try:
            if _is_stream_url(url):
                from webdataset.gopen import gopen

                with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        parts = _split_member(member.name) if member.isfile() else None
                        if parts:
                            samples.setdefault(parts[0], {})[parts[1]] = tar.extractfile(member).read()
            else:
                with tarfile.open(url, mode="r:") as tar:
                    for member in tar.getmembers():
                        parts = _split_member(member.name) if member.isfile() else None
                        if parts:
                            samples.setdefault(parts[0], {})[parts[1]] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError) as exc:
            raise OSError(f"cannot index shard {url}: {exc}") from exc
        entries = []
        for key, fields in samples.items():
            try:
                if "json" not in fields:
                    raise SampleError("no .json member")
                meta = json.loads(self._read(url, fields["json"]))
                validate_meta(meta)
            except (SampleError, ValueError, UnicodeDecodeError) as exc:
                if self.counter is not None:
                    self.counter.skip(url, key, str(exc))
                else:
                    log.warning("skipping sample %r in shard %s: %s", key, url, exc)
                continue
            entries.append((url, key, fields))
        return entries

    def _read(self, url: str, location: bytes | tuple[int, int]) -> bytes:
        if isinstance(location, bytes):
            return location
        if self._fd_pid != os.getpid():
            # Descriptors opened before a fork are not ours to use; pread needs no shared offset.
            self._fds, self._fd_pid = {}, os.getpid()
        if url not in self._fds:
            self._fds[url] = os.open(url, os.O_RDONLY)
        offset, size = location
        return os.pread(self._fds[url], size, offset)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        url, key, fields = self.index[i]
        raw = {"__key__": key, "__url__": url}
        raw.update({field: self._read(url, location) for field, location in fields.items()})
        return self.decoder(raw)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_fd_pid"] = {}, -1
        return state
