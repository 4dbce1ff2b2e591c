import keras
import numpy as np
import pytest

from autoinit_tf.layers import WSConv1D, WSConv2D, WSDense, standardize_kernel
from test_layer_common import fit_step, functional, mixed_precision_finite, numeric_grad, roundtrip, sequential, tensor, tf_grad, tf_only, to_np


def ref_ws(w, gain, eps=1e-4):
    axes = tuple(range(w.ndim - 1))
    fan_in = np.prod(w.shape[:-1])
    mu = w.mean(axes, keepdims=True)
    var = w.var(axes, keepdims=True)
    return gain * (w - mu) / np.sqrt(np.maximum(fan_in * var, eps))


def conv2d_valid(x, k):
    kh, kw = k.shape[:2]
    H, W = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], H, W, k.shape[-1]))
    for i in range(H):
        for j in range(W):
            out[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i : i + kh, j : j + kw], k)
    return out


@pytest.mark.core
def test_standardized_kernel_properties():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 4, 5)) * 3 + 1
    gain = rng.uniform(0.5, 2, 5)
    ws = to_np(standardize_kernel(w.astype("float32"), gain.astype("float32")))
    np.testing.assert_allclose(ws, ref_ws(w, gain), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ws.sum((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose((ws**2).sum((0, 1, 2)), gain**2, rtol=1e-4)
    # a constant kernel hits the epsilon floor instead of dividing by zero
    assert np.all(np.isfinite(to_np(standardize_kernel(np.ones((2, 3), "float32"), np.ones(3, "float32")))))


@pytest.mark.core
def test_dense_and_conv_forward():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    conv = WSConv2D(4, 3, use_bias=True, bias_initializer="ones")
    out = to_np(conv(x))
    k = to_np(conv.kernel).astype(np.float64)
    np.testing.assert_allclose(out, conv2d_valid(x, ref_ws(k, 1.0)) + 1.0, atol=1e-4)
    dense = WSDense(6, activation="relu")
    xd = rng.normal(size=(4, 7)).astype("float32")
    dense.build(xd.shape)
    dense.gain.assign(np.linspace(0.5, 2, 6))
    np.testing.assert_allclose(to_np(dense(xd)), np.maximum(xd @ ref_ws(to_np(dense.kernel), np.linspace(0.5, 2, 6)), 0), atol=1e-5)
    x1 = rng.normal(size=(2, 6, 3)).astype("float32")
    c1 = WSConv1D(2, 3, padding="same")
    assert to_np(c1(x1)).shape == (2, 6, 2)


@tf_only
def test_gradients_through_standardization():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4))
    w_out = rng.normal(size=(5, 3))
    dense = WSDense(3, use_bias=False)
    dense.build(x.shape)
    k0 = to_np(dense.kernel).astype(np.float64)
    gk, gg = tf_grad(lambda: keras.ops.sum(dense(tensor(x)) * tensor(w_out)), dense.kernel, dense.gain)
    nk = numeric_grad(lambda k: np.sum(x @ ref_ws(k, 1.0) * w_out), k0)
    np.testing.assert_allclose(gk, nk, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gg, np.sum((x @ ref_ws(k0, 1.0)) * w_out, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.core
def test_roundtrip_functional_sequential_fit(tmp_path):
    x = np.random.default_rng(3).normal(size=(8, 6, 6, 3)).astype("float32")
    model = functional(lambda: WSConv2D(4, 3, padding="same", name="c"), (6, 6, 3))
    model.get_layer("c").gain.assign(np.arange(1, 5, dtype="float32"))
    loaded = roundtrip(model, x, tmp_path, atol=1e-6)
    assert type(loaded.get_layer("c")) is WSConv2D and loaded.get_layer("c").ws_epsilon == 1e-4
    seq = keras.Sequential([keras.Input((6, 6, 3)), WSConv2D(4, 3), keras.layers.Flatten(), WSDense(2)])
    assert seq.output_shape == (None, 2)
    roundtrip(seq, x, tmp_path, atol=1e-6)
    fit_step(seq, x, np.zeros((8, 2), "float32"))
    assert sequential(lambda: WSDense(3), (5,)).output_shape == (None, 3)


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = np.random.default_rng(4).normal(size=(4, 6, 6, 3)).astype("float32")
    build = lambda: keras.Sequential([keras.Input((6, 6, 3)), WSConv2D(4, 3), keras.layers.Flatten(), WSDense(2)])  # noqa: E731
    mixed_precision_finite(build, x, policy)
