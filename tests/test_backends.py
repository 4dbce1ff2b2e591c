"""The same walker/rule tests under KERAS_BACKEND=jax, and wrap inside a tf.distribute strategy. The other
backend reruns are files of their own (`test_backends_*.py`): each takes minutes, and with `--dist loadfile`
a file is one unit of work, so in one file they ran one after another on one worker."""

import textwrap

import pytest

from backend_rerun import rerun_core, run_python


def test_core_tests_pass_on_jax_backend():
    rerun_core("jax", "jax", ["tests/test_moments.py", "tests/test_rules_monte_carlo.py", "tests/test_wrap.py",
                               "tests/test_tracing.py", "tests/test_probe_inputs.py",
                               "tests/test_reversible_embedding.py", "tests/test_spatial_correlation.py",
                               "tests/test_attention_masks.py", "tests/test_attention_coupling.py"],
               extra=["-x"])


def test_wrap_inside_mirrored_strategy_then_fit():
    pytest.importorskip("tensorflow")
    code = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np, autoinit_tf
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inp = keras.Input((8,))
            x = keras.layers.Dense(16, activation="relu")(inp)
            model = keras.Model(inp, keras.layers.Dense(1)(x))
            model.compile(optimizer="sgd", loss="mse")
            autoinit_tf.wrap(model, seed=0)
        tf_var = model.layers[1].kernel.value
        values = [v.numpy() for v in tf_var.values]
        assert len(values) == 2 and np.array_equal(values[0], values[1]), "replicas diverged"
        h = model.fit(np.random.rand(64, 8), np.random.rand(64, 1), epochs=2, batch_size=16, verbose=0)
        assert np.isfinite(h.history["loss"]).all()
        print("OK", strategy.num_replicas_in_sync)
    """)
    proc = run_python(code, {"KERAS_BACKEND": "tensorflow"}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "OK 2" in proc.stdout
