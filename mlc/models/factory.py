"""Models from configs and from checkpoints: what the training job and the evaluation share."""

from __future__ import annotations

from pathlib import Path

from mlc.config import ConfigError, ModelConfig, config_from_dict
from mlc.io import InputFileError, load_state
from mlc.models.xception import Xception


def build_model(
    config: ModelConfig, num_classes: int, in_channels: int = 3, pretrained: bool = True
) -> Xception:
    """The config's network, with ``config.init``'s pretrained weights when it names some and
    ``pretrained`` is true (false: the weights will come from elsewhere, e.g. a checkpoint)."""
    model = Xception(config, num_classes, in_channels)
    if pretrained and config.init:
        from mlc.models.weights import load_pretrained

        load_pretrained(model, config.init, config.init_drop_head)
    return model


def load_checkpoint_model(checkpoint: str | Path, use_ema: bool = True):
    """(model in eval mode, config, class ids, info) from an `mlc train` checkpoint.

    Uses the EMA weights when the checkpoint has them, as the job's validation did. The
    checkpoint's config goes through the same validation as a config file (older versions are
    migrated); an unknown key is an error naming it.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise InputFileError(f"{path}: no such checkpoint")
    try:
        state = load_state(path)  # weights_only=True: a checkpoint cannot run code
    except Exception as e:  # noqa: BLE001 (torch raises many types on damaged files)
        raise InputFileError(f"{path}: cannot load as a checkpoint: {type(e).__name__}: {e}") from e
    missing = [key for key in ("model", "config", "class_ids") if key not in state]
    if missing:
        raise InputFileError(f"{path}: not an `mlc train` checkpoint (no {', '.join(missing)})")
    try:
        config = config_from_dict(state["config"], f"{path} (its config)", default_version=1)
    except ConfigError as e:
        raise InputFileError(str(e)) from None
    class_ids = [str(c) for c in state["class_ids"]]
    model = Xception(config.model, len(class_ids), config.data.channels)
    weights, source = state["model"], "model"
    if use_ema and state.get("ema"):
        prefix = "module."
        weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
        source = "ema"
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputFileError(f"{path}: the weights do not fit its own config: {e}") from e
    info = {"samples": state.get("samples"), "step": state.get("step"), "weights": source}
    return model.eval(), config, class_ids, info
