"""Lightning data pieces: WebDataset shards, converters from the public formats, the synthetic set.

The names below load on first use, so that `python -m data_modules.convert` and `python -m
data_modules.synthetic` do not import Lightning (the DataModule's dependency) just to write shards."""

from importlib import import_module

_WHERE = {
    "ShardDataModule": "data_modules.datamodule",
    "list_collate": "data_modules.datamodule",
    "SkipCounter": "data_modules.shards",
    "SkipThresholdError": "data_modules.shards",
    "expand_urls": "data_modules.shards",
    "read_manifest": "data_modules.shards",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
