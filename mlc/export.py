"""`mlc export`: a checkpoint as a model folder (mlc.models.folder: safetensors weights,
config.json, classes.json) that `mlc.load`, `mlc predict` and `mlc eval` take without pickle,
and optionally as ONNX (torch's dynamo exporter), checked against onnxruntime.

The folder is written under a temporary name beside ``--out`` and renamed into place at the end,
so a failed export (a missing package, an ONNX model that does not match) leaves no half folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import warnings
from pathlib import Path

from mlc.config import UsageError

HELP = "write a checkpoint as a model folder (safetensors, config, classes; optional ONNX)"
ONNX_TOLERANCE = 1e-4  # max abs difference of the ONNX logits from torch's
ONNX_CHECK_BATCH = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, metavar="CK", help="an `mlc train` checkpoint (.pt)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    p.add_argument(
        "--classes",
        metavar="PATH",
        help="class names: an `mlc shard` folder or a class list (classes.json, OpenImages "
        "class-descriptions CSV); default: the dataset folder named in the checkpoint's config",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx (batch norm folded, any batch size), checked against "
        f"onnxruntime to {ONNX_TOLERANCE:g}; needs pip install 'mlc[onnx]'",
    )
    p.add_argument(
        "--no-ema", action="store_true", help="the raw weights, not the EMA ones (if it has them)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    classes: str | Path | None = None,
    onnx: bool = False,
    use_ema: bool = True,
    force: bool = False,
) -> dict:
    """Write the model folder ``out`` from ``checkpoint``; what was written (a summary)."""
    from mlc.extras import require
    from mlc.inference import class_names, load_model
    from mlc.models.folder import ONNX_FILE, is_model_folder, save_model_folder

    out, checkpoint = Path(out), Path(checkpoint)
    if out.exists():
        if is_model_folder(out) and not force:
            raise UsageError(f"{out} holds an earlier export: add --force to replace it")
        if not out.is_dir() or (not is_model_folder(out) and any(out.iterdir())):
            raise UsageError(
                f"{out} exists and is not an `mlc export` folder: choose another --out"
            )
    if checkpoint.is_dir():
        raise UsageError(f"{checkpoint} is a folder: export takes a checkpoint file (.pt)")
    # The optional packages first: a missing one stops the command before any work.
    require("safetensors.torch", "writing a model folder", "safetensors", "export")
    if onnx:
        for module in ("onnxscript", "onnxruntime"):
            require(module, "the ONNX export", module.split(".")[0], "onnx")
    loaded = load_model(checkpoint, use_ema=use_ema)
    names, names_from = loaded.class_names, loaded.info["names_from"]
    if classes is not None:
        names, found = class_names(loaded.class_ids, classes)
        names_from = f"{classes} ({found} of {len(names)} classes named)"
    info = {
        "source": str(checkpoint),
        "weights_from": loaded.info["weights"],
        "samples": loaded.info["samples"],
        "step": loaded.info["step"],
        "names_from": names_from,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if onnx:
            info["onnx"] = export_onnx(loaded.model, loaded.config, tmp / ONNX_FILE)
        save_model_folder(tmp, loaded.model, loaded.config, loaded.class_ids, names, info)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    return {"out": str(out), "classes": len(names), "files": files, **info}


def export_onnx(model, config, path: Path) -> dict:
    """model.onnx of the network with batch norm folded (what mlc runs), input ``images``
    float32 [N, C, H, W] normalized to [-1, 1], output ``logits`` [N, classes], any N; checked
    against onnxruntime on random inputs. What was checked."""
    import torch

    from mlc.extras import require
    from mlc.inference import prepare_for_inference

    require("onnxscript", "the ONNX export", "onnxscript", "onnx")
    ort = require("onnxruntime", "the ONNX export", "onnxruntime", "onnx")
    d = config.data
    model = prepare_for_inference(model, fold=True, device="cpu")
    example = torch.rand(2, d.channels, d.image_size, d.image_size) * 2 - 1
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    program.save(str(path))
    generator = torch.Generator().manual_seed(0)
    shape = (ONNX_CHECK_BATCH, d.channels, d.image_size, d.image_size)
    inputs = torch.rand(shape, generator=generator) * 2 - 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": inputs.numpy()})
    with torch.inference_mode():
        expected = model(inputs).numpy()
    difference = float(abs(got - expected).max())
    if not difference <= ONNX_TOLERANCE:
        raise ValueError(
            f"{path}: onnxruntime's logits differ from torch's by up to {difference:.3g} "
            f"(tolerance {ONNX_TOLERANCE:g}); the folder is not written"
        )
    return {
        "file": path.name,
        "input": "images: float32 [N, C, H, W] in [-1, 1]",
        "output": "logits: float32 [N, classes]",
        "checked": f"onnxruntime {ort.__version__} against torch {torch.__version__}, "
        f"{ONNX_CHECK_BATCH} random inputs",
        "max_abs_difference": difference,
    }


class _quiet_logger:
    """The torch.onnx exporter's warnings about packages it does not need (torchvision) off."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def run(args: argparse.Namespace) -> int:
    summary = export_model(
        args.checkpoint,
        args.out,
        classes=args.classes,
        onnx=args.onnx,
        use_ema=not args.no_ema,
        force=args.force,
    )
    names = summary["names_from"] or "none found: the class ids are the names"
    print(
        f"exported {summary['source']} ({summary['weights_from']} weights, "
        f"{summary['classes']} classes) -> {summary['out']}: {', '.join(summary['files'])}"
    )
    print(f"class names: {names}")
    if "onnx" in summary:
        print(
            f"onnx: max abs difference from torch {summary['onnx']['max_abs_difference']:.3g} "
            f"(tolerance {ONNX_TOLERANCE:g})"
        )
    return 0
