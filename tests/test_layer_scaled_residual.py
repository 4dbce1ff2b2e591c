import math

import keras
import numpy as np
import pytest

from autoinit_tf.layers import ScaledResidual
from test_layer_common import fit_step, mixed_precision_finite, roundtrip, to_np


def xs(n=3):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 5)).astype("float32") for _ in range(n)]


@pytest.mark.core
def test_modes_forward():
    a, b, c = xs()
    np.testing.assert_allclose(to_np(ScaledResidual("idshort")([a, b])), (a + b) / math.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(to_np(ScaledResidual("idshort")([a, b, c])), (a + b + c) / math.sqrt(3), atol=1e-6)
    np.testing.assert_allclose(to_np(ScaledResidual("learnscalar")([a, b])), (a + b) / math.sqrt(2), atol=1e-6)
    for mode in ("skipinit", "rezero"):
        layer = ScaledResidual(mode)
        np.testing.assert_allclose(to_np(layer([a, b])), a, atol=0)  # identity at init
        layer.alpha.assign(0.3)
        np.testing.assert_allclose(to_np(layer([a, b])), a + 0.3 * b, atol=1e-6)
    layer = ScaledResidual("autoinit")
    np.testing.assert_allclose(to_np(layer([a, b, c])), a + b + c, atol=1e-6)
    assert len(layer.coefficients) == 3 and not any(v.trainable for v in layer.coefficients)
    for v, val in zip(layer.scale_variables(), (0.5, 2.0, -1.0)):
        v.assign(val)
    np.testing.assert_allclose(to_np(layer([a, b, c])), 0.5 * a + 2 * b - c, atol=1e-6)


@pytest.mark.core
def test_errors():
    a, b, c = xs()
    with pytest.raises(ValueError):
        ScaledResidual("fixup")
    with pytest.raises(ValueError):
        ScaledResidual("skipinit")([a, b, c])
    with pytest.raises(ValueError):
        ScaledResidual("idshort")(a)


def _block(mode):
    inp = keras.Input((5,))
    branch = keras.layers.Dense(5)(inp)
    return keras.Model(inp, ScaledResidual(mode, name="res")([inp, branch]))


@pytest.mark.core
@pytest.mark.parametrize("mode", ["idshort", "learnscalar", "rezero", "autoinit"])
def test_roundtrip_functional_fit(mode, tmp_path):
    x = xs(1)[0]
    model = _block(mode)
    for v in model.get_layer("res").scale_variables():
        if v is not None:
            v.assign(0.7)
    loaded = roundtrip(model, x, tmp_path)
    assert loaded.get_layer("res").mode == mode
    assert model.get_layer("res").compute_output_shape([(None, 5), (None, 5)]) == (None, 5)
    model = _block(mode)
    if mode == "autoinit":
        model.get_layer("res").coefficients[1].assign(0.5)
    before = [to_np(v) for v in model.get_layer("res").scale_variables() if v is not None]
    fit_step(model, x, np.ones_like(x))
    after = [to_np(v) for v in model.get_layer("res").scale_variables() if v is not None]
    if mode == "autoinit":  # non-trainable: set by the engine only
        np.testing.assert_array_equal(after, before)
    elif mode != "idshort":
        assert not np.allclose(after, before)


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    mixed_precision_finite(lambda: _block("learnscalar"), xs(1)[0], policy)
