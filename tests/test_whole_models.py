"""Whole models after wrap: deep plain MLPs keep their predicted signal; keras.applications wrap cleanly."""

import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import FallbackRuleWarning

# Activations whose variance map is stable (or neutral, for ReLU) around its fixed point: the realized signal of one drawn
# 100-layer network stays near the analytic prediction. (GELU, SiLU, Mish and tanh-shrink have a
# variance map with slope > 1 at the AutoInit fixed point, so finite-width deviations grow
# geometrically with depth: use wrap(calibrate="probe") for those.)
STABLE_ACTIVATIONS = ["relu", "leaky_relu", "relu6", "selu", "elu", "celu", "tanh", "sigmoid", "softsign",
                      "hard_sigmoid", "hard_tanh", "softplus", "log_sigmoid", "squareplus", "sparse_plus"]


@pytest.mark.slow
@pytest.mark.parametrize("act", STABLE_ACTIVATIONS)
def test_100_layer_mlp_keeps_every_layer_within_factor_two(act):
    width, depth = 256, 100
    inp = keras.Input((width,))
    x = inp
    for _ in range(depth):
        x = keras.layers.Dense(width, activation=act)(x)
    model = keras.Model(inp, x)
    _, report = autoinit_tf.wrap(model, seed=1, return_report=True)
    probe = keras.Model(model.inputs, [layer.output for layer in model.layers[1:]])
    outs = probe(np.random.default_rng(0).standard_normal((1024, width)).astype("float32"), training=True)
    ratios = np.array([np.var(keras.ops.convert_to_numpy(y)) / row.outputs[0].var
                       for y, row in zip(outs, report.rows)])
    assert ratios.min() >= 0.5 and ratios.max() <= 2.0, (ratios.min(), ratios.max())


@pytest.mark.slow
def test_default_glorot_init_collapses_where_wrap_does_not():
    width, depth = 128, 60
    inp = keras.Input((width,))
    x = inp
    for _ in range(depth):
        x = keras.layers.Dense(width, activation="relu")(x)
    model = keras.Model(inp, x)
    x0 = np.random.default_rng(0).standard_normal((512, width)).astype("float32")
    default_var = float(np.var(keras.ops.convert_to_numpy(model(x0))))
    autoinit_tf.wrap(model, seed=0)
    wrapped_var = float(np.var(keras.ops.convert_to_numpy(model(x0))))
    assert default_var < 1e-9  # Glorot halves a ReLU signal's second moment at every layer
    # ReLU's variance map is neutral (slope 1), so one drawn width-128 net random-walks around the
    # prediction (~0.34) by up to ~10x at depth 60, but never collapses geometrically.
    assert 1e-3 < wrapped_var < 20.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "EfficientNetB0"])
def test_keras_applications_wrap_without_fallback(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3), classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, report = autoinit_tf.wrap(model, input_moments=(0.0, 1.0), seed=0, return_report=True)
    assert not report.fallbacks
    assert len(report.assigned) >= 50
    y = keras.ops.convert_to_numpy(model(np.random.default_rng(0).standard_normal((4, 96, 96, 3)).astype("float32"),
                                         training=True))
    assert np.isfinite(y).all()
