import keras
import numpy as np
import pytest

from autoinit_tf.layers import IterNormWhitening
from autoinit_tf.layers.iternorm_whitening import resolve_group_size
from test_layer_common import fit_step, functional, mixed_precision_finite, numeric_grad, roundtrip, sequential, tensor, tf_grad, tf_only, to_np


def ref_whiten(x, g, T=5, eps=1e-5):
    """NumPy IterNorm: returns output and per-group (mean, W)."""
    c = x.shape[-1]
    flat = x.reshape(-1, c).astype(np.float64)
    out = np.empty_like(flat)
    stats = []
    for s in range(0, c, g):
        xg = flat[:, s : s + g]
        mu = xg.mean(0)
        xc = xg - mu
        sigma = xc.T @ xc / len(xc) + eps * np.eye(g)
        tr = np.trace(sigma)
        sn = sigma / tr
        p = np.eye(g)
        for _ in range(T):
            p = 0.5 * (3 * p - np.linalg.matrix_power(p, 3) @ sn)
        w = p / np.sqrt(tr)
        out[:, s : s + g] = xc @ w.T
        stats.append((mu, w))
    return out.reshape(x.shape), stats


def correlated(seed=0, n=64, c=8):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(c, c)) + 2 * np.eye(c)
    return (rng.normal(size=(n, 2, 2, c)) @ mix + 3).astype("float32")


@pytest.mark.core
def test_group_size_resolution():
    assert resolve_group_size(128, 64) == 64
    assert resolve_group_size(48, 64) == 16  # 64 -> 32 -> 16
    assert resolve_group_size(20, 64) == 4
    assert resolve_group_size(7, 64) == 1
    layer = IterNormWhitening()
    layer.build((None, 48))
    assert (layer.g, layer.groups) == (16, 3)


@pytest.mark.core
@pytest.mark.parametrize("c,group", [(8, 4), (12, 8)])  # 12 with 8: falls back to 4
def test_training_forward_and_running_stats(c, group):
    x = correlated(c=c)
    layer = IterNormWhitening(group_size=group)
    layer.build(x.shape)
    gamma = np.linspace(0.5, 1.5, c).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(np.full(c, 0.2, "float32"))
    g = resolve_group_size(c, group)
    out = to_np(layer(x, training=True))
    expect, stats = ref_whiten(x, g)
    np.testing.assert_allclose(out, expect * gamma + 0.2, atol=2e-4)
    rm = to_np(layer.running_mean)
    rw = to_np(layer.running_whitening)
    for i, (mu, w) in enumerate(stats):
        np.testing.assert_allclose(rm[i], 0.1 * mu, atol=1e-4)
        np.testing.assert_allclose(rw[i], 0.9 * np.eye(g) + 0.1 * w, atol=1e-4)
    # inference uses the running statistics
    inf = to_np(layer(x, training=False))
    flat = x.reshape(-1, c)
    exp_inf = np.concatenate([(flat[:, i * g : (i + 1) * g] - rm[i]) @ rw[i].T for i in range(c // g)], 1)
    np.testing.assert_allclose(inf, exp_inf.reshape(x.shape) * gamma + 0.2, atol=1e-3)


@pytest.mark.core
def test_many_iterations_whiten():
    rng = np.random.default_rng(1)
    mix = np.eye(4) + 0.3 * rng.normal(size=(4, 4))
    x = (rng.normal(size=(256, 2, 2, 4)) @ mix).astype("float32")
    assert np.abs(np.cov(x.reshape(-1, 4).T) - np.eye(4)).max() > 0.1
    out = to_np(IterNormWhitening(group_size=4, iterations=15)(x, training=True)).reshape(-1, 4)
    np.testing.assert_allclose(np.cov(out.T, bias=True), np.eye(4), atol=5e-3)
    # few iterations only partially whiten (Newton from P0 = I on the trace-normalized covariance)
    out2 = to_np(IterNormWhitening(group_size=4, iterations=2)(x, training=True)).reshape(-1, 4)
    assert np.abs(np.cov(out2.T, bias=True) - np.eye(4)).max() > 2e-2


@tf_only
def test_gradients_match_finite_differences():
    x = correlated(2, n=6, c=4).reshape(6, 1, 4, 4)[:, 0]  # (6, 4, 4)
    x64 = x.astype(np.float64)
    w = np.random.default_rng(3).normal(size=x.shape)
    layer = IterNormWhitening(group_size=2)
    xt = tensor(x)
    (gx,) = tf_grad(lambda: keras.ops.sum(layer(xt, training=True) * tensor(w)), xt)
    ng = numeric_grad(lambda v: np.sum(ref_whiten(v, 2)[0] * w), x64, h=1e-4)
    np.testing.assert_allclose(gx, ng, rtol=2e-2, atol=2e-3)


@pytest.mark.core
def test_roundtrip_functional_sequential_fit(tmp_path):
    x = correlated(4, n=8, c=8)
    model = functional(lambda: IterNormWhitening(group_size=4, name="w"), x.shape[1:])
    model(x, training=True)  # move the running statistics away from their init
    loaded = roundtrip(model, x, tmp_path)
    np.testing.assert_allclose(to_np(loaded.get_layer("w").running_whitening), to_np(model.get_layer("w").running_whitening))
    assert sequential(lambda: IterNormWhitening(), x.shape[1:]).output_shape == (None,) + x.shape[1:]
    net = keras.Sequential([keras.Input(x.shape[1:]), IterNormWhitening(group_size=4), keras.layers.Conv2D(8, 1)])
    fit_step(net, x, np.zeros_like(x))


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = correlated(5, n=8, c=8) * 50
    mixed_precision_finite(lambda: functional(lambda: IterNormWhitening(group_size=8), x.shape[1:]), x, policy)
