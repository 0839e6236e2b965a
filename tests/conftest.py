"""Fixtures shared by several test folders.

mosaics: a small real dataset, Fashion-MNIST 2x2 mosaics, sharded once per session (the training
tests in tests/mlc/train and `mlc eval --checkpoint` in tests/eval).
"""

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
