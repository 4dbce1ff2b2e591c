"""Propagation rules of the paper layers vs Monte Carlo of the layers themselves."""

import math

import keras
import numpy as np
import pytest

import autoinit_tf
import autoinit_tf.layers as L
from autoinit_tf.moments import Moments
from autoinit_tf.rules.paper_layers import gate_moments
from test_layer_common import to_np

pytestmark = pytest.mark.core


def predicted(model, mean=0.0, var=1.0):
    report = autoinit_tf.analyze(model, input_moments=(mean, var))
    return report.rows[-1].outputs[0]


def mc(model, shape, mean=0.0, var=1.0, n=256, seed=0, training=True):
    x = np.random.default_rng(seed).normal(mean, math.sqrt(var), size=(n,) + shape).astype("float32")
    y = to_np(model(x, training=training)).astype(np.float64)
    return y.mean(), y.var()


def check(pred, emp, tol_mean=0.02, tol_var=0.03):
    mean, var = emp
    assert abs(pred.mean - mean) < tol_mean * max(1.0, math.sqrt(var)), (pred, emp)
    assert abs(pred.var - var) < tol_var * max(var, 1e-3), (pred, emp)


def single(layer, shape):
    inp = keras.Input(shape)
    return keras.Model(inp, layer(inp))


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_proxy_normalization(act):
    model = single(L.ProxyNormalization(activation=act, name="pn"), (4, 4, 6))
    layer = model.get_layer("pn")
    layer.gamma.assign(np.linspace(0.5, 2.0, 6))
    layer.beta.assign(np.linspace(-0.5, 0.5, 6))
    pred = predicted(model)
    check(pred, mc(model, (4, 4, 6), n=512))
    # with N(0, 1) inputs PN outputs are (0, 1) up to the epsilon by construction
    plain = single(L.ProxyNormalization(activation=act), (4, 4, 6))
    p0 = predicted(plain)
    q = keras.activations.get(act)(keras.ops.convert_to_tensor(np.sort(np.random.default_rng(0).normal(size=4096)).astype("float32")))
    assert abs(p0.mean) < 0.01 and abs(p0.var - np.var(to_np(q)) / (np.var(to_np(q)) + 0.03)) < 0.02


@pytest.mark.parametrize("fns,k,normalize", [("or_ail", 2, False), ("and_ail", 3, False), ("xnor_ail", 2, False), (["and_ail", "or_ail", "xnor_ail"], 2, True), ("or_il", 2, False), ("xnor_il", 3, False), (["and_il", "or_ail"], 2, False)])
def test_logit_gate(fns, k, normalize):
    model = single(L.LogitGate(fns, k=k, normalize=normalize), (24 * k,))
    for mean, var in ((0.0, 1.0), (0.5, 2.0)):
        check(predicted(model, mean, var), mc(model, (24 * k,), mean, var, n=4000), 0.02, 0.03)


def test_gate_moments_against_2d_gauss_hermite():
    nodes, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / math.sqrt(2 * math.pi)
    a, b = np.meshgrid(nodes, nodes, indexing="ij")
    W = np.outer(w, w)
    m = Moments(0.3, 1.5)
    x1, x2 = m.mean + math.sqrt(m.var) * a, m.mean + math.sqrt(m.var) * b
    refs = {
        "or_ail": np.where((x1 > 0) & (x2 > 0), x1 + x2, np.maximum(x1, x2)),
        "and_ail": np.where((x1 < 0) & (x2 < 0), x1 + x2, np.minimum(x1, x2)),
        "xnor_ail": np.sign(x1 * x2) * np.minimum(np.abs(x1), np.abs(x2)),
    }
    for name, y in refs.items():
        e1, e2 = gate_moments(name, 2, m)
        assert abs(e1 - np.sum(W * y)) < 5e-3 and abs(e2 - np.sum(W * y * y)) < 1e-2, name


@pytest.mark.parametrize("t,learnable", [(0.05, False), (1.0, True), (50.0, False)])
def test_log_avg_exp(t, learnable):
    model = single(L.LogAvgExpPooling2D(t, learnable=learnable), (4, 4, 8))
    check(predicted(model, 0.2, 1.5), mc(model, (4, 4, 8), 0.2, 1.5, n=2000), 0.03, 0.05)


@pytest.mark.parametrize("mode", ["paper", "drop_path"])
def test_stochastic_depth(mode):
    a = keras.Input((16,))
    b = keras.Input((16,))
    m2 = keras.Model([a, b], L.StochasticDepth(0.6, mode=mode, seed=1)([a, b]))
    rep = autoinit_tf.analyze(m2, input_moments=[(0.5, 1.0), (1.0, 4.0)])
    p = rep.rows[-1].outputs[0]
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(200):
        xa = rng.normal(0.5, 1.0, (64, 16)).astype("float32")
        xb = rng.normal(1.0, 2.0, (64, 16)).astype("float32")
        outs.append(to_np(m2([xa, xb], training=True)))
    y = np.concatenate(outs)
    check(p, (y.mean(), y.var()), 0.03, 0.05)


