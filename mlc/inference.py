"""What every inference path shares (`mlc eval --checkpoint`, `mlc predict`, `mlc.load`): a
model from a checkpoint or an `mlc export` folder with its class names, the network made ready
for inference, its eval preprocessing (loader settings, and the same transform for one image),
and the logits of a batch.

Sharing these is what makes `mlc predict` on an `mlc shard` split give bit for bit the scores
`mlc eval --checkpoint` computes on it: the same weights, the same folded network, the same
loader and the same arithmetic per batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mlc.accel import Precision
from mlc.config import Config, LoaderConfig
from mlc.data import normalize
from mlc.data.preprocess import EvalTransform
from mlc.format import CLASSES_FILE
from mlc.io import InputFileError
from mlc.models import Xception, load_checkpoint_model
from mlc.models.folder import is_model_folder, load_model_folder
from mlc.storage import is_local, join, local_path, read_input_classes

FP32 = Precision("fp32")


@dataclass
class LoadedModel:
    model: Xception  # eval mode, on the CPU, batch norm not folded
    config: Config  # the training config (data: the eval preprocessing's settings)
    class_ids: list[str]  # output order
    class_names: list[str]  # display names (the id where none is known)
    info: dict  # samples, step, weights ("ema" or "model"), path, kind, names_from


def load_model(path: str | Path, use_ema: bool = True) -> LoadedModel:
    """A checkpoint of `mlc train` (a .pt file; its EMA weights when it has them and
    ``use_ema``) or an `mlc export` folder.

    A checkpoint's class names come from the classes.json of the dataset named in its config,
    when that is there; a model folder has its own."""
    path = Path(path)
    if path.is_dir():
        if not is_model_folder(path):
            raise InputFileError(
                f"{path}: a folder without config.json: not an `mlc export` folder (a "
                "checkpoint is a .pt file)"
            )
        model, config, ids, names, info = load_model_folder(path)
        info.update(kind="model folder", names_from=str(path / CLASSES_FILE))
    else:
        model, config, ids, info = load_checkpoint_model(path, use_ema)
        names, found, source = ids, 0, join(config.data.dataset, CLASSES_FILE)
        # Without a (usable, reachable) class list the ids are the names: a model loads where
        # its dataset is out of reach (no credentials, no s3fs, another machine).
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError, ImportError):
            names, found = class_names(ids, source)
        info.update(kind="checkpoint", names_from=str(source) if found else None)
    return LoadedModel(model, config, ids, names, {**info, "path": str(path)})


def class_names(class_ids: list[str], source: str | Path) -> tuple[list[str], int]:
    """(a name per class id, how many were found) from a class list (mlc.io.read_classes:
    classes.json, a JSON list, an OpenImages class-descriptions CSV) or a folder holding a
    classes.json, by path or URL; an id the list does not name is its own name."""
    if is_local(source) and local_path(source).is_dir():
        source = local_path(source) / CLASSES_FILE
    classes = read_input_classes(source)
    names = dict(zip(classes.ids, classes.names, strict=True))
    return [names.get(cid, cid) for cid in class_ids], sum(cid in names for cid in class_ids)


def prepare_for_inference(
    model: Xception, fold: bool = True, device: torch.device | str | None = None
) -> Xception:
    """The network in eval mode on ``device``; with ``fold``, a copy with batch norm folded
    into the convolutions (mlc.models.fuse: the same logits up to float rounding, faster)."""
    if fold:
        from mlc.models.fuse import fold_batch_norm

        model = fold_batch_norm(model)
    return model.to(device or "cpu").eval()


def eval_loader_config(config: Config, batch_size: int, workers: int | None = None) -> LoaderConfig:
    """The eval-mode loader settings of a model's training config: its image size, crop and
    channels, with this pass's batch size and loader processes (default: the config's)."""
    return replace(
        config.data,
        mode="eval",
        batch_size=batch_size,
        num_workers=config.data.num_workers if workers is None else workers,
    )


def eval_transform(config: Config) -> EvalTransform:
    """The same preprocessing for one image at a time (file, bytes, PIL, array, tensor)."""
    return EvalTransform.from_config(config.data)


def batch_logits(
    model: Xception,
    images: torch.Tensor,
    device: torch.device,
    precision: Precision | None = None,
) -> torch.Tensor:
    """float32 logits on the CPU of a uint8 [B, C, H, W] batch (call under inference_mode): the
    uint8 pixels go to ``device`` (without waiting, from pinned memory), are normalized there,
    and the forward runs in ``precision`` (default fp32)."""
    with (precision or FP32).autocast(device):
        return model(normalize(images.to(device, non_blocking=True))).float().cpu()
