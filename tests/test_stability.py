"""Variance elasticity of activations and the analytic pass's instability warning."""

import math
import warnings

import keras
import numpy as np
import pytest
from scipy import integrate, special

import autoinit_tf
from autoinit_tf.moments import Moments
from autoinit_tf.stability import AMPLIFICATION_LIMIT, UnstableSignalWarning, variance_elasticity

pytestmark = pytest.mark.core
L = keras.layers


def _second_moment(f, mean, var):
    """E[f(z)^2], z ~ N(mean, var), by adaptive quadrature (scipy), independent of the engine."""
    sd = math.sqrt(var)

    def g(z):
        return f(z) ** 2 * math.exp(-0.5 * ((z - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    lo, hi = mean - 12 * sd, mean + 12 * sd
    return integrate.quad(g, lo, hi, points=[0.0] if lo < 0 < hi else None, limit=200, epsabs=1e-13,
                          epsrel=1e-12)[0]


def _gelu(z):
    return 0.5 * z * (1.0 + special.erf(z / math.sqrt(2.0)))


def _silu(z):
    return z * special.expit(z)


@pytest.mark.parametrize("name,f", [("gelu", _gelu), ("silu", _silu), ("tanh", math.tanh)])
@pytest.mark.parametrize("mean,var", [(0.0, 1.0), (0.3, 2.0)])
def test_elasticity_matches_quadrature(name, f, mean, var):
    h = 0.05
    ref = (math.log(_second_moment(f, mean, var * math.exp(h)))
           - math.log(_second_moment(f, mean, var * math.exp(-h)))) / (2 * h)
    assert variance_elasticity(name, Moments(mean, var)) == pytest.approx(ref, abs=1e-6)


def test_elasticity_of_homogeneous_and_known_activations():
    # ReLU and leaky ReLU are positively homogeneous: E[f(z)^2] is proportional to Var(z) at mean 0 (to the
    # float32 precision the Keras function is evaluated in on JAX).
    assert variance_elasticity("relu", Moments(0.0, 1.0)) == pytest.approx(1.0, abs=1e-6)
    assert variance_elasticity("leaky_relu", Moments(0.0, 3.0)) == pytest.approx(1.0, abs=1e-6)
    assert variance_elasticity("linear", Moments(0.5, 1.0)) == 1.0
    assert variance_elasticity("softmax", Moments(0.0, 1.0)) == 1.0
    for name in ("gelu", "silu", "mish", "hard_silu"):  # grow deviations around unit variance
        assert variance_elasticity(name, Moments(0.0, 1.0)) > 1.05, name
    for name in ("tanh", "selu", "elu", "sigmoid"):  # pull them back
        assert variance_elasticity(name, Moments(0.0, 1.0)) < 0.95, name


def _mlp(act, depth=30, width=32, norm=False):
    inp = keras.Input((width,))
    h = inp
    for _ in range(depth):
        h = L.Dense(width, activation=act)(h)
        if norm:
            h = L.LayerNormalization()(h)
    return keras.Model(inp, L.Dense(4)(h))


def test_deep_gelu_mlp_warns_and_says_to_calibrate():
    keras.utils.set_random_seed(0)
    model = _mlp("gelu")
    with pytest.warns(UnstableSignalWarning, match=r"grows .*x \('gelu'.* calibrate='probe'"):
        rep = autoinit_tf.analyze(model, seed=0)
    expected = variance_elasticity("gelu", Moments(0.0, 1.0)) ** 30  # 30 fused GELU layers in a chain
    assert rep.amplification[0] == pytest.approx(expected, rel=1e-6)
    assert rep.amplification[1] == model.layers[30].name
    assert rep.to_dict()["amplification"]["factor"] == pytest.approx(expected, rel=1e-6)
    # The warning is about what wrap leaves; with calibration (the remedy) wrap stays quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableSignalWarning)
        autoinit_tf.wrap(model, seed=0, calibrate="probe")
    with pytest.warns(UnstableSignalWarning):
        autoinit_tf.wrap(model, seed=0, calibrate=None)
    # The default (calibrate="auto") knows the prediction is unreliable and calibrates every layer.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableSignalWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    weighted = [r.name for r in rep.rows if r.weighted]
    assert sorted(rep.auto_calibrated) == sorted(weighted) and len(weighted) == 31
    assert "grows" in next(iter(rep.auto_calibrated.values()))
    assert sorted(rep.calibration) == sorted(weighted)


@pytest.mark.parametrize("act,norm", [("relu", False), ("tanh", False), ("selu", False), ("gelu", True)])
def test_stable_networks_do_not_warn(act, norm):
    keras.utils.set_random_seed(0)
    model = _mlp(act, norm=norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableSignalWarning)
        rep = autoinit_tf.analyze(model, seed=0)
    assert rep.amplification[0] <= AMPLIFICATION_LIMIT


def test_shallow_gelu_network_does_not_warn_and_merges_take_the_largest_branch():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    a = inp
    for _ in range(8):  # one long GELU branch ...
        a = L.Dense(16, activation="gelu")(a)
    b = L.Dense(16, activation="gelu")(inp)  # ... and a short one
    model = keras.Model(inp, L.Dense(2)(L.Add()([a, b])))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableSignalWarning)
        rep = autoinit_tf.analyze(model, seed=0)
    e = variance_elasticity("gelu", Moments(0.0, 1.0))
    assert e ** 8 < AMPLIFICATION_LIMIT
    assert rep.amplification[0] == pytest.approx(e ** 8, rel=1e-6)
