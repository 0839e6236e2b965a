"""The Xception network: the paper's numbers, presets, layouts, head, and weight import."""

import math

import numpy as np
import pytest
import torch

from mlc.models import PRESETS, create_model
from mlc.models.weights import (
    WeightImportError,
    export_keras_layers,
    export_timm_state_dict,
    load_keras_h5,
    load_keras_layers,
    load_timm_state_dict,
    write_keras_h5,
)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model


@pytest.fixture(scope="module")
def xception():
    torch.manual_seed(0)
    return randomize_bn(create_model("xception")).eval()


def test_parameter_count_is_the_papers(xception):
    assert trainable(xception) == 22_855_952  # Table 3 / Keras' trainable count at 1000 classes
    bn_stats = sum(b.numel() for n, b in xception.named_buffers() if "running" in n)
    assert bn_stats == 54_528  # Keras' non-trainable count


def test_layer_shapes_follow_the_papers_figure(xception):
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
        for name, m in [
            ("stem", xception.stem),
            ("entry1", xception.blocks[0]),
            ("entry2", xception.blocks[1]),
            ("entry3", xception.blocks[2]),
            ("middle", xception.blocks[10]),
            ("exit_block", xception.blocks[11]),
            ("exit", xception.exit),
        ]
    ]
    with torch.no_grad():
        logits = xception(torch.randn(1, 3, 299, 299))
    for h in hooks:
        h.remove()
    # Figure 5: 299 -> 149 -> 147 (valid 3x3 convs), then /2 per entry block: 74, 37, 19 x 728,
    # middle flow 19x19x728, exit flow 10x10x1024 then 1536 and 2048.
    assert shapes["stem"] == (1, 64, 147, 147)
    assert shapes["entry1"] == (1, 128, 74, 74)
    assert shapes["entry2"] == (1, 256, 37, 37)
    assert shapes["entry3"] == (1, 728, 19, 19)
    assert shapes["middle"] == (1, 728, 19, 19)
    assert shapes["exit_block"] == (1, 1024, 10, 10)
    assert shapes["exit"] == (1, 2048, 10, 10)
    assert logits.shape == (1, 1000) and logits.dtype == torch.float32
    assert len([m for m in xception.blocks if m.skip is None]) == 8  # middle flow
    convs = [m for m in xception.modules() if isinstance(m, torch.nn.Conv2d)]
    kernels = {tuple(c.kernel_size) for c in convs}
    assert kernels == {(3, 3), (1, 1)} and all(c.bias is None for c in convs)
    # 36 convolutional layers: 2 convs + 34 separable (the 4 residual 1x1 convs are not counted)
    separable = sum(1 for c in convs if c.groups > 1)
    assert 2 + separable == 36


@pytest.mark.parametrize(
    "name, size, features", [("xception-small", 149, 1024), ("xception-tiny", 64, 512)]
)
def test_presets_output(name, size, features):
    model = create_model(name, num_classes=7).eval()
    assert PRESETS[name].input_size == size
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert model.num_features == features


def test_grayscale_input_and_fc_layers():
    model = create_model("xception-tiny", in_channels=1, fc_layers=(64, 32), num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    assert model.head.in_features == 32


def test_channels_last_equals_nchw():
    torch.manual_seed(1)
    a = randomize_bn(create_model("xception-tiny", num_classes=9)).eval()
    b = create_model("xception-tiny", num_classes=9, channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)
    assert a.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_head_bias_is_the_prior_log_odds():
    model = create_model("xception-tiny", num_classes=4, head_prior=0.02)
    assert torch.allclose(model.head.bias, torch.full((4,), math.log(0.02 / 0.98)))
    with torch.no_grad():  # a zero feature vector predicts exactly the prior
        p = torch.sigmoid(model.head(torch.zeros(1, model.head.in_features)))
    assert torch.allclose(p, torch.full((1, 4), 0.02))
    assert torch.all(create_model("xception-tiny", head_prior=None).head.bias == 0)
    with pytest.raises(ValueError, match="head_prior"):
        create_model("xception-tiny", head_prior=1.5)


def test_reset_head_keeps_the_backbone():
    model = randomize_bn(create_model("xception-tiny", num_classes=10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
    model.reset_head(3, prior=0.1)
    assert model.head.out_features == 3 and model.num_classes == 3
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, before[k])
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), features)
        assert model(x).shape == (1, 3)
    assert torch.allclose(model.head.bias, torch.full((3,), math.log(0.1 / 0.9)))


def test_bf16_autocast_and_dropout():
    model = create_model("xception-tiny", num_classes=3, dropout=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and out.dtype == torch.bfloat16
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout in eval


def test_inputs_the_network_cannot_take_are_named():
    """Rank, channels, and a side under 7, which the stem's two unpadded 3x3 convolutions need
    (7 -> 3 -> 1); smaller than Keras' 71, so the presets can run at 64 and below."""
    model = create_model("xception-tiny", in_channels=1, num_classes=2).eval()
    expected = r"the model expects \[B, 1, H, W\] with H, W >= 7$"
    for shape in [(1, 64, 64), (2, 3, 64, 64), (2, 1, 6, 64), (2, 1, 64, 6), (1, 1, 1, 64, 64)]:
        with pytest.raises(ValueError, match=rf"input of shape \({', '.join(map(str, shape))}"):
            model(torch.randn(shape))
        with pytest.raises(ValueError, match=expected):
            model.forward_features(torch.randn(shape))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 7, 7)).shape == (2, 2)
        assert model.forward_features(torch.randn(1, 1, 7, 40)).shape[-2:] == (1, 2)


