import keras
import numpy as np
import pytest
from scipy.special import erfinv

from autoinit_tf.layers import ProxyNormalization
from test_layer_common import (
    fit_step,
    functional,
    mixed_precision_finite,
    numeric_grad,
    roundtrip,
    sequential,
    tensor,
    tf_grad,
    tf_only,
    to_np,
)


def ref_quantiles(n):
    j = np.arange(n)
    return np.sqrt(2.0) * erfinv(2 * (j + 0.5) / n - 1)


def ref_pn(y, gamma, beta, act, n=256, eps=0.03):
    q = ref_quantiles(n)[:, None]
    zt = act(gamma * q + beta)
    mu, var = zt.mean(0), zt.var(0)
    return (act(gamma * y + beta) - mu) / np.sqrt(var + eps)


relu = lambda x: np.maximum(x, 0)  # noqa: E731


def _layer_with(gamma, beta, **kw):
    layer = ProxyNormalization(**kw)
    layer.build((None, len(gamma)))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer


@pytest.mark.core
def test_quantile_facts():
    q = ref_quantiles(256)
    assert abs(q.mean()) < 1e-12 and abs(q.var() - 0.995) < 1e-3
    r = relu(q)
    assert abs(r.mean() - 0.3986) < 2e-4 and abs(r.var() - 0.3386) < 2e-4


@pytest.mark.core
@pytest.mark.parametrize("act,np_act", [("relu", relu), ("tanh", np.tanh)])
def test_forward_matches_numpy(act, np_act):
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 2.0, 5).astype("float32")
    beta = rng.normal(0, 0.5, 5).astype("float32")
    y = rng.normal(size=(3, 4, 5)).astype("float32")
    layer = _layer_with(gamma, beta, activation=act)
    out = to_np(layer(y))
    np.testing.assert_allclose(out, ref_pn(y.astype(np.float64), gamma, beta, np_act), atol=2e-5)


@pytest.mark.core
def test_default_init_relu_is_proxy_standardized():
    # gamma=1, beta=0: output = (relu(y) - 0.39862) / sqrt(0.33862 + 0.03)
    layer = ProxyNormalization()
    y = np.linspace(-3, 3, 13, dtype="float32")[:, None] * np.ones((1, 2), "float32")
    out = to_np(layer(y))
    q = relu(ref_quantiles(256))
    np.testing.assert_allclose(out, (relu(y) - q.mean()) / np.sqrt(q.var() + 0.03), atol=1e-5)


@pytest.mark.core
def test_channel_axis_and_eps_and_samples():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(2, 3, 4)).astype("float32")  # channels on axis 1
    layer = ProxyNormalization(axis=1, n_samples=64, epsilon=0.5)
    layer.build(y.shape)
    gamma = np.array([1.0, 2.0, 0.5], "float32")
    layer.gamma.assign(gamma)
    out = to_np(layer(y))
    ref = ref_pn(np.moveaxis(y, 1, -1), gamma, 0.0, relu, n=64, eps=0.5)
    np.testing.assert_allclose(out, np.moveaxis(ref, -1, 1), atol=1e-5)
    with pytest.raises(ValueError):
        ProxyNormalization(n_samples=1)


@tf_only
def test_gradients_flow_through_proxy_statistics():
    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 1.5, 3)
    beta = rng.normal(0, 0.3, 3)
    y = rng.normal(size=(6, 3))
    w = rng.normal(size=(6, 3))
    layer = _layer_with(gamma.astype("float32"), beta.astype("float32"), activation="tanh")
    gg, gb = tf_grad(lambda: keras.ops.sum(layer(tensor(y)) * tensor(w)), layer.gamma, layer.beta)
    ng = numeric_grad(lambda g: np.sum(ref_pn(y, g, beta, np.tanh) * w), gamma)
    nb = numeric_grad(lambda b: np.sum(ref_pn(y, gamma, b, np.tanh) * w), beta)
    np.testing.assert_allclose(gg, ng, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gb, nb, rtol=1e-3, atol=1e-4)
    # the proxy path matters: the gradient differs from the one with frozen statistics
    frozen = numeric_grad(
        lambda g: np.sum((np.tanh(g * y + beta) - 0) * w / np.sqrt(np.var(np.tanh(gamma * ref_quantiles(256)[:, None] + beta), 0) + 0.03)),
        gamma,
    )
    assert not np.allclose(ng, frozen, atol=1e-3)


@pytest.mark.core
def test_roundtrip_functional_sequential_fit(tmp_path):
    x = np.random.default_rng(3).normal(size=(8, 4, 4, 6)).astype("float32")
    make = lambda: ProxyNormalization(activation="gelu", name="pn")  # noqa: E731
    model = functional(make, (4, 4, 6))
    model.get_layer("pn").gamma.assign(np.linspace(0.5, 2, 6))
    loaded = roundtrip(model, x, tmp_path)
    assert loaded.get_layer("pn").get_config()["activation"] == "gelu"
    seq = sequential(make, (4, 4, 6))
    assert seq.output_shape == (None, 4, 4, 6)
    assert seq.compute_output_shape((None, 4, 4, 6)) == (None, 4, 4, 6)
    inner = keras.Sequential([keras.Input((4, 4, 6)), keras.layers.GroupNormalization(3, center=False, scale=False), ProxyNormalization()])
    fit_step(inner, x, np.ones_like(x))


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = np.random.default_rng(4).normal(size=(4, 4, 4, 6)).astype("float32") * 3
    out = mixed_precision_finite(lambda: functional(lambda: ProxyNormalization(), (4, 4, 6)), x, policy)
    ref = ref_pn(x.astype(np.float64), 1.0, 0.0, relu)
    np.testing.assert_allclose(out, ref, atol=0.05, rtol=0.02)
