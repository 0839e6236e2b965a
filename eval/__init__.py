"""MAP@K evaluation. ``eval.metrics`` and ``eval.streaming`` depend only on torch and numpy;
``eval.MAPAtK`` (eval/torchmetric.py) is the same metric as a torchmetrics ``Metric``, imported
on first use (torchmetrics takes a second to import)."""

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
    "MAPAtK",
    "MetricInputError",
    "class_ap_at_k",
    "full_ap",
    "image_ap_at_k",
]


def __getattr__(name: str):
    if name == "MAPAtK":
        from eval.torchmetric import MAPAtK

        return MAPAtK
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
