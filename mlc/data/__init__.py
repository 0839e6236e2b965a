"""Streaming loaders for `mlc shard` datasets (docs/loader.md)."""

from mlc.config import LoaderConfig
from mlc.data.counts import DataLossError
from mlc.data.loader import Batch, ShardLoader
from mlc.data.pipeline import normalize
from mlc.data.urls import Shard, dataset_shards, url_shards

__all__ = [
    "Batch",
    "DataLossError",
    "LoaderConfig",
    "Shard",
    "ShardLoader",
    "dataset_shards",
    "normalize",
    "url_shards",
]
