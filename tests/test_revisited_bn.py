"""The revisited BatchNorm initialization (Davis & Frank): `wrap(bn_gamma=...)` and the propagation after it
(against a measurement of the real network), `bn_optimizer` (one and several steps against the plain
optimizer's steps, schedule and weight decay included), `revisited_bn_init`, `with_input_batch_norm`, and
`autoinit-tf convert --bn-gamma`."""

import numpy as np
import pytest

import keras

import autoinit_tf

pytestmark = pytest.mark.core


def _bn_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(8, 3, padding="same", name="c2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


def test_wrap_bn_gamma_sets_gamma_beta_and_propagates_them():
    model = _bn_cnn()
    model, report = autoinit_tf.wrap(model, bn_gamma=0.1, seed=0, return_report=True)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        np.testing.assert_array_equal(layer.gamma.numpy(), np.full(8, 0.1, np.float32))
        np.testing.assert_array_equal(layer.beta.numpy(), np.zeros(8, np.float32))
    rows = {r.name: r for r in report.rows}
    assert rows["bn1"].outputs[0].var == pytest.approx(0.01, rel=0.01)  # gamma^2 * v / (v + eps)
    # Predicted beside measured on the wrapped network (training mode): the BN output and the layers after it.
    x = np.random.default_rng(1).normal(size=(256, 8, 8, 3)).astype("float32")
    cmp = autoinit_tf.compare(model, x, bn_gamma=0.1, seed=0)
    by_name = {r.name: r for r in cmp.rows}
    for name in ("bn1", "c2", "bn2", "head"):
        r = by_name[name]
        predicted, measured = r.outputs[0].var, r.measured[0].var
        assert measured == pytest.approx(predicted, rel=0.15), (name, predicted, measured)
    # Without bn_gamma the BN output has variance ~1: the option changes the signal, not just the weights.
    plain = {r.name: r for r in autoinit_tf.analyze(_bn_cnn(), seed=0).rows}
    assert plain["bn1"].outputs[0].var == pytest.approx(1.0, rel=0.01)


def test_wrap_bn_gamma_rejects_nonpositive_values():
    with pytest.raises(ValueError, match="bn_gamma"):
        autoinit_tf.wrap(_bn_cnn(), bn_gamma=0.0)


def test_revisited_bn_init_and_input_batch_norm():
    model = _bn_cnn()
    kernel = model.get_layer("c1").kernel.numpy().copy()
    layers = autoinit_tf.revisited_bn_init(model, gamma=0.2)
    assert [layer.name for layer in layers] == ["bn1", "bn2"]
    np.testing.assert_array_equal(model.get_layer("bn2").gamma.numpy(), np.full(8, 0.2, np.float32))
    np.testing.assert_array_equal(model.get_layer("c1").kernel.numpy(), kernel)  # nothing else changed
    wrapped = autoinit_tf.with_input_batch_norm(model, gamma=0.1)
    bn = wrapped.get_layer("input_bn_0")
    assert bn.beta is None and bn.gamma.numpy() == pytest.approx(np.full(3, 0.058))
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(bn(x, training=False), training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapped(x, training=False)), expected, rtol=1e-5, atol=1e-6)


def _one_model_pair(optimizer_fn, seed=0):
    """Two identical compiled models: one with `optimizer_fn()`, one with `bn_optimizer(optimizer_fn())`."""
    a, b = _bn_cnn(seed), _bn_cnn(seed)
    # gamma = 2^-10: float32 resolves gamma's steps (~1e-5) to 1e-5 relative (at gamma = 1 only to 1e-2).
    autoinit_tf.revisited_bn_init(a, gamma=2.0**-10)
    b.set_weights(a.get_weights())
    a.compile(optimizer=optimizer_fn(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    b.compile(optimizer=autoinit_tf.bn_optimizer(optimizer_fn(), b),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return a, b


def _delta(model, before):
    return {v.path: np.asarray(v.numpy(), np.float64) - before[v.path] for v in model.trainable_variables}


def test_bn_optimizer_gamma_step_is_exactly_a_hundredth_with_schedule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    a, b = _one_model_pair(lambda: keras.optimizers.SGD(learning_rate=schedule))
    before = {v.path: np.asarray(v.numpy(), np.float64) for v in a.trainable_variables}
    # One step: the same gradients (identical models, identical batch) in both.
    a.train_on_batch(x, y)
    b.train_on_batch(x, y)
    da, db = _delta(a, before), _delta(b, before)
    for path in da:
        if path.endswith("gamma"):
            np.testing.assert_allclose(db[path], da[path] / 100.0, rtol=1e-4, atol=1e-9)
            assert np.abs(da[path]).max() > 1e-6
        else:
            np.testing.assert_allclose(db[path], da[path], rtol=1e-4, atol=1e-9)
    # The scaled rate follows the schedule: both optimizers' step counters advanced together.
    gamma_opt = [o for o in b.optimizer.optimizers if o.name.endswith("_bn_gamma")][0]
    assert float(gamma_opt.learning_rate) == pytest.approx(0.1 * 0.5 / 100)


def test_bn_optimizer_keeps_weight_decay_off_one_dimensional_parameters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    decayed, b = _one_model_pair(lambda: keras.optimizers.SGD(0.1, weight_decay=0.5))
    plain = _bn_cnn(0)
    plain.set_weights(decayed.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {v.path: np.asarray(v.numpy(), np.float64) for v in decayed.trainable_variables}
    for m in (decayed, b, plain):
        m.train_on_batch(x, y)
    dd, db, dp = _delta(decayed, before), _delta(b, before), _delta(plain, before)
    for path in dd:
        if path.endswith("kernel"):
            np.testing.assert_allclose(db[path], dd[path], rtol=1e-4, atol=1e-9)  # kernels decay
            assert not np.allclose(dd[path], dp[path])
        elif path.endswith("gamma"):
            np.testing.assert_allclose(db[path], dp[path] / 100.0, rtol=1e-4, atol=1e-9)  # no decay, lr/100
        else:
            np.testing.assert_allclose(db[path], dp[path], rtol=1e-4, atol=1e-9)  # beta, bias: no decay


def test_bn_optimizer_errors_and_schedule_serialization():
    model = _bn_cnn()
    with pytest.raises(ValueError, match="no trainable BatchNormalization"):
        autoinit_tf.bn_optimizer("sgd", keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    from autoinit_tf.revisited_bn import ScaledSchedule

    s = ScaledSchedule(keras.optimizers.schedules.CosineDecay(0.1, 10), 0.01)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert float(restored(3)) == pytest.approx(float(s(3))) and float(s(0)) == pytest.approx(0.001)
    opt = autoinit_tf.bn_optimizer(keras.optimizers.Adam(1e-3), model)
    assert len(opt.optimizers) == 2  # no weight decay to switch off: gamma's copy and the default


def test_cli_convert_bn_gamma(tmp_path):
    pytest.importorskip("tensorflow")
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    src = tmp_path / "m.keras"
    _bn_cnn().save(src)
    out = tmp_path / "out.keras"
    r = CliRunner().invoke(cli, ["convert", str(src), str(out), "--bn-gamma", "0.1", "--seed", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "BatchNorm gamma:       0.1, beta 0 in 2 layers" in r.output
    loaded = keras.saving.load_model(out)
    np.testing.assert_array_equal(loaded.get_layer("bn2").gamma.numpy(), np.full(8, 0.1, np.float32))
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "o2.keras"), "--bn-gamma", "-1"])
    assert r.exit_code == 2 and "--bn-gamma" in r.output
