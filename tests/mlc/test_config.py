"""mlc.config: the shipped configs load; config files, --set overrides and checkpoints go through
one validation, with versions migrated and clear errors."""

from pathlib import Path

import pytest
import torch

from mlc.config import (
    CONFIG_VERSION,
    ConfigError,
    LoaderConfig,
    config_from_dict,
    load_config,
    parse_override,
    shipped_configs,
    to_dict,
    to_yaml,
)
from mlc.io import InputFileError
from mlc.models import build_model, load_checkpoint_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo", "paper_imagenet", "paper_jft", "openimages"])
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / f"{name}.yaml")


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: data: unknown key 'batch_sise'; valid keys: batch_size"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int, got 'many'"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["data.batch_size"])
    with pytest.raises(ConfigError, match="optim.name must be sgd, rmsprop or adamw"):
        load_config(None, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    assert parse_override("train.samples=3") == {"train": {"samples": 3}}
    assert load_config(None, ["train.samples=2e6"]).train.samples == 2_000_000
    assert load_config(None, ["model.fc_layers=[64, 32]"]).model.fc_layers == [64, 32]


def test_config_round_trips_through_a_dict():
    for name in ["demo", "paper_imagenet", "paper_jft", "openimages"]:
        config = load_config(ROOT / "configs" / f"{name}.yaml")
        data = to_dict(config)
        assert data["version"] == CONFIG_VERSION and "mode" not in data["data"]
        assert config_from_dict(data) == config


def test_loader_and_model_settings_are_the_config_sections():
    config = load_config(None, ["data.batch_size=8", "data.image_size=40", "model.width=0.5"])
    assert isinstance(config.data, LoaderConfig)  # what mlc.data's loaders take
    assert (config.data.batch_size, config.data.image_size) == (8, 40)
    model = build_model(config.model, num_classes=3, in_channels=config.data.channels)
    assert model.config.width == 0.5 and model.config.middle_blocks == 2  # tiny's blocks
    assert model.head.out_features == 3


def test_a_version_1_checkpoint_config_is_migrated():
    old = {"train": {"batch_size": 7, "seed": 3, "samples": 100}, "data": {"image_size": 9}}
    config = config_from_dict(old, "ckpt.pt", default_version=1)
    assert (config.data.batch_size, config.data.seed, config.train.seed) == (7, 3, 3)
    assert (config.train.samples, config.data.image_size, config.version) == (100, 9, 2)


def test_moved_unknown_and_per_split_keys_are_named(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"old.yaml: train.batch_size is data.batch_size"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"ckpt.pt: unknown section 'trian'; valid keys: "):
        config_from_dict({"trian": {}}, "ckpt.pt")
    with pytest.raises(ConfigError, match=r"ckpt.pt: model: unknown key 'depth'"):
        config_from_dict({"model": {"depth": 3}}, "ckpt.pt")
    with pytest.raises(ConfigError, match=r"data.mode is not a setting"):
        load_config(None, ["data.mode=eval"])
    with pytest.raises(ConfigError, match=r"config version 9 is newer than this mlc's"):
        config_from_dict({"version": 9}, "ckpt.pt")
    with pytest.raises(ConfigError, match=r"data.crop_scale must be \[low, high\]"):
        load_config(None, ["data.crop_scale=[0.5]"])


def test_a_set_value_that_is_not_yaml_is_one_error():
    with pytest.raises(ConfigError, match=r"--set train.samples=\[1,: the value is not valid YAML"):
        load_config(None, ["train.samples=[1,"])


def test_a_checkpoint_with_an_unknown_config_key_is_refused_by_name(tmp_path):
    config = load_config(None, ["model.width=0.125"])
    model = build_model(config.model, num_classes=2)
    data = to_dict(config)
    data["model"]["depth"] = 5
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": data, "class_ids": ["a", "b"]}, path)
    with pytest.raises(InputFileError, match=r"ckpt.pt \(its config\): model: unknown key 'depth'"):
        load_checkpoint_model(path)
    del data["model"]["depth"]
    torch.save({"model": model.state_dict(), "config": data, "class_ids": ["a", "b"]}, path)
    loaded, loaded_config, class_ids, _ = load_checkpoint_model(path)
    assert loaded_config == config and class_ids == ["a", "b"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model.eval()(x))


def test_shipped_configs_are_found_by_name(tmp_path, capsys):
    from mlc.cli import main

    assert set(shipped_configs()) == {"demo", "openimages", "paper_imagenet", "paper_jft"}
    assert load_config("paper_jft") == load_config(ROOT / "configs" / "paper_jft.yaml")
    assert load_config("demo.yaml") == load_config(ROOT / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match=r"nope: no such config file, and not a shipped config"):
        load_config("nope")
    capsys.readouterr()
    assert main(["train", "--config", "demo", "--set", "data.batch_size=8", "--print-config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "config.yaml"
    saved.write_text(printed)
    assert load_config(saved) == load_config("demo", ["data.batch_size=8"])
    assert to_yaml(load_config(saved)) == printed
