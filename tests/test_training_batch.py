"""Calibration takes BatchNormalization's statistics over chunks of the training batch size
(`wrap(training_batch_size=...)`, `signal_replay.SignalReplay(statistics_batch=...)`): behind per-example
gates a layer's variance depends on the batch BN normalizes over, and calibration targets the batches
training will see. Checked against Keras' own BatchNormalization run chunk by chunk and against the
model measured in batches of that size."""

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import graph
from autoinit_tf.rules.builtin import register_builtin_rules
from autoinit_tf.signal_replay import SignalReplay


def _bn_model():
    inp = keras.Input((5, 4, 3))
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    model = keras.Model(inp, bn(inp))
    bn.gamma.assign(np.array([0.5, 2.0, 1.5], np.float32))
    bn.beta.assign(np.array([0.1, -0.2, 0.3], np.float32))
    # 70 examples (two chunks of 32 and a shorter one of 6), each with its own scale
    x = np.random.default_rng(0).standard_normal((70, 5, 4, 3)).astype(np.float32)
    return model, bn, x * np.arange(1, 71, dtype=np.float32)[:, None, None, None]


def test_chunked_batch_norm_equals_keras_batch_norm_on_each_chunk():
    register_builtin_rules()
    model, bn, x = _bn_model()
    replay = SignalReplay(graph.as_functional(model), training=True, statistics_batch=32)
    got = keras.ops.convert_to_numpy(replay._chunked_call(bn, (keras.ops.convert_to_tensor(x),), {}))
    ref = np.concatenate([keras.ops.convert_to_numpy(bn(x[a:a + 32], training=True)) for a in range(0, 70, 32)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    whole = keras.ops.convert_to_numpy(bn(x, training=True))
    assert np.abs(got - whole).max() > 0.1  # the chunks' statistics differ from the whole batch's


def test_chunked_batch_norm_on_the_moving_statistics_chunks_equals_keras():
    """The replay measures the moving statistics first and hands their per-chunk moments to the chunked
    call (not computed twice): the output is still Keras' BatchNormalization chunk by chunk."""
    register_builtin_rules()
    model, bn, x = _bn_model()
    replay = SignalReplay(graph.as_functional(model), training=True, statistics_batch=32, moving_statistics=True)
    t = keras.ops.convert_to_tensor(x)
    moments = replay._measure_moving_statistics(bn, (t,), {})
    assert moments is not None
    got = keras.ops.convert_to_numpy(replay._chunked_call(bn, (t,), {}, moments))
    ref = np.concatenate([keras.ops.convert_to_numpy(bn(x[a:a + 32], training=True)) for a in range(0, 70, 32)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_moving_statistics_average_the_chunks_statistics():
    register_builtin_rules()
    model, bn, x = _bn_model()
    replay = SignalReplay(graph.as_functional(model), training=True, statistics_batch=32, moving_statistics=True)
    replay._measure_moving_statistics(bn, (keras.ops.convert_to_tensor(x),), {})
    mean = keras.ops.convert_to_numpy(replay.values[id(bn.moving_mean)])
    var = keras.ops.convert_to_numpy(replay.values[id(bn.moving_variance)])
    chunks = [x[a:a + 32].reshape(-1, 3).astype(np.float64) for a in range(0, 70, 32)]
    weights = np.array([len(c) for c in chunks], dtype=np.float64) / (5 * 4 * 70)
    np.testing.assert_allclose(mean, sum(w * c.mean(0) for w, c in zip(weights, chunks)), rtol=1e-5)
    np.testing.assert_allclose(var, sum(w * c.var(0) for w, c in zip(weights, chunks)), rtol=1e-5)


def _gated_model():
    """A per-example log-normal scale before BatchNormalization: what follows depends on the batch size."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((16,))
    scale = keras.layers.Dense(1, activation="exponential")(inp)
    h = keras.layers.BatchNormalization()(keras.layers.Multiply()([inp, scale]))
    out = keras.layers.Dense(8, name="head")(keras.layers.Activation("tanh")(h))
    return keras.Model(inp, out)


def _head_variance(model, batch, n=16384):
    x = np.random.default_rng(5).standard_normal((n, 16)).astype(np.float32)
    y = np.concatenate([keras.ops.convert_to_numpy(model(x[a:a + batch], training=True)) for a in range(0, n, batch)])
    return float(y.astype(np.float64).var())


@pytest.mark.parametrize("training_batch_size,measured_batch", [(8, 8), (None, 4096)])
def test_calibration_targets_the_training_batch(training_batch_size, measured_batch):
    model = _gated_model()
    autoinit_tf.wrap(model, seed=0, calibrate="probe", training_batch_size=training_batch_size)
    assert _head_variance(model, measured_batch) == pytest.approx(1.0, rel=0.06)
    # the other batch size sees about half or twice that: the batch size is part of what is calibrated
    other = 4096 if measured_batch == 8 else 8
    assert abs(np.log(_head_variance(model, other))) > 0.5


def test_cli_passes_the_training_batch_size(tmp_path):
    pytest.importorskip("tensorflow")
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    model = _gated_model()
    model.save(tmp_path / "gated.keras")
    out = tmp_path / "out.keras"
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "gated.keras"), str(out), "--calibrate", "probe",
                                 "--training-batch-size", "8", "--seed", "0", "-q"])
    assert r.exit_code == 0, r.output
    back = keras.saving.load_model(out, compile=False)
    assert _head_variance(back, 8) == pytest.approx(1.0, rel=0.06)


def test_a_frozen_batch_norm_is_not_chunked():
    """Keras runs a BatchNormalization with trainable=False in inference mode even in training: the replay
    calls it as it is (its moving statistics), whatever the chunk size."""
    register_builtin_rules()
    model, bn, x = _bn_model()
    bn.moving_mean.assign(np.array([0.5, -1.0, 2.0], np.float32))
    bn.moving_variance.assign(np.array([4.0, 9.0, 0.25], np.float32))
    bn.trainable = False
    replay = SignalReplay(graph.as_functional(model), training=True, statistics_batch=32)
    assert not replay._in_chunks(bn, (keras.ops.convert_to_tensor(x),))
    got = keras.ops.convert_to_numpy(replay.run(x))
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(bn(x, training=True)), rtol=1e-5, atol=1e-5)
