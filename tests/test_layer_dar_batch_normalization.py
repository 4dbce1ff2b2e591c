import keras
import numpy as np
import pytest

from autoinit_tf.layers import DARBatchNormalization
from test_layer_common import fit_step, mixed_precision_finite, roundtrip, sequential, tensor, tf_grad, tf_only, to_np


def ref(x, mask, gamma, beta, eps=1e-3):
    out = np.empty_like(x)
    for sel in (mask, ~mask):
        if sel.any():
            xs = x[sel]
            mu = xs.reshape(-1, x.shape[-1]).mean(0)
            var = xs.reshape(-1, x.shape[-1]).var(0)
            out[sel] = (xs - mu) / np.sqrt(var + eps) * gamma + beta
    return out


def data(seed=0, n=10):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3, 3, 4)) * 2 + 1).astype("float32")
    mask = rng.random(n) < 0.4
    mask[0], mask[1] = True, False
    x[mask] = rng.normal(size=x[mask].shape) * 0.5 - 2  # a different distribution for the noise
    return x, mask


def _layer(c=4):
    layer = DARBatchNormalization(momentum=0.9)
    layer.build((None, 3, 3, c))
    layer.gamma.assign(np.linspace(0.5, 2, c))
    layer.beta.assign(np.linspace(-1, 1, c))
    return layer


@pytest.mark.core
def test_forward_and_moving_statistics_match_numpy():
    x, mask = data()
    layer = _layer()
    g, b = to_np(layer.gamma), to_np(layer.beta)
    out = to_np(layer([x, mask], training=True))
    np.testing.assert_allclose(out, ref(x, mask, g, b), atol=1e-4)
    nat = x[~mask].reshape(-1, 4)
    np.testing.assert_allclose(to_np(layer.moving_mean), 0.1 * nat.mean(0), atol=1e-5)
    np.testing.assert_allclose(to_np(layer.moving_variance), 0.9 + 0.1 * nat.var(0), atol=1e-5)
    # inference: natural moving statistics for every example, mask ignored
    mm, mv = to_np(layer.moving_mean), to_np(layer.moving_variance)
    inf = to_np(layer(x, noise_mask=mask, training=False))
    np.testing.assert_allclose(inf, (x - mm) / np.sqrt(mv + 1e-3) * g + b, atol=1e-4)
    # the kwarg form equals the list form
    np.testing.assert_allclose(to_np(_layer()(x, noise_mask=mask.astype("float32")[:, None], training=True)), out, atol=1e-6)


@pytest.mark.core
def test_mask_all_false_is_plain_batchnorm():
    x, _ = data(1)
    layer = DARBatchNormalization()
    bn = keras.layers.BatchNormalization()
    out = to_np(layer([x, np.zeros(len(x), bool)], training=True))
    np.testing.assert_allclose(out, to_np(bn(x, training=True)), atol=1e-5)
    np.testing.assert_allclose(to_np(layer.moving_mean), to_np(bn.moving_mean), atol=1e-6)
    np.testing.assert_allclose(to_np(layer.moving_variance), to_np(bn.moving_variance), atol=1e-6)
    np.testing.assert_allclose(to_np(DARBatchNormalization()(x, training=True)), out, atol=1e-6)  # no mask


@pytest.mark.core
def test_mask_all_true_never_touches_moving_statistics():
    x, _ = data(2)
    layer = _layer()
    out = to_np(layer([x, np.ones(len(x), bool)], training=True))
    np.testing.assert_allclose(out, ref(x, np.ones(len(x), bool), to_np(layer.gamma), to_np(layer.beta)), atol=1e-4)
    np.testing.assert_array_equal(to_np(layer.moving_mean), 0.0)
    np.testing.assert_array_equal(to_np(layer.moving_variance), 1.0)


@tf_only
def test_gradients_reach_noise_examples_and_shared_affine():
    x, mask = data(3)
    layer = _layer()
    w = np.random.default_rng(0).normal(size=x.shape)
    xt = tensor(x)
    gx, gg, gb = tf_grad(lambda: keras.ops.sum(layer([xt, mask], training=True) * tensor(w)), xt, layer.gamma, layer.beta)
    assert np.abs(gx[mask]).max() > 1e-3 and np.abs(gx[~mask]).max() > 1e-3
    xhat = (ref(x, mask, 1.0, 0.0))
    np.testing.assert_allclose(gg, (w * xhat).reshape(-1, 4).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, w.reshape(-1, 4).sum(0), rtol=1e-5, atol=1e-5)


def _model():
    x_in = keras.Input((3, 3, 4))
    m_in = keras.Input((1,))
    h = keras.layers.Conv2D(4, 1)(x_in)
    return keras.Model([x_in, m_in], DARBatchNormalization(name="dar")([h, m_in]))


@pytest.mark.core
def test_roundtrip_functional_sequential_fit(tmp_path):
    x, mask = data(4, n=8)
    m = mask.astype("float32")[:, None]
    model = _model()
    model([x, m], training=True)
    loaded = roundtrip(model, [x, m], tmp_path)
    np.testing.assert_allclose(to_np(loaded.get_layer("dar").moving_mean), to_np(model.get_layer("dar").moving_mean))
    fit_step(_model(), [x, m], np.zeros_like(x))
    seq = sequential(lambda: DARBatchNormalization(), (3, 3, 4))
    assert seq.output_shape == (None, 3, 3, 4)
    fit_step(keras.Sequential([keras.Input((3, 3, 4)), keras.layers.Conv2D(4, 1), DARBatchNormalization()]), x, np.zeros_like(x))


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x, mask = data(5, n=8)
    mixed_precision_finite(_model, [x * 100, mask.astype("float32")[:, None]], policy)


@pytest.mark.core
@pytest.mark.parametrize("shape", [(10, 4), (10, 5, 4), (10, 2, 3, 2, 4)])
def test_other_ranks_match_numpy(shape):
    rng = np.random.default_rng(6)
    x = (rng.normal(size=shape) * 3 + 2).astype("float32")
    mask = np.arange(shape[0]) % 3 == 0
    layer = DARBatchNormalization(momentum=0.9)
    out = to_np(layer([x, mask], training=True))
    np.testing.assert_allclose(out, ref(x, mask, 1.0, 0.0), atol=1e-4)
    np.testing.assert_allclose(to_np(layer.moving_variance), 0.9 + 0.1 * x[~mask].reshape(-1, 4).var(0), atol=1e-4)


@pytest.mark.core
def test_unknown_spatial_size_compiles():
    x, mask = data(7, n=8)
    x_in, m_in = keras.Input((None, None, 4)), keras.Input((1,))
    model = keras.Model([x_in, m_in], DARBatchNormalization()([x_in, m_in]))
    fit_step(model, [x, mask.astype("float32")[:, None]], np.zeros_like(x))
