"""Tools that turn labelled images into WebDataset shards (the `mlc shard` command, to come)."""