def test_iternorm():
    model = single(L.IterNormWhitening(group_size=16, name="w"), (4, 4, 32))
    model.get_layer("w").gamma.assign(np.linspace(0.5, 1.5, 32))
    check(predicted(model, 1.0, 3.0), mc(model, (4, 4, 32), 1.0, 3.0, n=256), 0.02, 0.05)


def test_dar_batch_normalization():
    model = single(L.DARBatchNormalization(name="d"), (4, 4, 8))
    model.get_layer("d").gamma.assign(np.linspace(0.5, 2, 8))
    model.get_layer("d").beta.assign(np.linspace(-1, 1, 8))
    check(predicted(model, 2.0, 0.5), mc(model, (4, 4, 8), 2.0, 0.5), 0.02, 0.03)


def test_scaled_residual_autoinit_sets_coefficients():
    a = keras.Input((32,))
    h = keras.layers.Dense(32, use_bias=False)(a)
    res = L.ScaledResidual("autoinit", name="res")
    model = keras.Model(a, res([a, h]))
    autoinit_tf.wrap(model, input_moments=(0.0, 4.0))
    x = np.random.default_rng(0).normal(0, 2.0, (4096, 32)).astype("float32")
    y = to_np(model(x))
    assert abs(y.var() - 1.0) < 0.1
    coeffs = [float(to_np(v)) for v in res.coefficients]
    assert abs(coeffs[0] - math.sqrt(1.0 / (2 * 4.0))) < 1e-6 and coeffs[1] != 1.0
    for mode in ("idshort", "rezero", "learnscalar"):
        i1, i2 = keras.Input((8,)), keras.Input((8,))
        m = keras.Model([i1, i2], L.ScaledResidual(mode)([i1, i2]))
        p = autoinit_tf.analyze(m, input_moments=[(1.0, 2.0), (0.5, 3.0)]).rows[-1].outputs[0]
        ca, cb = {"idshort": (2**-0.5, 2**-0.5), "rezero": (1.0, 0.0), "learnscalar": (2**-0.5, 2**-0.5)}[mode]
        assert abs(p.mean - (ca + 0.5 * cb)) < 1e-6 and abs(p.var - (2 * ca**2 + 3 * cb**2)) < 1e-6


def test_ws_layers():
    inp = keras.Input((8, 8, 6))
    h = L.WSConv2D(16, 3, name="c")(inp)
    model = keras.Model(inp, L.WSDense(8, name="d")(keras.layers.Flatten()(h)))
    autoinit_tf.wrap(model, input_moments=(1.0, 2.0))
    x = np.random.default_rng(1).normal(1.0, math.sqrt(2.0), (512, 8, 8, 6)).astype("float32")
    hv = to_np(keras.Model(inp, h)(x))
    assert abs(hv.var() - 1.0) < 0.1 and abs(hv.mean()) < 0.05
    conv = single(L.WSConv2D(16, 3, name="c2"), (8, 8, 6))
    conv.get_layer("c2").gain.assign(np.linspace(0.5, 2, 16))
    pred = predicted(conv, 1.0, 2.0)  # as wrap would leave the gains
    autoinit_tf.wrap(conv, input_moments=(1.0, 2.0))
    check(pred, mc(conv, (8, 8, 6), 1.0, 2.0), 0.05, 0.05)


@pytest.mark.parametrize("fns,combine", [(["and_ail", "or_ail", "xnor_ail"], "dup"), (["or_ail", "xnor_il"], "part")])
def test_logit_gate_per_channel(fns, combine):
    # input channels with different means and variances (a frozen diagonal Dense keeps its weights):
    # each gate output channel's mean and second moment follow its own group, and the output keeps
    # per-channel moments (the AND / OR blocks of an ensemble have opposite means: a following layer
    # needs them to predict its own means)
    mu = np.array([-1.5, 0.5, 1.0, -0.2, 0.0, 2.0, -1.0, -1.0, 0.3, 1.2, -0.7, 0.1])
    sd = np.linspace(0.4, 2.0, 12)
    inp = keras.Input((12,))
    dense = keras.layers.Dense(12, trainable=False)
    model = keras.Model(inp, L.LogitGate(fns, combine=combine)(dense(inp)))
    dense.kernel.assign(np.diag(sd).astype("float32"))
    dense.bias.assign(mu.astype("float32"))
    pred = predicted(model)
    assert pred.ch_mean is not None and pred.channels == model.output.shape[-1]
    x = np.random.default_rng(0).normal(size=(40000, 12)).astype("float32")
    y = to_np(model(x)).astype(np.float64)
    np.testing.assert_allclose(pred.ch_mean, y.mean(0), atol=0.03)
    np.testing.assert_allclose(pred.ch_second, (y * y).mean(0), rtol=0.03, atol=0.03)
    check(pred, (y.mean(), y.var()))
