"""A checkpoint for the inference tests (`mlc predict`, `mlc export`, `mlc.load`), on the
`mosaics` dataset of tests/conftest.py."""

import json

import pytest
import torch

from mlc.config import load_config, to_dict
from mlc.demo import DEMO_CONFIG
from mlc.models import build_model


@pytest.fixture(scope="session")
def tiny_checkpoint(mosaics, tmp_path_factory):
    """An untrained xception-tiny (width 1/8) on 32x32 crops of the 56x56 mosaics, saved as
    `mlc train` saves it: random batch-norm statistics (so that folding them changes the
    weights), and EMA weights that differ from the raw ones (inference must use the EMA)."""
    overrides = [f"data.dataset={mosaics}", "data.image_size=32", "data.num_workers=0"]
    config = load_config(DEMO_CONFIG, [*overrides, "model.width=0.125", "train.ema_decay=0.9"])
    classes = json.loads((mosaics / "classes.json").read_text())["classes"]
    class_ids = [c["id"] for c in classes]
    torch.manual_seed(0)
    model = build_model(config.model, len(class_ids), config.data.channels)
    ema = build_model(config.model, len(class_ids), config.data.channels)
    for net in (model, ema):
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    ema_state = {f"module.{k}": v for k, v in ema.state_dict().items()}
    state = {
        "model": model.state_dict(),
        "ema": {**ema_state, "n_averaged": torch.tensor(10)},
        "config": to_dict(config),
        "class_ids": class_ids,
        "samples": 160,
        "step": 10,
    }
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt.pt"
    torch.save(state, path)
    return path
