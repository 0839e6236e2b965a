"""Model folders (`mlc export`): a network as files that hold data only, no pickle.

    model.safetensors   the weights (the state dict: parameters and batch-norm statistics)
    config.json         the config the network was trained with (mlc.config's to_dict, with its
                        version), what the weights came from, and the input the network takes
    classes.json        the classes in output order: {"classes": [{"index", "id", "name"}]}
    model.onnx          optional (`mlc export --onnx`)

Loading goes through the same config validation as a config file or a checkpoint (an unknown key
or a newer version is an error naming config.json), then the strict state-dict load: the rebuilt
network holds exactly the saved tensors, so it computes what the checkpoint's network computes.
Reading and writing safetensors needs the `export` extra (``pip install 'mlc[export]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlc
from mlc.config import Config, ConfigError, config_from_dict, to_dict
from mlc.extras import require
from mlc.io import InputFileError, atomic_write_bytes, atomic_write_json
from mlc.models.xception import Xception

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
ONNX_FILE = "model.onnx"
FOLDER_FORMAT = "mlc-model"
FOLDER_VERSION = 1


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _safetensors_torch(purpose: str):
    return require("safetensors.torch", purpose, "safetensors", "export")


def save_model_folder(
    folder: str | Path,
    model: Xception,
    config: Config,
    class_ids: list[str],
    class_names: list[str],
    info: dict | None = None,
) -> list[Path]:
    """Write the weights, config.json and classes.json of ``model`` into ``folder``, each file
    to a temporary name and renamed (config.json last); the paths written."""
    st = _safetensors_torch("writing a model folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(class_ids) != model.num_classes or len(class_names) != len(class_ids):
        raise ValueError(
            f"{len(class_ids)} class ids and {len(class_names)} names for a model with "
            f"{model.num_classes} outputs"
        )
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = folder / WEIGHTS_FILE
    atomic_write_bytes(path, st.save(weights, metadata={"format": "pt"}))
    classes = {
        "classes": [
            {"index": i, "id": cid, "name": name}
            for i, (cid, name) in enumerate(zip(class_ids, class_names, strict=True))
        ]
    }
    atomic_write_json(folder / CLASSES_FILE, classes)
    d = config.data
    document = {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_VERSION,
        "mlc_version": mlc.__version__,
        "num_classes": len(class_ids),
        "in_channels": d.channels,
        # For other runtimes (ONNX): what the network takes. mlc itself reads `config`.
        "input": {
            "image_size": d.image_size,
            "crop_fraction": d.crop_fraction,
            "channels": d.channels,
            "layout": "NCHW",
            "normalize": "uint8 pixels / 127.5 - 1 (RGB, or gray with channels 1)",
        },
        **(info or {}),
        "config": to_dict(config),
    }
    atomic_write_json(folder / CONFIG_FILE, document)
    return [path, folder / CLASSES_FILE, folder / CONFIG_FILE]


def read_folder_config(folder: str | Path) -> tuple[dict, Config]:
    """(config.json as read, the validated training config) of a model folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputFileError(
            f"{path}: no such file (is {folder} an `mlc export` folder?)"
        ) from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") != FOLDER_FORMAT:
        raise InputFileError(f'{path}: not an `mlc export` config (no "format": "{FOLDER_FORMAT}")')
    version = document.get("format_version")
    if not isinstance(version, int) or version > FOLDER_VERSION:
        raise InputFileError(
            f"{path}: format_version {version!r}; this mlc reads model folders up to version "
            f"{FOLDER_VERSION} (upgrade mlc)"
        )
    if "config" not in document:
        raise InputFileError(f"{path}: no config")
    try:
        config = config_from_dict(document["config"], f"{path} (its config)")
    except ConfigError as e:
        raise InputFileError(str(e)) from None
    return document, config


def read_folder_classes(folder: str | Path) -> tuple[list[str], list[str]]:
    """(class ids, names) of a model folder's classes.json, in output order."""
    path = Path(folder) / CLASSES_FILE
    try:
        items = json.loads(path.read_text())["classes"]
        ids = [str(item["id"]) for item in items]
        names = [str(item.get("name", item["id"])) for item in items]
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputFileError(
            f'{path}: expected {{"classes": [{{"id", "name"}}, ...]}}: {type(e).__name__}: {e}'
        ) from None
    seen: set[str] = set()
    for cid in ids:
        if cid in seen:
            raise InputFileError(f"{path}: class id {cid!r} listed twice")
        seen.add(cid)
    return ids, names


def load_model_folder(folder: str | Path):
    """(model in eval mode, config, class ids, class names, info) from a model folder."""
    folder = Path(folder)
    document, config = read_folder_config(folder)
    ids, names = read_folder_classes(folder)
    if document.get("num_classes", len(ids)) != len(ids):
        raise InputFileError(
            f"{folder / CONFIG_FILE}: num_classes {document['num_classes']} but "
            f"{folder / CLASSES_FILE} lists {len(ids)} classes"
        )
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    st = _safetensors_torch(f"reading {path}")
    try:
        weights = st.load_file(str(path))
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise InputFileError(f"{path}: cannot read as safetensors: {type(e).__name__}: {e}") from e
    model = Xception(config.model, len(ids), config.data.channels)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputFileError(f"{path}: the weights do not fit {folder / CONFIG_FILE}: {e}") from e
    info = {
        "samples": document.get("samples"),
        "step": document.get("step"),
        "weights": document.get("weights_from", "model"),
    }
    return model.eval(), config, ids, names, info
