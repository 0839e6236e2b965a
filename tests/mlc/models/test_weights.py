"""Weight import refuses what does not fit: every tensor is filled exactly once with its shape,
or nothing is loaded and the error names the layer; unreadable files are named errors."""

import zipfile

import h5py
import numpy as np
import pytest
import torch

from mlc.models import create_model
from mlc.models.weights import (
    WeightImportError,
    export_keras_layers,
    export_timm_state_dict,
    load_keras_h5,
    load_keras_layers,
    load_timm_file,
    load_timm_state_dict,
    read_keras_h5,
    write_keras_h5,
)


def tiny(**overrides):
    return create_model("xception-tiny", num_classes=10, **overrides)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return tiny()


def _no_arrays(layers):
    layers["block3_sepconv1_bn"] = []  # kept its initial values


def _bn_without_statistics(layers):
    gamma, beta, mean, var = layers["block1_conv1_bn"]
    layers["block1_conv1_bn"] = [mean, var]  # were loaded as gamma and beta


def _conv_with_bias(layers):
    (kernel,) = layers["block1_conv2"]
    layers["block1_conv2"] = [kernel, np.zeros(kernel.shape[-1], np.float32)]  # bias ignored


def _separable_with_bias(layers):
    depthwise, pointwise = layers["block4_sepconv2"]
    layers["block4_sepconv2"] = [depthwise, pointwise, np.zeros(pointwise.shape[-1], np.float32)]


def _integer_kernel(layers):
    layers["block1_conv1"][0] = layers["block1_conv1"][0].astype(np.int64)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_no_arrays, r"block3_sepconv1_bn: 0 arrays, a BatchNormalization layer has 4 \(gamma, "),
        (_bn_without_statistics, "block1_conv1_bn: 2 arrays, a BatchNormalization layer has 4"),
        (_conv_with_bias, r"block1_conv2: 2 arrays, a Conv2D layer has 1 \(kernel\)"),
        (_separable_with_bias, "block4_sepconv2: 3 arrays, a SeparableConv2D layer has 2"),
        (_integer_kernel, "block1_conv1 -> stem.0.weight: kernel is int64, not floating point"),
    ],
)
def test_keras_layer_with_other_arrays_is_refused_and_nothing_loads(source, damage, message):
    layers = export_keras_layers(source)
    damage(layers)
    target = tiny()
    before = snapshot(target)
    with pytest.raises(WeightImportError, match=message):
        load_keras_layers(target, layers)
    assert unchanged(target, before)


def test_keras_file_of_another_network_is_named(tmp_path):
    # A Keras MobileNet: other layer names; its "predictions" is a softmax without arrays.
    rng = np.random.default_rng(0)
    layers = {
        "conv1": [rng.normal(size=(3, 3, 3, 32)).astype(np.float32)],
        "conv1_bn": [np.ones(32, np.float32)] * 4,
        "conv_dw_1": [rng.normal(size=(3, 3, 32, 1)).astype(np.float32)],
        "conv_dw_1_bn": [np.ones(32, np.float32)] * 4,
        "conv_preds": [rng.normal(size=(1, 1, 32, 1000)).astype(np.float32)],
        "predictions": [],
    }
    expected = (
        "none of Xception's layers .* is among their 5 layers with weights "
        r"\(conv1, conv1_bn, conv_dw_1, conv_dw_1_bn, conv_preds\)"
    )
    with pytest.raises(WeightImportError, match=expected):
        load_keras_layers(tiny(), layers)
    path = tmp_path / "mobilenet.h5"
    write_keras_h5(layers, path)
    assert read_keras_h5(path)["predictions"] == []
    for drop_head in (False, True):
        with pytest.raises(WeightImportError, match=expected):
            load_keras_h5(tiny(), path, drop_head=drop_head)


