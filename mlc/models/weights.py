"""ImageNet weights for the `xception` preset: from Keras' HDF5 file or a timm state dict.

Keras: ``xception_weights_tf_dim_ordering_tf_kernels.h5`` (what ``keras.applications.Xception
(weights="imagenet")`` downloads; docs/models.md says where to get it). Reading it needs h5py
(``pip install h5py``). timm: the state dict of ``timm.create_model("legacy_xception",
pretrained=True)``, saved with ``torch.save(model.state_dict(), path)``.

Both directions exist for both formats (``export_*``), so a round trip can be tested without the
real files. Every mismatch is reported by tensor name: missing, unexpected, wrong shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlc.models.xception import SeparableConv, Xception

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, mean, var


class WeightImportError(ValueError):
    """Weights that do not fit the model; the message names every offending tensor."""


# ---------------------------------------------------------------- Keras


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


def _to_keras(module: nn.Module) -> list[np.ndarray]:
    def np_(t):
        return t.detach().cpu().float().numpy()

    if isinstance(module, SeparableConv):  # (3,3,in,1) and (1,1,in,out)
        return [
            np_(module.depthwise.weight.permute(2, 3, 0, 1)),
            np_(module.pointwise.weight.permute(2, 3, 1, 0)),
        ]
    if isinstance(module, nn.Conv2d):  # (kh, kw, in, out)
        return [np_(module.weight.permute(2, 3, 1, 0))]
    if isinstance(module, nn.BatchNorm2d):
        return [np_(getattr(module, f)) for f in BN_FIELDS]
    return [np_(module.weight.T), np_(module.bias)]  # Dense: (in, out), (out,)


def _from_keras(module: nn.Module, arrays: list[np.ndarray]) -> list[tuple[str, torch.Tensor]]:
    t = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
    if isinstance(module, SeparableConv):
        return [
            ("depthwise.weight", t[0].permute(2, 3, 0, 1)),
            ("pointwise.weight", t[1].permute(3, 2, 0, 1)),
        ]
    if isinstance(module, nn.Conv2d):
        return [("weight", t[0].permute(3, 2, 0, 1))]
    if isinstance(module, nn.BatchNorm2d):
        return list(zip(BN_FIELDS, t, strict=False))
    return [("weight", t[0].T), ("bias", t[1])]


def export_keras_layers(model: Xception) -> dict[str, list[np.ndarray]]:
    """Weights in Keras' layout, residual layers named "conv2d", "conv2d_1", ... (Keras 2.x+)."""
    out = {}
    for name, module in _keras_layers(model):
        if "#" in name:
            base, index = name.split("#")
            name = base if index == "0" else f"{base}_{index}"
        out[name] = _to_keras(module)
    return out


def _residual_order(name: str) -> int:
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def load_keras_layers(
    model: Xception, layers: dict[str, list[np.ndarray]], drop_head: bool = False
) -> None:
    """Load Keras-layout weights (layer name -> arrays in Keras order) into ``model``."""
    residual = {
        base: sorted((n for n in layers if re.fullmatch(rf"{base}(_\d+)?", n)), key=_residual_order)
        for base in ("conv2d", "batch_normalization")
    }
    state, problems, used = {}, [], set()
    prefix = {id(m): n for n, m in model.named_modules()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, module in _keras_layers(model):
        if name == "predictions" and drop_head:
            used.add(name)
            continue
        if "#" in name:
            base, index = name.split("#")
            found = residual[base]
            name = found[int(index)] if int(index) < len(found) else f"{base} #{index}"
        if name not in layers:
            problems.append(f"missing layer {name}")
            continue
        used.add(name)
        for field, tensor in _from_keras(module, layers[name]):
            key = f"{prefix[id(module)]}.{field}"
            expected = shapes[key]
            if tensor.shape != expected:
                problems.append(
                    f"{name} -> {key}: shape {tuple(tensor.shape)}, model has {tuple(expected)}"
                )
            state[key] = tensor
    extra = sorted(n for n in layers if n not in used and layers[n])
    problems += [f"unexpected layer {n}" for n in extra]
    if problems:
        raise WeightImportError("Keras weights do not fit: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def read_keras_h5(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays of a Keras HDF5 weights file (model.save_weights format)."""
    try:
        import h5py
    except ImportError:
        raise WeightImportError("reading Keras .h5 weights needs h5py: pip install h5py") from None
    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        names = [n.decode() if isinstance(n, bytes) else n for n in root.attrs["layer_names"]]
        out = {}
        for name in names:
            group = root[name]
            weights = [
                w.decode() if isinstance(w, bytes) else w
                for w in group.attrs.get("weight_names", [])
            ]
            out[name] = [np.asarray(group[w]) for w in weights]
    return out


def write_keras_h5(layers: dict[str, list[np.ndarray]], path: str | Path) -> None:
    """Write Keras' HDF5 weights layout (what read_keras_h5 and Keras 2's load_weights read)."""
    import h5py

    kinds = {
        "SeparableConv": ["depthwise_kernel", "pointwise_kernel"],
        "Conv": ["kernel"],
        "BN": ["gamma", "beta", "moving_mean", "moving_variance"],
        "Dense": ["kernel", "bias"],
    }
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for name, arrays in layers.items():
            kind = (
                "BN"
                if len(arrays) == 4
                else "SeparableConv"
                if "sepconv" in name and not name.endswith("_bn")
                else "Dense"
                if name == "predictions"
                else "Conv"
            )
            names = [f"{name}/{w}:0" for w in kinds[kind]]
            group = f.create_group(name)
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays, strict=True):
                group.create_dataset(n, data=a)


def load_keras_h5(model: Xception, path: str | Path, drop_head: bool = False) -> None:
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
    """Load a timm ``legacy_xception`` state dict into ``model`` (names mapped, shapes checked)."""
    ours = model.state_dict()
    wanted = {timm_name(k): k for k in ours}
    problems, loaded = [], {}
    for tname, key in wanted.items():
        if drop_head and key.startswith("head."):
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
    if problems:
        raise WeightImportError("timm weights do not fit: " + "; ".join(problems))
    model.load_state_dict(loaded, strict=False)


def load_timm_file(model: Xception, path: str | Path, drop_head: bool = False) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_timm_state_dict(model, state.get("state_dict", state), drop_head)


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
