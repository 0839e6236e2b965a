"""The training job's device, precision and compile settings: bf16 autocast on the CPU, `auto`
that resolves to fp32 training exactly as fp32 does, the torch.compile flag, the pinned-memory
loader path (a no-op on CPUs), and the same job on a GPU (marked cuda, skipped without one)."""

import json

import pytest
import torch

from mlc import accel
from mlc.cli import main
from mlc.config import load_config
from mlc.data import ShardLoader
from mlc.io import load_state
from mlc.train.checkpoint import list_checkpoints

from .conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out) -> dict:
    return load_state(list_checkpoints(out)[-1])["model"]


def test_bf16_training_on_a_cpu_learns_and_keeps_fp32_weights(mosaics, tmp_path):
    out = tmp_path / "bf16"
    args = tiny_config(mosaics, out, "train.precision=bf16", "train.samples=960")
    assert main(["train", *sets(args)]) == 0
    runs = records(out)
    losses = [r["loss"] for r in runs if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.9
    summary = next(r for r in runs if r["kind"] == "summary")
    assert (summary["device"], summary["precision"]) == ("cpu", "bf16")
    weights = final_weights(out)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    header = (out / "config.yaml").read_text().split("\n", 3)
    assert header[:3] == ["# resolved on this machine:", "# device: cpu", "# precision: bf16"]
    assert load_config(out / "config.yaml") == load_config(None, args)  # comments only


def test_auto_that_resolves_to_fp32_trains_bit_for_bit_as_fp32(mosaics, tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "CPU_AUTO_BF16", {})  # whatever this CPU has: fp32
    extra = ["train.deterministic=true", "train.samples=160"]
    fp32, auto = tmp_path / "fp32", tmp_path / "auto"
    assert main(["train", *sets(tiny_config(mosaics, fp32, "train.precision=fp32", *extra))]) == 0
    assert main(["train", *sets(tiny_config(mosaics, auto, "train.precision=auto", *extra))]) == 0
    assert "# precision: fp32 (auto: " in (auto / "config.yaml").read_text()
    a, b = final_weights(fp32), final_weights(auto)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_compile_flag_compiles_the_forward_only(mosaics, tmp_path, monkeypatch):
    """The plumbing, with torch.compile recorded (compiling on 2 CPU cores takes over a minute:
    the real thing is the slow test below)."""
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    args = tiny_config(mosaics, out, "train.compile=true", "train.samples=32")
    assert main(["train", *sets(args)]) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    keys = set(final_weights(out))
    assert keys and not any(k.startswith("_orig_mod") for k in keys)  # the plain model's names


@pytest.mark.slow  # torch.compile's first call: ~75 s on 2 CPU cores
def test_compiled_training_runs_on_a_cpu(mosaics, tmp_path):
    out = tmp_path / "run"
    args = tiny_config(mosaics, out, "train.compile=true", "train.samples=64")
    assert main(["train", *sets(args)]) == 0
    assert not any(k.startswith("_orig_mod") for k in final_weights(out))


@pytest.mark.filterwarnings("ignore:.*pin_memory")  # "... no accelerator is found"
def test_the_pinned_memory_path_gives_the_same_batches(mosaics):
    """pin_memory=True (what a CUDA job sets) runs the batches through a DataLoader, which pins
    nothing without an accelerator: the same batches as the default path."""
    settings = load_config(None, tiny_config(mosaics, "unused")).data
    plain = ShardLoader.from_dataset(mosaics, "train", settings)
    pinned = ShardLoader.from_dataset(mosaics, "train", settings, pin_memory=True)
    for a, b in zip(_take(plain, 3), _take(pinned, 3), strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.images.is_pinned() == torch.cuda.is_available()


def _take(loader, n):
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small procedural dataset (mlc demo's fallback): the GPU machine may have no
    Fashion-MNIST files."""
    from mlc.demo import build_dataset

    out = tmp_path_factory.mktemp("shapes")
    build_dataset(out, "shapes", {"train": 640, "test": 200}, None, 1, False)
    return out


@pytest.mark.cuda
@cuda
def test_training_evaluation_and_prediction_on_the_gpu(shapes, tmp_path):
    out = tmp_path / "run"
    args = tiny_config(shapes, out, "train.samples=960", "train.eval_every=960")
    assert main(["train", *sets(args)]) == 0
    runs = records(out)
    summary = next(r for r in runs if r["kind"] == "summary")
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert summary["device"] == "cuda:0" and summary["precision"].startswith(expected + " (auto")
    losses = [r["loss"] for r in runs if r["kind"] == "train"]
    assert losses[-1] < losses[0] * 0.9
    val = next(r for r in runs if r["kind"] == "val")
    checkpoint = list_checkpoints(out)[-1]
    report = tmp_path / "eval"
    common = ["--checkpoint", str(checkpoint), "--quiet"]
    assert main(["eval", *common, "--data", str(shapes), "--out", str(report)]) == 0
    scored = json.loads((report / "summary.json").read_text())
    assert scored["device"] == "cuda:0" and scored["precision"].startswith(expected)
    assert scored["weighted_map_at_k"] == pytest.approx(val["fwmap"], abs=0.02)
    predictions = tmp_path / "predictions.parquet"
    assert main(["predict", str(shapes), *common, "--out", str(predictions)]) == 0
    assert predictions.is_file()
