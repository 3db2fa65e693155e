"""Precomputed BiDiffuser encoder outputs carried in shards (the paper's training recipe: "features
precomputed (VAE moments,
CLIP-B/32 image, CLIP-L caption)"), as `stage=extract stage.what=encoders` writes them beside a sample:

- `KEY.moments.npy`      [2C, h, w]  the VAE's (mean, logvar) of the image (a latent is drawn per step);
- `KEY.clip_img.npy`     [1, D]      CLIP image embedding;
- `KEY.text_latents.npy` [N, L, d]   `encode_prefix(CLIP-L(caption))` of each of the N captions in the json,
                                      in the json's order.

The shard decoder keeps only `features.npy` of a sample's extra members, so these are read here from the
sample's own shard (`__url__`, `__key__`), through an index of tar member offsets built once per shard."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

ENCODER_MEMBERS = {"moments": "moments.npy", "clip_img": "clip_img.npy", "text_latents": "text_latents.npy"}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class ShardMembers:
    """Reads named members of samples in local tar shards; indexes each shard once (per process)."""

    def __init__(self):
        self._index: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}

    def _shard(self, url: str) -> dict[str, dict[str, tuple[int, int]]]:
        if url not in self._index:
            index: dict[str, dict[str, tuple[int, int]]] = {}
            path = url.removeprefix("file://")
            if os.path.isfile(path):
                with tarfile.open(path, mode="r:") as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            key, _, field = os.path.basename(m.name).partition(".")
                            index.setdefault(key, {})[field] = (m.offset_data, m.size)
            self._index[url] = index
        return self._index[url]

    def fields(self, url: str | None, key: str | None) -> set[str]:
        if not url or not key:
            return set()
        return set(self._shard(url).get(key, {}))

    def read(self, url: str, key: str, field: str) -> bytes:
        offset, size = self._shard(url)[key][field]
        with open(url.removeprefix("file://"), "rb") as f:
            return os.pread(f.fileno(), size, offset)


def load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: unreadable .npy ({exc})") from exc


def encoder_outputs(sample: dict, members: ShardMembers) -> dict[str, np.ndarray] | None:
    """The sample's precomputed encoder outputs, or None when it does not carry all three.

    Arrays the decoder already passed through (`sample["moments"]` etc.) are used as they are."""
    if all(isinstance(sample.get(k), np.ndarray) for k in ENCODER_MEMBERS):
        return {k: sample[k] for k in ENCODER_MEMBERS}
    url, key = sample.get("__url__"), sample.get("__key__")
    if not set(ENCODER_MEMBERS.values()) <= members.fields(url, key):
        return None
    return {
        k: load_npy(members.read(url, key, field), f"shard {url}, key {key!r}, member .{field}")
        for k, field in ENCODER_MEMBERS.items()
    }
