"""SignalMonitor: one value per node per measured epoch, in logs and TensorBoard."""

import glob

import keras
import numpy as np
import pytest

import autoinit_tf


def _fit(callback, epochs=3):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="d1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="d2")(h))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    hist = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[callback])
    return model, hist


@pytest.mark.core
def test_signal_monitor_logs_and_tensorboard(tmp_path):
    x = np.random.default_rng(1).standard_normal((32, 6)).astype("float32")
    mon = autoinit_tf.SignalMonitor(x, log_dir=str(tmp_path))
    model, hist = _fit(mon)
    names = ["d1", "bn", "d2"]
    for n in names:
        assert len(hist.history[f"signal_var/{n}"]) == 3
    assert sorted(mon.history) == [0, 1, 2] and all(sorted(v) == sorted(names) for v in mon.history.values())
    # the last value is the signal of the trained model
    final = autoinit_tf.measure(model, x)
    assert hist.history["signal_var/d2"][-1] == pytest.approx(final["d2"].outputs[0].var, rel=1e-5)
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


@pytest.mark.core
def test_signal_monitor_every_n_epochs():
    mon = autoinit_tf.SignalMonitor(None, every_n_epochs=2, to_logs=False)
    _, hist = _fit(mon, epochs=5)
    assert sorted(mon.history) == [0, 2, 4]
    assert not any(k.startswith("signal_var/") for k in hist.history)
    with pytest.raises(ValueError):
        autoinit_tf.SignalMonitor(None, every_n_epochs=0)
