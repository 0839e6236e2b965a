"""mlc: large-scale multi-label image classification (Xception, WebDataset shards, MAP@100)."""

__version__ = "0.1.0"
