"""A small real dataset for training tests: Fashion-MNIST 2x2 mosaics, sharded once per session."""

from pathlib import Path

import pytest

from mlc.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("mosaics")
    args = [
        "shard",
        "fashion-mnist",
        "--out",
        str(out),
        "--train-count",
        "1200",
        "--test-count",
        "300",
        "--shard-size",
        "200",
        "--quiet",
    ]
    assert main(args) == 0
    return out


def tiny_config(dataset, out, *extra):
    """--set overrides for a fast CPU run (32x32 crops of the 56x56 mosaics)."""
    return [
        f"data.dataset={dataset}",
        f"train.out={out}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=100",
        "data.batch_size=16",
        "train.samples=320",
        "train.log_every=160",
        "train.eval_every=100000",
        "train.checkpoint_every=160",
        "optim.name=adamw",
        "optim.lr=0.003",
        "optim.decay_every=0",
        "model.name=xception-tiny",
        "model.width=0.125",
        *extra,
    ]
