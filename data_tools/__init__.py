"""Labelled images -> WebDataset shards: the `mlc shard` command (data_tools.cli)."""
