"""Models: the Xception family (xception.py), weight import (weights.py), and models built from
configs and checkpoints (factory.py)."""

from mlc.models.factory import build_model, load_checkpoint_model
from mlc.models.xception import PRESETS, Xception, create_model

__all__ = ["PRESETS", "Xception", "build_model", "create_model", "load_checkpoint_model"]
