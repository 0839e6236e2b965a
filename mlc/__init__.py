"""mlc: large-scale multi-label image classification (Xception, WebDataset shards, MAP@100).

``mlc.load(path)`` gives a Predictor of a checkpoint or an `mlc export` folder (docs/api.md);
it is imported on first use, so ``import mlc`` stays light (no torch).
"""

__version__ = "0.1.0"

_LAZY = {"load": "mlc.predict", "Predictor": "mlc.predict", "Label": "mlc.predict"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
