"""If Keras 3 is installed (torch backend), its Xception with random weights, imported into mlc,
gives the same feature maps and logits (1e-4). Skipped otherwise; CI does not install Keras.

Feature maps, not only logits: with random weights the pooled features hardly depend on the
input, so logits alone would not notice, say, a max-pool window shifted by one pixel."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from mlc.models import create_model  # noqa: E402
from mlc.models.weights import load_keras_layers  # noqa: E402


@pytest.mark.slow
def test_keras_xception_logits_match():
    if keras.backend.backend() != "torch":
        pytest.skip("needs Keras' torch backend")
    keras.utils.set_random_seed(0)
    reference = keras.applications.Xception(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    layers = {}
    for layer in reference.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):  # non-trivial statistics
            gamma, beta, mean, var = weights
            weights = [
                gamma * rng.uniform(0.5, 1.5, gamma.shape),
                beta + rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.1, mean.shape),
                rng.uniform(0.5, 2, var.shape),
            ]
            layer.set_weights([w.astype(np.float32) for w in weights])
        if weights:
            layers[layer.name] = layer.get_weights()
    model = create_model("xception").eval()
    load_keras_layers(model, layers)
    x = rng.normal(size=(2, 299, 299, 3)).astype(np.float32)
    names = ["add_1", "block14_sepconv2_act", reference.layers[-1].name]  # after block 3 (even
    # input to its pool), the last feature map, the logits
    probe = keras.Model(reference.input, [reference.get_layer(n).output for n in names])
    expected = [np.asarray(t.detach().cpu()) for t in probe(x, training=False)]
    with torch.no_grad():
        image = torch.from_numpy(x).permute(0, 3, 1, 2)
        block3 = model.blocks[:2](model.stem(image)).permute(0, 2, 3, 1).numpy()
        features = model.forward_features(image)
        logits = model.forward_head(features).numpy()
    features = features.permute(0, 2, 3, 1).numpy()
    for got, want in zip([block3, features, logits], expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)
