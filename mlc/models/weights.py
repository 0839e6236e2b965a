"""ImageNet weights for the `xception` preset: from Keras' HDF5 file or a timm state dict.

Keras: ``xception_weights_tf_dim_ordering_tf_kernels.h5`` (what ``keras.applications.Xception
(weights="imagenet")`` downloads; docs/models.md says where to get it). Reading it needs h5py
(``pip install 'mlc[weights]'``). timm: the state dict of ``timm.create_model("legacy_xception",
pretrained=True)``, saved with ``torch.save(model.state_dict(), path)``.

Both directions exist for both formats (``export_*``), so a round trip can be tested without the
real files. Loading is all or nothing: every tensor of the model is filled exactly once, with the
right shape, or nothing is loaded and a WeightImportError names every missing, unexpected or
misfit layer or tensor. A file that cannot be read (missing, truncated, not HDF5, Keras 3's
.weights.h5 layout) is a WeightImportError that says what it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlc.extras import require
from mlc.models.xception import SeparableConv, Xception

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
MAX_PROBLEMS = 20  # listed in an error message; the rest are counted


class WeightImportError(ValueError):
    """Weights that do not fit the model, or a file that cannot be read as weights; the message
    names every offending layer or tensor, or says what the file is."""


def _fail(what: str, problems: list[str]) -> None:
    """Raise a WeightImportError listing ``problems`` (the first MAX_PROBLEMS, then a count:
    another network's weights give hundreds), if there are any."""
    if problems:
        more = len(problems) - MAX_PROBLEMS
        tail = f"; and {more} more" if more > 0 else ""
        raise WeightImportError(f"{what} do not fit: " + "; ".join(problems[:MAX_PROBLEMS]) + tail)


def _new_layer(key: str, drop_head: bool) -> bool:
    """Whether the model's tensor ``key`` has no counterpart in the pretrained weights and keeps
    its initial value: batch norm's step counter (unused with a fixed momentum) and, with
    ``drop_head``, the head and the FC layers of ``fc_layers`` (new layers for new labels)."""
    return key.endswith("num_batches_tracked") or (drop_head and key.startswith(("head.", "fc.")))


# ---------------------------------------------------------------- Keras

# Per kind of module: Keras' layer class, and its arrays in Keras' order with the tensor each
# one fills (Keras' weight name, the module's tensor name).
KERAS_LAYERS = {
    SeparableConv: (
        "SeparableConv2D",
        [("depthwise_kernel", "depthwise.weight"), ("pointwise_kernel", "pointwise.weight")],
    ),
    nn.Conv2d: ("Conv2D", [("kernel", "weight")]),
    nn.BatchNorm2d: (
        "BatchNormalization",
        [
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        ],
    ),
    nn.Linear: ("Dense", [("kernel", "weight"), ("bias", "bias")]),
}


def _keras_kind(module: nn.Module) -> tuple[str, list[tuple[str, str]]]:
    return next(kind for cls, kind in KERAS_LAYERS.items() if isinstance(module, cls))


def _keras_layers(model: Xception) -> list[tuple[str, nn.Module]]:
    """(Keras layer name, module) in the Keras model's order. The four residual convolutions
    are named by position ("conv2d#0".."#3"): their suffixes differ between Keras versions."""
    layers = [
        ("block1_conv1", model.stem[0]),
        ("block1_conv1_bn", model.stem[1]),
        ("block1_conv2", model.stem[3]),
        ("block1_conv2_bn", model.stem[4]),
    ]
    residual = 0
    for b, block in enumerate(model.blocks, start=2):
        convs = [m for m in block.layers if isinstance(m, SeparableConv)]
        norms = [m for m in block.layers if isinstance(m, nn.BatchNorm2d)]
        for i, (conv, norm) in enumerate(zip(convs, norms, strict=True), start=1):
            layers += [(f"block{b}_sepconv{i}", conv), (f"block{b}_sepconv{i}_bn", norm)]
        if block.skip is not None:
            layers += [
                (f"conv2d#{residual}", block.skip[0]),
                (f"batch_normalization#{residual}", block.skip[1]),
            ]
            residual += 1
    b = len(model.blocks) + 2
    layers += [
        (f"block{b}_sepconv1", model.exit[0]),
        (f"block{b}_sepconv1_bn", model.exit[1]),
        (f"block{b}_sepconv2", model.exit[3]),
        (f"block{b}_sepconv2_bn", model.exit[4]),
        ("predictions", model.head),
    ]
    return layers


def _keras_views(module: nn.Module) -> list[torch.Tensor]:
    """The module's tensors in Keras' layout and order (KERAS_LAYERS). They are views of the
    module's own storage: export reads them, import writes Keras' arrays into them, so the two
    directions cannot disagree on a transposition."""
    if isinstance(module, SeparableConv):  # (3, 3, in, 1) and (1, 1, in, out)
        return [
            module.depthwise.weight.permute(2, 3, 0, 1),
            module.pointwise.weight.permute(2, 3, 1, 0),
        ]
    if isinstance(module, nn.Conv2d):  # (kh, kw, in, out)
        return [module.weight.permute(2, 3, 1, 0)]
    if isinstance(module, nn.BatchNorm2d):
        return [module.weight, module.bias, module.running_mean, module.running_var]
    return [module.weight.T, module.bias]  # Dense: (in, out), (out,)


def export_keras_layers(model: Xception) -> dict[str, list[np.ndarray]]:
    """Weights in Keras' layout, residual layers named "conv2d", "conv2d_1", ... (Keras 2.x+)."""
    out = {}
    for name, module in _keras_layers(model):
        if "#" in name:
            base, index = name.split("#")
            name = base if index == "0" else f"{base}_{index}"
        out[name] = [t.detach().cpu().float().numpy().copy() for t in _keras_views(module)]
    return out


def _residual_order(name: str) -> int:
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def load_keras_layers(
    model: Xception, layers: dict[str, list[np.ndarray]], drop_head: bool = False
) -> None:
    """Load Keras-layout weights (layer name -> arrays in Keras order) into ``model``.

    All or nothing: every tensor of the model is filled exactly once, from its Keras layer,
    which must have the number of arrays of its kind, floating point, with the model's shapes;
    every layer of the file that has arrays must be used. Otherwise nothing is loaded and a
    WeightImportError names each offending layer. With ``drop_head`` the head (and the FC
    layers of ``fc_layers``) keep their initial values.
    """
    residual = {
        base: sorted((n for n in layers if re.fullmatch(rf"{base}(_\d+)?", n)), key=_residual_order)
        for base in ("conv2d", "batch_normalization")
    }
    prefix = {id(m): n for n, m in model.named_modules()}
    writes, problems, used, seen, filled = [], [], set(), set(), {}
    for name, module in _keras_layers(model):
        if name == "predictions" and drop_head:
            used.add(name)
            continue
        if "#" in name:
            base, index = name.split("#")
            found = residual[base]
            name = found[int(index)] if int(index) < len(found) else f"{base} #{index}"
        kind, fields = _keras_kind(module)
        keys = [f"{prefix[id(module)]}.{tensor}" for _, tensor in fields]
        seen.update(keys)
        if name not in layers:
            problems.append(f"missing layer {name}")
            continue
        used.add(name)
        arrays = [np.asarray(a) for a in layers[name]]
        if len(arrays) != len(fields):
            names = ", ".join(weight for weight, _ in fields)
            problems.append(
                f"{name}: {len(arrays)} arrays, a {kind} layer has {len(fields)} ({names})"
            )
            continue
        for (weight, _), key, array, view in zip(
            fields, keys, arrays, _keras_views(module), strict=True
        ):
            if array.dtype.kind != "f":
                problems.append(f"{name} -> {key}: {weight} is {array.dtype}, not floating point")
            elif array.shape != tuple(view.shape):
                problems.append(
                    f"{name} -> {key}: {weight} of shape {array.shape}, "
                    f"the model needs {tuple(view.shape)}"
                )
            elif key in filled:
                problems.append(f"{key} filled twice, by {filled[key]} and {name}")
            else:
                filled[key] = name
                writes.append((view, array))
    if not used - {"predictions"}:
        theirs = [n for n in layers if len(layers[n])]
        listed = ", ".join(theirs[:8]) + (", ..." if len(theirs) > 8 else "")
        raise WeightImportError(
            "Keras weights do not fit: none of Xception's layers (block1_conv1, "
            f"block1_conv1_bn, ...) is among their {len(theirs)} layers with weights"
            + (f" ({listed}): the weights of another network?" if theirs else "")
        )
    problems += [f"unexpected layer {n}" for n in layers if n not in used and len(layers[n])]
    problems += [
        f"{key}: no Keras layer fills it"
        + (" (FC layers are new: load with drop_head)" if key.startswith("fc.") else "")
        for key in model.state_dict()
        if key not in seen and not _new_layer(key, drop_head)
    ]
    _fail("Keras weights", problems)
    with torch.no_grad():
        for view, array in writes:
            view.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


def _h5_names(obj, attr: str) -> list[str]:
    """A list of names stored as an HDF5 attribute; Keras splits a long one into attr0, attr1..."""
    chunks = [obj.attrs[attr]] if attr in obj.attrs else []
    while f"{attr}{len(chunks)}" in obj.attrs:
        chunks.append(obj.attrs[f"{attr}{len(chunks)}"])
    return [n.decode() if isinstance(n, bytes) else str(n) for chunk in chunks for n in chunk]


def _read_legacy_layout(f, path: Path) -> dict[str, list[np.ndarray]]:
    """The layers of an open HDF5 file in Keras' legacy layout: ``layer_names`` on the root (a
    weights file) or on ``model_weights`` (a whole model saved as .h5), a group per layer whose
    ``weight_names`` list its arrays."""
    root = f if "layer_names" in f.attrs or "model_weights" not in f else f["model_weights"]
    if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
        if "layers" in f or "vars" in f:
            raise WeightImportError(
                f"{path}: a Keras 3 weights file (.weights.h5: arrays numbered under "
                "layers/<name>/vars, without Keras' weight names), not the legacy Keras HDF5 "
                "layout read here. In Keras 3, build the model, model.load_weights(this file), "
                "then model.save('NAME.h5'), which writes the legacy layout, and load that; or "
                "use Keras' own xception_weights_tf_dim_ordering_tf_kernels.h5 (legacy layout)"
            )
        raise WeightImportError(
            f"{path}: an HDF5 file without Keras' layer_names attribute, not Keras weights"
        )
    out = {}
    for name in _h5_names(root, "layer_names"):
        if name not in root:
            raise WeightImportError(f"{path}: layer {name} is listed but has no group (damaged?)")
        group = root[name]
        arrays = []
        for weight in _h5_names(group, "weight_names"):
            if weight not in group:
                raise WeightImportError(
                    f"{path}: layer {name}: array {weight} is listed but missing (damaged?)"
                )
            arrays.append(np.asarray(group[weight]))
        out[name] = arrays
    return out


def _unreadable(path: Path, error: Exception) -> str:
    """What a file h5py cannot read is, judged by its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as e:
        return f"{path}: cannot read: {e}"
    if head == HDF5_SIGNATURE:
        return f"{path}: a truncated or damaged HDF5 file ({error}); download or copy it again"
    if head.startswith(ZIP_SIGNATURE):
        return (
            f"{path}: a zip archive, not HDF5: a Keras 3 .keras model (or a PyTorch file)? "
            "In Keras 3, keras.saving.load_model(this file).save('NAME.h5') writes the legacy "
            "HDF5 layout read here"
        )
    return f"{path}: not an HDF5 file (no HDF5 signature at its start; Keras weights are HDF5)"


def read_keras_h5(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays of a Keras HDF5 weights file: the legacy layout, written by
    Keras 2's save_weights and by model.save("NAME.h5"), the layout of Keras' own application
    weights. A file that is missing, not HDF5, truncated or damaged, or in Keras 3's
    .weights.h5 layout is a WeightImportError that says which."""
    h5py = require("h5py", "reading Keras .h5 weights", "h5py", "weights")
    path = Path(path)
    if not path.is_file():
        raise WeightImportError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            return _read_legacy_layout(f, path)
    except (OSError, KeyError) as e:  # h5py's errors on a file it cannot parse
        raise WeightImportError(_unreadable(path, e)) from e


def _keras_weight_names(name: str, arrays: list[np.ndarray]) -> list[str]:
    """Keras' names for a layer's arrays, by their number and the layer's name; generic names
    for a number no Keras layer of the network has."""
    kind = (
        "BatchNormalization"
        if len(arrays) == 4
        else "SeparableConv2D"
        if "sepconv" in name and not name.endswith("_bn")
        else "Dense"
        if name == "predictions"
        else "Conv2D"
    )
    fields = next(f for k, f in KERAS_LAYERS.values() if k == kind)
    weights = [w for w, _ in fields] if len(fields) == len(arrays) else range(len(arrays))
    return [f"{name}/{w}:0" for w in weights]


def write_keras_h5(layers: dict[str, list[np.ndarray]], path: str | Path) -> None:
    """Write Keras' legacy HDF5 weights layout (what read_keras_h5 and Keras' load_weights
    read); a layer with no arrays is listed with no weight names, as Keras lists activations."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for name, arrays in layers.items():
            names = _keras_weight_names(name, arrays)
            group = f.create_group(name)
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays, strict=True):
                group.create_dataset(n, data=a)


def load_keras_h5(model: Xception, path: str | Path, drop_head: bool = False) -> None:
    """Load a Keras HDF5 weights file into ``model`` (read_keras_h5, then load_keras_layers)."""
    load_keras_layers(model, read_keras_h5(path), drop_head)


# ---------------------------------------------------------------- timm legacy_xception

# mlc name <-> timm name. timm's blocks hold [ReLU, SeparableConv2d(conv1, pointwise), BN, ...]
# at the same indices as mlc's Block.layers.
_RENAMES = [
    (r"stem\.0\.", "conv1."),
    (r"stem\.1\.", "bn1."),
    (r"stem\.3\.", "conv2."),
    (r"stem\.4\.", "bn2."),
    (r"exit\.0\.depthwise\.", "conv3.conv1."),
    (r"exit\.0\.pointwise\.", "conv3.pointwise."),
    (r"exit\.1\.", "bn3."),
    (r"exit\.3\.depthwise\.", "conv4.conv1."),
    (r"exit\.3\.pointwise\.", "conv4.pointwise."),
    (r"exit\.4\.", "bn4."),
    (r"head\.", "fc."),
]


def timm_name(name: str) -> str:
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        block, rest = f"block{int(m.group(1)) + 1}", m.group(2)
        rest = re.sub(r"^layers\.(\d+)\.depthwise\.", r"rep.\1.conv1.", rest)
        rest = re.sub(r"^layers\.", "rep.", rest)
        rest = re.sub(r"^skip\.0\.", "skip.", rest)
        rest = re.sub(r"^skip\.1\.", "skipbn.", rest)
        return f"{block}.{rest}"
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return name


def export_timm_state_dict(model: Xception) -> dict[str, torch.Tensor]:
    return {timm_name(k): v.detach().clone() for k, v in model.state_dict().items()}


def load_timm_state_dict(
    model: Xception, state: dict[str, torch.Tensor], drop_head: bool = False
) -> None:
    """Load a timm ``legacy_xception`` state dict into ``model`` (names mapped, shapes checked):
    all of the model's tensors or nothing, as load_keras_layers."""
    ours = model.state_dict()
    wanted = {timm_name(k): k for k in ours}
    problems, loaded = [], {}
    for tname, key in wanted.items():
        if drop_head and key.startswith(("head.", "fc.")):  # new layers (_new_layer)
            continue
        if tname not in state:
            problems.append(f"missing {tname} (for {key})")
        elif state[tname].shape != ours[key].shape:
            problems.append(
                f"{tname} -> {key}: shape {tuple(state[tname].shape)}, "
                f"model has {tuple(ours[key].shape)}"
            )
        else:
            loaded[key] = state[tname]
    extra = sorted(k for k in state if k not in wanted and not (drop_head and k.startswith("fc.")))
    problems += [f"unexpected {k}" for k in extra]
    _fail("timm weights", problems)
    model.load_state_dict(loaded, strict=False)


def load_timm_file(model: Xception, path: str | Path, drop_head: bool = False) -> None:
    """Load a timm state dict saved with torch.save (read with ``weights_only=True``: a file
    cannot run code); a missing or unreadable file is a WeightImportError that says so."""
    path = Path(path)
    if not path.is_file():
        raise WeightImportError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types on damaged files)
        raise WeightImportError(
            f"{path}: cannot load as a PyTorch file: {type(e).__name__}: {e}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightImportError(f"{path}: not a state dict (names -> tensors)")
    load_timm_state_dict(model, state, drop_head)


__all__ = [
    "WeightImportError",
    "export_keras_layers",
    "export_timm_state_dict",
    "load_keras_h5",
    "load_keras_layers",
    "load_timm_file",
    "load_timm_state_dict",
    "read_keras_h5",
    "timm_name",
    "write_keras_h5",
]


def load_pretrained(model: Xception, spec: str, drop_head: bool = True) -> None:
    """``model.init`` of a config: "keras:PATH.h5" or "timm:PATH.pth"."""
    kind, _, path = spec.partition(":")
    if kind == "keras":
        load_keras_h5(model, path, drop_head=drop_head)
    elif kind == "timm":
        load_timm_file(model, path, drop_head=drop_head)
    else:
        raise WeightImportError(f"model.init must be keras:PATH or timm:PATH, got {spec!r}")
