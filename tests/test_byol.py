"""BYOL: the tau schedule and the loss against hand computations, LARS against the published update rule
(NumPy), the target's moving average after a real training step (it receives no gradient), the encoder
trained and returned, the collapse monitor, the augmentations."""

import warnings

import numpy as np
import pytest

import keras

from autoinit_tf.byol import BYOL, CollapseMonitor, CollapseWarning, RandomResizedCrop, byol_augmentation, \
    byol_loss, tau_schedule
from autoinit_tf.optimizers import LARS

pytestmark = pytest.mark.core


def test_tau_schedule_and_loss():
    assert tau_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert tau_schedule(100, 100, 0.996) == pytest.approx(1.0)
    assert tau_schedule(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)
    assert float(keras.ops.convert_to_numpy(tau_schedule(keras.ops.convert_to_tensor(25), 100.0, 0.99))) == \
        pytest.approx(1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2, rel=1e-6)
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    cos = np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(byol_loss(p.astype("float32"), z.astype("float32"))),
                               2 - 2 * cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_follows_the_published_rule(nesterov):
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(4, 3)), rng.normal(size=3)
    grads = [(rng.normal(size=(4, 3)), rng.normal(size=3)) for _ in range(3)]
    lr, m, wd, eta = 0.3, 0.9, 1e-2, 1e-3
    opt = LARS(lr, momentum=m, weight_decay=wd, eta=eta, nesterov=nesterov)
    w, b = keras.Variable(w0.astype("float32"), name="kernel"), keras.Variable(b0.astype("float32"), name="bias")
    rw, rb, vw, vb = w0.copy(), b0.copy(), np.zeros_like(w0), np.zeros_like(b0)
    for gw, gb in grads:
        opt.apply([gw.astype("float32"), gb.astype("float32")], [w, b])
        u = gw + wd * rw
        u = u * eta * np.linalg.norm(rw) / np.linalg.norm(u)
        vw = m * vw + u
        rw = rw - lr * ((m * vw + u) if nesterov else vw)
        vb = m * vb + gb  # rank 1: no decay, no trust ratio
        rb = rb - lr * ((m * vb + gb) if nesterov else vb)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w.value), rw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(b.value), rb, rtol=1e-5, atol=1e-6)
    again = LARS.from_config(opt.get_config())
    assert (again.eta, again.lars_weight_decay, again.momentum, again.nesterov) == (eta, wd, m, nesterov)


def _encoder(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="gap")(h), name="encoder")


def test_target_is_the_moving_average_of_the_online_network_and_gets_no_gradient():
    x = np.random.default_rng(0).random((64, 12, 12, 1)).astype("float32")
    byol = BYOL(_encoder(), projection_dim=16, hidden_dim=32, seed=0)
    byol.compile(optimizer=LARS(0.5, weight_decay=1e-4))
    before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in byol.encoder.weights]
    history = byol.fit(x, epochs=1, batch_size=16, verbose=0, total_steps=50, monitor=False)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(b, keras.ops.convert_to_numpy(v.value)) for b, v in zip(before, byol.encoder.weights))
    targets = byol.target_encoder.trainable_weights + byol.target_projector.trainable_weights
    onlines = byol.encoder.trainable_weights + byol.projector.trainable_weights
    xi = [np.array(keras.ops.convert_to_numpy(t.value), np.float64) for t in targets]
    k = int(keras.ops.convert_to_numpy(byol.ema.iterations))
    assert k == 4
    byol.train_on_batch(x[:16])
    tau = tau_schedule(k, 50, 0.996)
    for t, o, old in zip(targets, onlines, xi):
        expected = tau * old + (1 - tau) * keras.ops.convert_to_numpy(o.value)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(t.value), expected, rtol=1e-5, atol=1e-6)
    assert not any(v.path in {t.path for t in targets} for v in byol.online_variables)
    features = keras.ops.convert_to_numpy(byol(x[:3]))
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(byol.encoder(x[:3], training=False)), rtol=1e-6)


def test_collapse_monitor_warns_when_projections_collapse():
    x = np.random.default_rng(0).random((64, 12, 12, 1)).astype("float32")
    byol = BYOL(_encoder(), projection_dim=16, hidden_dim=32, seed=0)
    monitor = CollapseMonitor(x[:32], every=1, threshold=0.5)
    monitor.set_model(byol)
    monitor.on_train_begin()
    assert monitor.history[0][1] > 1e-3
    for v in byol.encoder.weights:  # a constant encoder: every image gets the same projection
        if v.path.endswith("kernel"):
            v.assign(keras.ops.zeros(v.shape))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_train_batch_end(0)
    assert monitor.history[-1][1] < 1e-2 * monitor.history[0][1]
    assert any(issubclass(w.category, CollapseWarning) for w in caught)


def test_augmentations():
    x = np.random.default_rng(0).random((6, 16, 16, 3)).astype("float32")
    for view in (1, 2):
        out = keras.ops.convert_to_numpy(byol_augmentation(view, (16, 16, 3), seed=0)(x, training=True))
        assert out.shape == x.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
        assert not np.allclose(out, x)
    identity = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(identity(x, training=True)), x, atol=1e-5)
    gray = np.random.default_rng(1).random((4, 16, 16, 1)).astype("float32")
    assert keras.ops.convert_to_numpy(byol_augmentation(2, (16, 16, 1), seed=0)(gray, training=True)).shape == gray.shape
