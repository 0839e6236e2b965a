"""mlc.config: the shipped configs load; errors in config files and --set overrides are clear."""

from pathlib import Path

import pytest

from mlc.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo", "paper_imagenet", "paper_jft", "openimages"])
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / f"{name}.yaml")


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: train: unknown key 'batch_sise'; valid keys: batch_size"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'many'"):
        load_config(None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["train.batch_size"])
    with pytest.raises(ConfigError, match="optim.name must be sgd, rmsprop or adamw"):
        load_config(None, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    assert parse_override("train.samples=3") == {"train": {"samples": 3}}
    assert load_config(None, ["train.samples=2e6"]).train.samples == 2_000_000
    assert load_config(None, ["model.fc_layers=[64, 32]"]).model.fc_layers == [64, 32]
