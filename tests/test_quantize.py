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
    inside = (np.round(v) >= qmin) & (np.round(v) <= qmax)
    ds = np.where(inside, np.round(v) - v, np.where(np.round(v) < qmin, qmin, qmax))
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