def test_unknown_preset():
    with pytest.raises(ValueError, match="presets: xception, xception-small, xception-tiny"):
        create_model("xception-huge")


def test_keras_h5_round_trip_gives_identical_logits(xception, tmp_path):
    path = tmp_path / "xception.h5"
    write_keras_h5(export_keras_layers(xception), path)
    imported = create_model("xception").eval()
    load_keras_h5(imported, path)
    x = torch.randn(1, 3, 96, 96)  # any size works; 299 only costs time here
    with torch.no_grad():
        assert torch.equal(imported(x), xception(x))


def test_timm_round_trip_gives_identical_logits(xception):
    state = export_timm_state_dict(xception)
    assert "block1.rep.0.conv1.weight" in state and "block12.skipbn.running_var" in state
    assert "conv4.pointwise.weight" in state and state["fc.weight"].shape == (1000, 2048)
    imported = create_model("xception").eval()
    load_timm_state_dict(imported, state)
    x = torch.randn(1, 3, 96, 96)  # any size works; 299 only costs time here
    with torch.no_grad():
        assert torch.equal(imported(x), xception(x))


def test_drop_head_keeps_a_new_head(xception):
    state = export_timm_state_dict(xception)
    target = create_model("xception", num_classes=17)
    load_timm_state_dict(target, state, drop_head=True)
    assert torch.equal(target.stem[0].weight, xception.stem[0].weight)
    assert target.head.out_features == 17
    layers = export_keras_layers(xception)
    load_keras_layers(create_model("xception", num_classes=17), layers, drop_head=True)


def test_mapping_errors_name_the_tensors(xception):
    state = export_timm_state_dict(xception)
    del state["bn3.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(WeightImportError) as e:
        load_timm_state_dict(create_model("xception"), state)
    message = str(e.value)
    assert "missing bn3.running_mean" in message and "unexpected extra.weight" in message
    assert "conv1.weight -> stem.0.weight: shape (32, 3, 5, 5)" in message
    layers = export_keras_layers(xception)
    del layers["block7_sepconv2"]
    layers["mystery"] = [torch.zeros(1).numpy()]
    with pytest.raises(
        WeightImportError, match="missing layer block7_sepconv2.*unexpected layer mystery"
    ):
        load_keras_layers(create_model("xception"), layers)
    wrong_head = (
        r"predictions -> head.weight: kernel of shape \(2048, 1000\), the model needs \(2048, 5\)"
    )
    with pytest.raises(WeightImportError, match=wrong_head):
        load_keras_layers(create_model("xception", num_classes=5), export_keras_layers(xception))


def test_keras_residual_names_of_older_keras_versions(xception):
    # Keras 2.0 named the residual layers conv2d_1..conv2d_4; they are matched by order.
    layers = export_keras_layers(xception)
    for base in ("conv2d", "batch_normalization"):
        old = [layers.pop(base)] + [layers.pop(f"{base}_{i}") for i in (1, 2, 3)]
        for i, arrays in enumerate(old, start=1):
            layers[f"{base}_{i}"] = arrays
    imported = create_model("xception").eval()
    load_keras_layers(imported, layers)
    x = torch.randn(1, 3, 96, 96)  # any size works; 299 only costs time here
    with torch.no_grad():
        assert torch.equal(imported(x), xception(x))


def test_folded_batch_norm_gives_the_same_outputs():
    from mlc.models.fuse import fold_batch_norm

    model = randomize_bn(create_model("xception-tiny", num_classes=6)).eval()
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def tf_same_max_pool(x: np.ndarray) -> np.ndarray:
    """3x3 stride-2 max pooling as TensorFlow's padding="SAME" defines it, by loops: output
    size ceil(n / 2), total padding max((out - 1) * 2 + 3 - n, 0), the smaller half first;
    padded positions never win."""
    *lead, h, w = x.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    top = max((out_h - 1) * 2 + 3 - h, 0) // 2
    left = max((out_w - 1) * 2 + 3 - w, 0) // 2
    out = np.empty((*lead, out_h, out_w), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * 2 - top, j * 2 - left
            window = x[..., max(r0, 0) : r0 + 3, max(c0, 0) : c0 + 3]
            out[..., i, j] = window.max(axis=(-2, -1))
    return out


def test_same_pad_max_pool_is_tensorflows_same_pooling():
    """Every height and width from 1 to 11 (odd and even, smaller than the window too), in
    channels_last memory as the model runs; the gradient goes to each window's maximum (each
    value distinct, so the maximum is unique)."""
    from mlc.models.xception import SamePadMaxPool

    pool = SamePadMaxPool()
    rng = np.random.default_rng(0)
    for h in range(1, 12):
        for w in range(1, 12):
            values = rng.permutation(2 * 3 * h * w).reshape(2, 3, h, w).astype(np.float32)
            x = torch.from_numpy(values).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = pool(x)
            assert np.array_equal(y.detach().numpy(), tf_same_max_pool(values)), (h, w)
            y.sum().backward()
            winners = np.zeros_like(values)
            flat = values.reshape(6, h * w)
            for k, row in enumerate(tf_same_max_pool(values).reshape(6, -1)):
                for v in row:
                    winners.reshape(6, h * w)[k, np.flatnonzero(flat[k] == v)] += 1
            assert np.array_equal(x.grad.numpy(), winners), (h, w)
