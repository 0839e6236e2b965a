"""MAP@K evaluation. ``eval.metrics`` and ``eval.streaming`` depend only on torch and numpy."""

from eval.metrics import (
    ClassAP,
    ImageAP,
    MetricInputError,
    class_ap_at_k,
    full_ap,
    image_ap_at_k,
)
from eval.streaming import MAPAccumulator

__all__ = [
    "ClassAP",
    "ImageAP",
    "MAPAccumulator",
    "MetricInputError",
    "class_ap_at_k",
    "full_ap",
    "image_ap_at_k",
]
