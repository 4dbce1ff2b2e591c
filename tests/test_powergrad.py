"""PowerGradCrossEntropy: value = cross-entropy, logit gradient = (p' - q) times the reduction's weight, from
a NumPy reference (p' = p^alpha / sum p^alpha), on the current backend's own autodiff; alpha = 1 gives
cross-entropy's gradient; the whole training step under mixed precision and a LossScaleOptimizer."""

import numpy as np
import pytest

import keras

from autoinit_tf.losses import PowerGradCrossEntropy

pytestmark = pytest.mark.core


def _logit_grad(loss, y, z, sample_weight=None):
    """d loss(y, z) / dz with the backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        zt = tf.constant(z)
        with tf.GradientTape() as tape:
            tape.watch(zt)
            value = loss(y, zt, sample_weight=sample_weight)
        return float(value), tape.gradient(value, zt).numpy()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda t: loss(y, t, sample_weight=sample_weight))(z)
        return float(value), np.asarray(grad)
    import torch

    zt = torch.tensor(z, requires_grad=True)
    value = loss(y, zt, sample_weight=sample_weight)
    value.backward()
    return float(value.detach()), zt.grad.numpy()


def _reference(z, q, alpha):
    z = z.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pa = p ** alpha
    return -np.sum(q * np.log(p), 1), pa / pa.sum(1, keepdims=True) - q


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
@pytest.mark.parametrize("n", [1, 7, 32])
@pytest.mark.parametrize("alpha", [0.05, 0.25, 1.0])
def test_value_is_cross_entropy_and_gradient_is_p_prime_minus_q(reduction, n, alpha):
    rng = np.random.default_rng(n)
    z = (3.0 * rng.normal(size=(n, 5))).astype("float32")
    labels = rng.integers(0, 5, n)
    q = np.eye(5)[labels]
    ce, g = _reference(z, q, alpha)
    scale = 1.0 / n if reduction == "sum_over_batch_size" else 1.0
    for y in (labels.astype("int32"), q.astype("float32"), labels.reshape(-1, 1).astype("int32")):
        value, grad = _logit_grad(PowerGradCrossEntropy(alpha, reduction=reduction), y, z)
        assert value == pytest.approx(ce.sum() * scale, rel=1e-5)
        np.testing.assert_allclose(grad, g * scale, rtol=1e-4, atol=1e-6)


def test_alpha_one_is_cross_entropy_and_label_smoothing_and_sample_weights():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4)).astype("float32")
    q = np.eye(4)[rng.integers(0, 4, 6)].astype("float32")
    w = rng.uniform(0.5, 2.0, 6).astype("float32")
    ce_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    value, grad = _logit_grad(PowerGradCrossEntropy(1.0, label_smoothing=0.1), q, z, w)
    ref_value, ref_grad = _logit_grad(ce_loss, q, z, w)
    assert value == pytest.approx(ref_value, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # alpha < 1 with weights: each example's (p' - q_smoothed) times its weight / N
    qs = q * 0.9 + 0.1 / 4
    _, g = _reference(z, qs, 0.3)
    _, grad = _logit_grad(PowerGradCrossEntropy(0.3, label_smoothing=0.1), q, z, w)
    np.testing.assert_allclose(grad, g * w[:, None] / 6, rtol=1e-4, atol=1e-6)


def test_training_step_under_mixed_precision_and_loss_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 4, 16).astype("int32")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, dtype="mixed_float16")])
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=2.0 ** 10)
        model.compile(optimizer=opt, loss=PowerGradCrossEntropy(0.25))
        w0, b0 = (np.array(keras.ops.convert_to_numpy(v.value), np.float64) for v in model.layers[0].weights)
        z = keras.ops.convert_to_numpy(model(x)).astype(np.float64)
        model.train_on_batch(x, y)
        _, g = _reference(z, np.eye(4)[y], 0.25)
        db = keras.ops.convert_to_numpy(model.layers[0].bias.value) - b0
        dw = keras.ops.convert_to_numpy(model.layers[0].kernel.value) - w0
        np.testing.assert_allclose(db, -0.5 * g.mean(0), rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(dw, -0.5 * x.T.astype(np.float64) @ g / 16, rtol=2e-2, atol=2e-3)
    finally:
        keras.config.set_dtype_policy(before)


def test_serialization_and_errors():
    loss = PowerGradCrossEntropy(0.3, label_smoothing=0.05)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, PowerGradCrossEntropy) and restored.alpha == 0.3 and restored.label_smoothing == 0.05
    with pytest.raises(ValueError, match="from_logits"):
        PowerGradCrossEntropy(0.3, from_logits=False)
    with pytest.raises(ValueError, match="alpha"):
        PowerGradCrossEntropy(0.0)
