"""Shared checks for the paper-layer tests (imported by the test_layer_*.py modules)."""

import os

import keras
import numpy as np
import pytest

import autoinit_tf.layers as L

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="uses tf.GradientTape")


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def tf_grad(fn, *variables):
    """Gradients of the scalar fn() w.r.t. tensors/variables (TensorFlow only, tests only)."""
    import tensorflow as tf

    variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    with tf.GradientTape() as tape:
        for v in variables:
            if not isinstance(v, tf.Variable):
                tape.watch(v)
        y = fn()
    return [g.numpy() if g is not None else None for g in tape.gradient(y, list(variables))]


def tensor(a):
    import tensorflow as tf

    return tf.constant(np.asarray(a, dtype="float32"))


def numeric_grad(f, x, h=1e-5):
    """Central finite differences of the float64 scalar function f at x (array)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        xp = x.copy()
        xp[i] += h
        xm = x.copy()
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def roundtrip(model, inputs, tmp_path, atol=0.0):
    """Save to .keras, reload, compare predictions; returns the reloaded model."""
    path = os.path.join(str(tmp_path), "m.keras")
    before = model.predict(inputs, verbose=0)
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded.predict(inputs, verbose=0)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=atol, rtol=0)
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(to_np(a), to_np(b))
    return loaded


def functional(make_layer, shape):
    inp = keras.Input(shape)
    return keras.Model(inp, make_layer()(inp))


def sequential(make_layer, shape):
    return keras.Sequential([keras.Input(shape), make_layer()])


def fit_step(model, x, y, loss="mse", jit=True):
    """One compiled training step; returns the loss and checks that trainable weights moved."""
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit)
    before = [to_np(w).copy() for w in model.trainable_weights]
    hist = model.fit(x, y, batch_size=len(x[0]) if isinstance(x, (list, tuple)) else len(x), epochs=1, verbose=0)
    loss_value = hist.history["loss"][-1]
    assert np.isfinite(loss_value)
    after = [to_np(w) for w in model.trainable_weights]
    if before:
        assert any(not np.allclose(a, b) for a, b in zip(after, before)), "no trainable weight moved"
    return loss_value


def mixed_precision_finite(build_model, inputs, policy):
    """Build under a mixed policy; outputs finite and in the compute dtype; a fit step finite."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = build_model()
        out = model(inputs, training=True)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for o in outs:
            assert np.all(np.isfinite(to_np(o).astype("float32")))
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
        y = np.zeros(tuple(int(d) for d in outs[0].shape), "float32")
        hist = model.fit(inputs, y, batch_size=len(y), epochs=1, verbose=0)
        assert np.isfinite(hist.history["loss"][-1])
        return to_np(outs[0]).astype("float32")
    finally:
        keras.config.set_dtype_policy(old)


@pytest.mark.core
def test_all_layers_registered():
    for name in L.__all__:
        obj = getattr(L, name)
        if isinstance(obj, type):
            reg = keras.saving.get_registered_name(obj)
            assert reg == f"autoinit_tf>{name}", (name, reg)
            assert keras.saving.get_registered_object(reg) is obj
