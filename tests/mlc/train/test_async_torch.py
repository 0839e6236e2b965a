"""The torch releases train.mode=async accepts (it relies on torch.distributed.rpc internals:
mlc/train/async_ps/torch_support.py): any other is refused with one line before a process
starts or train.out is touched, and the synchronous job does not care."""

import multiprocessing

import pytest
import torch

from mlc.cli import main
from mlc.train.async_ps import TorchVersionError, check_torch

from .conftest import tiny_config


def sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.mark.parametrize("version", ["2.11.0", "2.12.1+cu130", "2.13.0+cpu", "2.13.1"])
def test_the_supported_releases_pass(version):
    check_torch(version)


def test_the_installed_torch_passes():
    check_torch()  # the project's venv pins 2.13.0, the tested release


@pytest.mark.parametrize("version", ["2.1.0", "2.10.2+cu128", "2.14.0", "2.14.0a0+git1234", "3.0"])
def test_other_releases_are_refused_with_the_range_and_what_to_do(version):
    with pytest.raises(TorchVersionError) as caught:
        check_torch(version)
    message = str(caught.value)
    assert f"torch {version} is installed" in message
    assert ">=2.11,<2.14" in message and "tested on 2.13" in message
    assert "install a torch in that range" in message and "train.mode=sync" in message
    assert "\n" not in message


def test_an_async_run_on_an_unsupported_torch_is_one_line_and_starts_nothing(
    tmp_path, monkeypatch, capsys
):
    started = []
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", started.append)
    out = tmp_path / "run"
    args = tiny_config(tmp_path / "no-dataset", out, "train.mode=async", "ps.workers=4")
    assert main(["train", *sets(args), "--set", "ps.servers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("mlc train: error: train.mode=async")
    assert "torch 2.10.0 is installed" in err and ">=2.11,<2.14" in err
    assert started == [] and not out.exists()  # no process, no run folder


def test_the_synchronous_job_runs_on_any_torch(tmp_path, monkeypatch):
    # The guard belongs to the async mode only: a sync run with an untested torch goes on
    # (the training itself is stubbed: this is about the check, not the loop).
    import mlc.train.loop

    seen = []

    def train(config, resume=None):
        seen.append(config.train.mode)
        return {"stopped_by": None}

    monkeypatch.setattr(torch, "__version__", "2.4.1")
    monkeypatch.setattr(mlc.train.loop, "train", train)
    args = tiny_config(tmp_path / "no-dataset", tmp_path / "run")
    assert main(["train", *sets(args)]) == 0
    assert seen == ["sync"]
