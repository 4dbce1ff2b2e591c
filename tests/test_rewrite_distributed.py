"""rewrite under a tf.distribute.MirroredStrategy of 2 logical CPUs (in a subprocess: the logical
device configuration must happen before TensorFlow initializes)."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute only")

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    from keras import layers as L
    import autoinit_tf
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        i = keras.Input((8, 8, 3))
        x = L.Conv2D(6, 3, padding="same", activation="relu", name="c1")(i)
        x = L.MaxPooling2D(name="mp")(x)
        x = L.GlobalAveragePooling2D()(x)
        m = keras.Model(i, L.Dense(2, name="out")(x))
        m.compile(optimizer="sgd", loss="mse")
    swaps = ["act:relu->ail_dup", "maxpool->strided_conv"]
    # outside the scope: the model's own strategy is entered; inside: the active one is used
    for where, new in [("outside", autoinit_tf.rewrite(m, swaps)), ("wrap", None)]:
        if new is None:
            with strategy.scope():
                new = autoinit_tf.wrap(m, swaps=swaps, seed=0)
        kinds = {type(v.value).__name__ for v in new.trainable_variables}
        assert all("Mirrored" in k or "Distributed" in k for k in kinds), (where, kinds)
        x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
        h = new.fit(x, np.zeros((8, 2), "float32"), batch_size=4, epochs=1, verbose=0)
        assert np.isfinite(h.history["loss"][0]), where
    print("MIRRORED_OK")
    """
)


def test_rewrite_under_mirrored_strategy():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert "MIRRORED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
