"""`mlc export`: a model folder that gives bit for bit the checkpoint's outputs through
`mlc.load`, `mlc predict` and `mlc eval`, without pickle; ONNX within 1e-4 of torch."""

import json
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mlc
from mlc.cli import main
from mlc.config import config_from_dict
from mlc.models import load_checkpoint_model
from mlc.models.folder import load_model_folder


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def image_bytes(mosaics):
    """The first 24 test mosaics' image bytes."""
    with tarfile.open(mosaics / "test-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".ppm")][:24]
        return [tar.extractfile(m).read() for m in members]


def test_the_folder_holds_data_only(exported, tiny_checkpoint, mosaics):
    assert sorted(p.name for p in exported.iterdir()) == [
        "classes.json",
        "config.json",
        "model.onnx",
        "model.safetensors",
    ]
    document = json.loads((exported / "config.json").read_text())
    assert document["format"] == "mlc-model" and document["format_version"] == 1
    assert document["weights_from"] == "ema" and document["samples"] == 160
    assert document["config"]["version"] == 2
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert config_from_dict(document["config"]) == config_from_dict(state["config"])
    classes = json.loads((exported / "classes.json").read_text())["classes"]
    data = json.loads((mosaics / "classes.json").read_text())["classes"]
    assert [(c["id"], c["name"]) for c in classes] == [(c["id"], c["name"]) for c in data]
    assert document["onnx"]["max_abs_difference"] <= 1e-4
    # The weights are the checkpoint's EMA tensors, exactly.
    model, *_ = load_model_folder(exported)
    ema, *_ = load_checkpoint_model(tiny_checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), ema.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_folder_gives_the_checkpoints_outputs_bit_for_bit(
    exported, tiny_checkpoint, image_bytes
):
    for fold in (True, False):
        from_folder = mlc.load(exported, fold=fold)
        from_checkpoint = mlc.load(tiny_checkpoint, fold=fold)
        assert from_folder.class_names == from_checkpoint.class_names
        assert torch.equal(from_folder.logits(image_bytes), from_checkpoint.logits(image_bytes))
    raw = mlc.load(tiny_checkpoint)  # EMA weights: the raw ones would give other logits
    raw.model = load_checkpoint_model(tiny_checkpoint, use_ema=False)[0]
    assert not torch.equal(raw.logits(image_bytes[:2]), from_folder.logits(image_bytes[:2]))


def test_predict_and_eval_take_the_folder(exported, tiny_checkpoint, mosaics, tmp_path):
    for name, model in (("folder", exported), ("checkpoint", tiny_checkpoint)):
        args = ["predict", "--checkpoint", str(model), str(mosaics), "--quiet"]
        assert main([*args, "--out", str(tmp_path / f"{name}.parquet")]) == 0
        args = ["eval", "--checkpoint", str(model), "--data", str(mosaics), "--quiet"]
        assert main([*args, "--output", str(tmp_path / name), "--bootstrap", "20"]) == 0
    tables = [pq.read_table(tmp_path / f"{name}.parquet") for name in ("folder", "checkpoint")]
    assert tables[0].equals(tables[1])
    folder, checkpoint = (
        json.loads((tmp_path / name / "summary.json").read_text())
        for name in ("folder", "checkpoint")
    )
    for key in ("weighted_map_at_k", "image_map_at_k", "full_map", "confidence_intervals"):
        assert folder[key] == checkpoint[key], key
    assert folder["weights_from"] == "ema" and folder["checkpoint_samples"] == 160


def test_onnx_matches_torch_on_real_images(exported, image_bytes):
    import onnxruntime

    predictor = mlc.load(exported)
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"))
    for batch in (image_bytes[:1], image_bytes[:5], image_bytes):  # any batch size
        x = (predictor.preprocess(batch).float() / 127.5 - 1).contiguous().numpy()
        (logits,) = session.run(["logits"], {"images": x})
        difference = np.abs(logits - predictor.logits(batch).numpy()).max()
        assert difference <= 1e-4, difference


def test_refusals_and_errors(exported, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--out"]
    assert main([*args, str(exported)]) == 2
    assert "earlier export: add --force" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*args, str(other), "--force"]) == 2
    assert "is not an `mlc export` folder" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"

    copy = tmp_path / "copy"
    assert main([*args, str(copy)]) == 0
    assert main([*args, str(copy), "--force", "--no-ema"]) == 0
    assert json.loads((copy / "config.json").read_text())["weights_from"] == "model"
    assert "model weights" in capsys.readouterr().out

    document = json.loads((copy / "config.json").read_text())
    document["config"]["model"]["depth"] = 3
    (copy / "config.json").write_text(json.dumps(document))
    assert main(["predict", "--checkpoint", str(copy), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'config.json'} (its config): model: unknown key 'depth'" in err
    document["format_version"] = 9
    (copy / "config.json").write_text(json.dumps(document))
    assert main(["predict", "--checkpoint", str(copy), str(tmp_path)]) == 2
    assert "format_version 9" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main([*args, str(tmp_path / "new"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install 'mlc[onnx]'") and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main([*args, str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install 'mlc[export]'") and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()
