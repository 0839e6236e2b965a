"""Models: the Xception family (xception.py) and weight import (weights.py)."""

from mlc.models.xception import PRESETS, Xception, XceptionConfig, create_model

__all__ = ["PRESETS", "Xception", "XceptionConfig", "create_model"]
