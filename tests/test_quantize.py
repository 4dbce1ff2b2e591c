"""Fake quantization against a NumPy reference (round / clamp / zero point, per tensor and per channel,
power-of-two scales), straight-through and LSQ gradients on the backend's autodiff, and the presets table."""

import math

import numpy as np
import pytest

import keras

from autoinit_tf.quantize import PRESETS, fake_quantize, lsq_init_scale, lsq_quantize, quant_range

pytestmark = pytest.mark.core


def _grad(fn, *args):
    """(value, [d sum(fn) / d arg]) with the backend's autodiff (args are float32 arrays)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        ts = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for t in ts:
                tape.watch(t)
            out = tf.reduce_sum(fn(*ts))
        return float(out), [g.numpy() for g in tape.gradient(out, ts)]
    if backend == "jax":
        import jax

        value = float(np.sum(fn(*args)))
        grads = jax.grad(lambda *a: fn(*a).sum(), argnums=tuple(range(len(args))))(*args)
        return value, [np.asarray(g) for g in grads]
    import torch

    ts = [torch.tensor(a, requires_grad=True) for a in args]
    out = fn(*ts).sum()
    out.backward()
    return float(out.detach()), [t.grad.numpy() for t in ts]


def _reference(x, s, z, qmin, qmax):
    q = np.clip(np.round(x / s) + z, qmin, qmax)  # numpy rounds half to even, as keras.ops.round
    return (q - z) * s


def test_ranges():
    assert quant_range(8) == (-128, 127)
    assert quant_range(8, narrow=True) == (-127, 127)
    assert quant_range(4, signed=False) == (0, 15)


def test_values_per_tensor_per_channel_asymmetric_and_pow2():
    rng = np.random.default_rng(0)
    x = (3 * rng.normal(size=(5, 4, 3))).astype("float32")
    got = keras.ops.convert_to_numpy(fake_quantize(x, 0.05, 0.0, -128, 127))
    np.testing.assert_allclose(got, _reference(x, 0.05, 0.0, -128, 127), rtol=1e-6, atol=1e-6)
    s = np.array([0.02, 0.05, 0.1], np.float32)
    z = np.array([3.0, 0.0, 7.0], np.float32)
    got = keras.ops.convert_to_numpy(fake_quantize(x, s, z, 0, 255, axis=-1))
    np.testing.assert_allclose(got, _reference(x, s, z, 0, 255), rtol=1e-6, atol=1e-6)
    got = keras.ops.convert_to_numpy(fake_quantize(x, 0.07, 0.0, -8, 7, pow2=True))
    np.testing.assert_allclose(got, _reference(x, 2.0 ** np.round(np.log2(0.07)), 0.0, -8, 7), rtol=1e-6, atol=1e-6)


def test_straight_through_gradient():
    x = np.array([-10.0, -0.26, 0.0, 0.13, 0.5, 10.0], np.float32)
    _, (gx,) = _grad(lambda t: fake_quantize(t, 0.1, 0.0, -8, 7), x)
    np.testing.assert_array_equal(gx, [0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # inside the range only


def test_lsq_scale_gradient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64,)).astype("float32")
    s = np.float32(0.2)
    qmin, qmax = quant_range(4)
    _, (gx, gs) = _grad(lambda t, sc: lsq_quantize(t, sc, qmin, qmax), x, s)
    v = x / s
    # LSQ (Esser et al., eq. 3): round(v) - v for q_min < v < q_max, q_min below, q_max above (continuous v)
    inside = (v > qmin) & (v < qmax)
    ds = np.where(inside, np.round(v) - v, np.where(v <= qmin, qmin, qmax))
    g = 1.0 / math.sqrt(x.size * qmax)
    assert float(gs) == pytest.approx(float(ds.sum() * g), rel=1e-4, abs=1e-6)
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    init = float(keras.ops.convert_to_numpy(lsq_init_scale(x, qmax)))
    assert init == pytest.approx(2 * np.abs(x).mean() / math.sqrt(qmax), rel=1e-5)


def test_presets_table():
    assert set(PRESETS) == {"academic", "tensorrt", "acl", "tvm", "snpe", "fbgemm"}
    rows = {k: (p.scale, p.weight_granularity, p.weight_symmetric, p.activation_symmetric, p.graph_level, p.fold_bn)
            for k, p in PRESETS.items()}
    assert rows["academic"] == ("fp32", "per-tensor", True, True, 1, False)
    assert rows["tensorrt"] == ("fp32", "per-channel", True, True, 2, True) and PRESETS["tensorrt"].narrow_range
    assert rows["acl"] == ("fp32", "per-channel", True, False, 1, True)
    assert rows["tvm"] == ("pow2", "per-tensor", True, True, 3, True)
    assert rows["snpe"] == ("fp32", "per-tensor", False, False, 3, True)
    assert rows["fbgemm"] == ("fp32", "per-channel", False, False, 3, True)


def test_minmax_params_against_numpy():
    from autoinit_tf.quantize import minmax_params

    lo, hi = np.float32(-1.7), np.float32(0.9)
    s, z = (float(keras.ops.convert_to_numpy(v)) for v in minmax_params(lo, hi, -128, 127, True))
    assert (s, z) == (pytest.approx(1.7 / 127.5, rel=1e-6), 0.0)
    s, z = (float(keras.ops.convert_to_numpy(v)) for v in minmax_params(np.float32(0.0), hi, 0, 255, True))
    assert (s, z) == (pytest.approx(0.9 / 255, rel=1e-6), 0.0)
    s, z = (float(keras.ops.convert_to_numpy(v)) for v in minmax_params(lo, hi, -128, 127, False))
    assert s == pytest.approx(2.6 / 255, rel=1e-6) and z == -128 - np.round(-1.7 / (2.6 / 255))
    # a range that excludes 0 is widened to hold it (zero must be exact)
    s, z = (float(keras.ops.convert_to_numpy(v)) for v in minmax_params(np.float32(0.5), hi, -128, 127, False))
    assert s == pytest.approx(0.9 / 255, rel=1e-6) and z == -128


@pytest.mark.parametrize("signed", [False, True])
def test_pact_values_and_alpha_gradient(signed):
    from autoinit_tf.quantize import pact_quantize

    rng = np.random.default_rng(2)
    x = (3 * rng.normal(size=(200,))).astype("float32")
    alpha = np.float32(2.5)
    qmin, qmax = quant_range(4, signed=signed)
    value, (gx, ga) = _grad(lambda t, a: pact_quantize(t, a, qmin, qmax), x, alpha)
    lower = -alpha if signed else 0.0
    y = np.clip(x, lower, alpha)
    s = (alpha - lower) / (qmax - qmin)
    z = qmin - np.round(lower / s)
    want = _reference(y, s, z, qmin, qmax)
    got = keras.ops.convert_to_numpy(pact_quantize(x, alpha, qmin, qmax))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # PACT: d/d alpha = 1 above alpha (and -1 below -alpha when the lower clip is -alpha), 0 inside
    assert float(ga) == pytest.approx(float((x > alpha).sum() - (signed and (x < -alpha).sum())), abs=1e-4)
    np.testing.assert_array_equal(gx, ((x > lower) & (x < alpha)).astype(np.float32))


def test_dorefa_weights_against_numpy():
    from autoinit_tf.quantize import dorefa_weights

    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 5)).astype("float32")
    qmin, qmax = quant_range(4)
    t = np.tanh(w)
    ref = _reference(t / np.abs(t).max(), 2.0 / (qmax - qmin), 0.0, qmin, qmax)
    got = keras.ops.convert_to_numpy(dorefa_weights(w, qmin, qmax))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    per = keras.ops.convert_to_numpy(dorefa_weights(w, qmin, qmax, axis=-1))
    ref = _reference(t / np.abs(t).max(axis=0), 2.0 / (qmax - qmin), 0.0, qmin, qmax)
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-6)
