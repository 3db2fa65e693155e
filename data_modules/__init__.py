"""Lightning data pieces: WebDataset shards, converters from the public formats, the synthetic set."""

from data_modules.datamodule import ShardDataModule, list_collate
from data_modules.shards import SkipCounter, SkipThresholdError, expand_urls, read_manifest

__all__ = [
    "ShardDataModule",
    "SkipCounter",
    "SkipThresholdError",
    "expand_urls",
    "list_collate",
    "read_manifest",
]
