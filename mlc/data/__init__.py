"""Streaming loaders for `mlc shard` datasets (docs/loader.md)."""

from mlc.data.loader import Batch, ShardLoader
from mlc.data.pipeline import LoaderConfig, normalize
from mlc.data.urls import Shard, dataset_shards, url_shards

__all__ = [
    "Batch",
    "LoaderConfig",
    "Shard",
    "ShardLoader",
    "dataset_shards",
    "normalize",
    "url_shards",
]