def test_fc_layers_are_new_only_with_drop_head(source):
    # fc_layers=(512,) keeps the head's input width, so the head fits and only the FC layer has
    # no counterpart: an error without drop_head, left as initialized with it.
    target = tiny(fc_layers=(512,))
    with pytest.raises(WeightImportError, match=r"fc\.0\.weight: no Keras layer fills it"):
        load_keras_layers(target, export_keras_layers(source))
    load_keras_layers(target, export_keras_layers(source), drop_head=True)
    load_timm_state_dict(target, export_timm_state_dict(source), drop_head=True)
    assert torch.equal(target.stem[0].weight, source.stem[0].weight)


def test_many_problems_are_listed_then_counted(source):
    layers = {f"{name}_renamed": arrays for name, arrays in export_keras_layers(source).items()}
    layers["block1_conv1"] = export_keras_layers(source)["block1_conv1"]
    with pytest.raises(WeightImportError, match=r"; and \d+ more$") as e:
        load_keras_layers(tiny(), layers)
    assert str(e.value).count(";") == 20


@pytest.fixture()
def keras_file(source, tmp_path):
    path = tmp_path / "xception.h5"
    write_keras_h5(export_keras_layers(source), path)
    return path


def test_unreadable_keras_files_are_named(keras_file, tmp_path):
    data = keras_file.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightImportError, match="truncated.h5: a truncated or damaged HDF5 file"):
        load_keras_h5(tiny(), truncated)
    text = tmp_path / "text.h5"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightImportError, match="text.h5: not an HDF5 file"):
        load_keras_h5(tiny(), text)
    archive = tmp_path / "xception.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(WeightImportError, match=r"a zip archive, not HDF5: a Keras 3 \.keras"):
        load_keras_h5(tiny(), archive)
    with pytest.raises(WeightImportError, match="missing.h5: no such file"):
        load_keras_h5(tiny(), tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightImportError, match="without Keras' layer_names attribute"):
        load_keras_h5(tiny(), other)
    with h5py.File(keras_file, "a") as f:
        del f["block2_sepconv1"]
    with pytest.raises(WeightImportError, match="layer block2_sepconv1 is listed but has no group"):
        load_keras_h5(tiny(), keras_file)


def test_keras3_weights_file_is_recognized(source, tmp_path):
    # Keras 3's model.save_weights("x.weights.h5"): arrays numbered under layers/<name>/vars.
    path = tmp_path / "xception.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("vars")
        for name, arrays in export_keras_layers(source).items():
            group = f.create_group(f"layers/{name}/vars")
            for i, array in enumerate(arrays):
                group.create_dataset(str(i), data=array)
    with pytest.raises(WeightImportError) as e:
        load_keras_h5(tiny(), path)
    message = str(e.value)
    assert "a Keras 3 weights file (.weights.h5" in message
    assert "model.load_weights(this file), then model.save('NAME.h5')" in message


def test_whole_model_file_and_chunked_layer_names(source, keras_file):
    # model.save("NAME.h5") puts the layers under model_weights; Keras splits a long
    # layer_names attribute into layer_names0, layer_names1, ...
    with h5py.File(keras_file, "a") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        del f.attrs["layer_names"]
        group = f.create_group("model_weights")
        group.attrs["layer_names0"], group.attrs["layer_names1"] = names[:10], names[10:]
        for name in names:
            f.move(name, f"model_weights/{name}")
    target = tiny().eval()
    load_keras_h5(target, keras_file)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_unreadable_timm_files_are_named(source, tmp_path):
    with pytest.raises(WeightImportError, match="missing.pth: no such file"):
        load_timm_file(tiny(), tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(WeightImportError, match="garbage.pth: cannot load as a PyTorch file"):
        load_timm_file(tiny(), garbage)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WeightImportError, match=r"list.pth: not a state dict"):
        load_timm_file(tiny(), listing)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": export_timm_state_dict(source)}, good)
    target = tiny()
    load_timm_file(target, good)
    assert torch.equal(target.blocks[0].skip[1].running_var, source.blocks[0].skip[1].running_var)
