import keras
import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from autoinit_tf.layers import LogAvgExpPooling1D, LogAvgExpPooling2D, LogAvgExpPooling3D
from test_layer_common import (
    fit_step,
    functional,
    mixed_precision_finite,
    roundtrip,
    sequential,
    tensor,
    tf_grad,
    tf_only,
    to_np,
)


def ref(x, t, axes):
    n = np.prod([x.shape[a] for a in axes])
    return t * (logsumexp(x / t, axis=axes) - np.log(n))


@pytest.mark.core
@pytest.mark.parametrize("t", [0.3, 1.0, 5.0])
def test_forward_matches_numpy(t):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 6)).astype("float32")
    np.testing.assert_allclose(to_np(LogAvgExpPooling2D(t)(x)), ref(x.astype(np.float64), t, (1, 2)), atol=1e-5)
    x1 = x[:, 0]
    np.testing.assert_allclose(to_np(LogAvgExpPooling1D(t)(x1)), ref(x1.astype(np.float64), t, (1,)), atol=1e-5)
    x3 = x[..., None, :].repeat(2, axis=3)
    np.testing.assert_allclose(to_np(LogAvgExpPooling3D(t)(x3)), ref(x3.astype(np.float64), t, (1, 2, 3)), atol=1e-5)
    xf = np.moveaxis(x, -1, 1)
    out = to_np(LogAvgExpPooling2D(t, data_format="channels_first", keepdims=True)(xf))
    assert out.shape == (3, 6, 1, 1)
    np.testing.assert_allclose(out[:, :, 0, 0], ref(x.astype(np.float64), t, (1, 2)), atol=1e-5)


@pytest.mark.core
def test_limits_and_bounds():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5, 5, 3)).astype("float32")
    mx, mean = x.max((1, 2)), x.mean((1, 2))
    # log n is subtracted once: a constant input pools to itself for every t
    for t in (1e-4, 1.0, 1e4):
        np.testing.assert_allclose(to_np(LogAvgExpPooling2D(t)(np.full((1, 3, 3, 2), 0.7, "float32"))), 0.7, atol=1e-4)
    near_max = to_np(LogAvgExpPooling2D(1e-4)(x))
    np.testing.assert_allclose(near_max, mx, atol=1e-3)  # error <= t log n
    assert np.all(near_max <= mx + 1e-6) and np.all(near_max >= mx - 1e-4 * np.log(25) - 1e-6)
    near_mean = to_np(LogAvgExpPooling2D(1e4)(x))
    np.testing.assert_allclose(near_mean, mean, atol=2e-3)  # ~ var / (2 t)
    for t in (0.1, 1.0, 10.0):
        y = to_np(LogAvgExpPooling2D(t)(x))
        assert np.all(y <= mx + 1e-5) and np.all(y >= mean - 1e-5)
    with pytest.raises(ValueError):
        LogAvgExpPooling2D(0.0)
    with pytest.raises(ValueError):
        LogAvgExpPooling2D()(np.zeros((2, 3, 4), "float32"))


@pytest.mark.core
def test_mask_respected_in_1d():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, 2)).astype("float32")
    lengths = [6, 2, 4]
    mask = np.array([[i < n for i in range(6)] for n in lengths])
    out = to_np(LogAvgExpPooling1D(0.5)(x, mask=mask))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b], ref(x[b : b + 1, :n].astype(np.float64), 0.5, (1,))[0], atol=1e-5)
    # through a Masking layer inside a model
    inp = keras.Input((6, 2))
    xm = np.where(mask[..., None], x, 0.0).astype("float32")
    model = keras.Model(inp, LogAvgExpPooling1D(0.5)(keras.layers.Masking(0.0)(inp)))
    np.testing.assert_allclose(to_np(model(xm)), out, atol=1e-5)


@tf_only
def test_gradients():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 3, 2))
    w = rng.normal(size=(2, 2))
    layer = LogAvgExpPooling2D(0.7, learnable=True)
    layer.build(x.shape)
    xt = tensor(x)
    gx, gth = tf_grad(lambda: keras.ops.sum(layer(xt) * tensor(w)), xt, layer.log_temperature)
    t = 0.7
    sm = softmax(x.reshape(2, 9, 2) / t, axis=1).reshape(x.shape)
    np.testing.assert_allclose(gx, sm * w[:, None, None, :], atol=1e-5)
    # d/dtheta of t * (lse(x/t) - log n) with t = exp(theta): t * dLAE/dt
    lae = ref(x, t, (1, 2))
    dlae_dt = lae / t - np.sum(sm * x, axis=(1, 2)) / t
    np.testing.assert_allclose(gth, np.sum(w * t * dlae_dt), rtol=1e-4)


@pytest.mark.core
def test_roundtrip_functional_sequential_fit(tmp_path):
    x = np.random.default_rng(4).normal(size=(8, 4, 4, 3)).astype("float32")
    make = lambda: LogAvgExpPooling2D(2.0, learnable=True, name="lae")  # noqa: E731
    model = functional(make, (4, 4, 3))
    model.get_layer("lae").log_temperature.assign(0.3)
    loaded = roundtrip(model, x, tmp_path)
    assert abs(float(to_np(loaded.get_layer("lae").log_temperature)) - 0.3) < 1e-7
    seq = sequential(lambda: LogAvgExpPooling2D(0.5), (4, 4, 3))
    assert seq.output_shape == (None, 3)
    assert LogAvgExpPooling3D(keepdims=True).compute_output_shape((None, 2, 3, 4, 5)) == (None, 1, 1, 1, 5)
    net = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 3), LogAvgExpPooling2D(learnable=True, name="lae")])
    before = float(to_np(net.get_layer("lae").log_temperature))
    fit_step(net, x, np.ones((8, 4), "float32"))
    assert float(to_np(net.get_layer("lae").log_temperature)) != before


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = (np.random.default_rng(5).normal(size=(4, 6, 6, 3)) * 30).astype("float32")
    out = mixed_precision_finite(lambda: functional(lambda: LogAvgExpPooling2D(0.05, learnable=True), (6, 6, 3)), x, policy)
    np.testing.assert_allclose(out, ref(x.astype(np.float64), 0.05, (1, 2)), rtol=0.01, atol=0.05)
