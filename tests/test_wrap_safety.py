"""`wrap` loses nothing: failures leave every variable bit-identical, bad data is refused with the right
words, mixed precision measures, unrepresentable variances are refused, WS layers standardize (the
adversarial probe's API findings)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import autoinit_tf  # noqa: E402
from autoinit_tf import formats, layers as ai_layers  # noqa: E402
from autoinit_tf.distributions import UnrepresentableVarianceError  # noqa: E402


def _snapshot(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _assert_unchanged(model, before):
    for a, v in zip(before, model.variables):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)


def _eight_inputs():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.Dense(16, activation="gelu")(h)
    return keras.Model(inp, keras.layers.Dense(3)(h))


# ------------------------------------------------------------- 5. failed calibration changes nothing
@pytest.mark.parametrize("bad", [np.ones((64, 5), "float32"), "bogus"])
def test_failed_calibration_leaves_every_variable_bit_identical(bad):
    model = _eight_inputs()
    before = _snapshot(model)
    with pytest.raises(ValueError):
        autoinit_tf.wrap(model, calibrate=bad, seed=0)
    _assert_unchanged(model, before)


def test_failure_in_the_middle_of_the_calibration_replay_changes_nothing(monkeypatch):
    import importlib

    measure = importlib.import_module("autoinit_tf.measure")  # the module (autoinit_tf.measure is also a function)
    model = _eight_inputs()
    before = _snapshot(model)
    original = measure._Replay._calibrated_call
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer was already calibrated
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(measure._Replay, "_calibrated_call", failing)
    with pytest.raises(RuntimeError, match="boom"):
        autoinit_tf.wrap(model, calibrate="probe", seed=0)
    _assert_unchanged(model, before)


def _dropout_model(dropout_seed):
    keras.utils.set_random_seed(0)  # the same weights for every call; the dropout seed is the layer's own
    inp = keras.Input((64,))
    h = keras.layers.Dense(64, activation="relu", name="d1")(inp)
    h = keras.layers.Dropout(0.5, seed=dropout_seed)(h)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(h))


def test_calibration_masks_follow_wraps_seed_not_the_dropout_layers_state():
    """The calibration replay runs in training mode, so dropout draws masks from the seed generator states it
    hands the layers. Those are replaced by states derived from wrap's seed: the head's calibrated kernel is
    the same whatever the dropout layer's own seed (Keras' per-process default without one), different for
    another wrap seed, and the layer's seed state is never assigned."""
    kernels = {}
    for dropout_seed, seed in ((1, 0), (2, 0), (1, 5)):
        model = _dropout_model(dropout_seed)
        state = next(v for v in model.non_trainable_variables if "seed_generator_state" in v.path)
        before = np.array(state.numpy())
        autoinit_tf.wrap(model, seed=seed, calibrate="probe")
        np.testing.assert_array_equal(state.numpy(), before)
        kernels[dropout_seed, seed] = model.get_layer("head").kernel.numpy()
    np.testing.assert_array_equal(kernels[1, 0], kernels[2, 0])
    assert not np.array_equal(kernels[1, 0], kernels[1, 5])


def test_calibrated_wrap_still_hits_the_target():
    model = _eight_inputs()
    autoinit_tf.wrap(model, calibrate="probe", seed=0)
    x = np.random.default_rng(1).normal(size=(4096, 8)).astype("float32")
    pre = x @ model.layers[1].kernel.numpy() + model.layers[1].bias.numpy()  # relu is fused: its input
    assert abs(np.var(pre) - 1.0) < 0.08


# ---------------------------------------------------------------------------- 6. bad data refused
def test_nan_calibration_data_refused_like_data():
    model = _eight_inputs()
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    x[3, 2] = np.nan
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf \\(1 of 512 values\\)"):
        autoinit_tf.wrap(model, calibrate=x)
    with pytest.raises(ValueError, match="NaN or inf"):
        autoinit_tf.wrap(model, data=x)
    _assert_unchanged(model, before)


def test_empty_and_complex_data_get_accurate_messages():
    model = _eight_inputs()
    with pytest.raises(ValueError, match="is empty"):
        autoinit_tf.wrap(model, data=np.zeros((0, 8), "float32"))
    with pytest.raises(ValueError, match="is complex"):
        autoinit_tf.wrap(model, data=np.ones((4, 8), "complex64") * (1 + 2j))


# ------------------------------------------------------------------------- 7. mixed precision
@pytest.fixture
def mixed(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("mixed", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_measure_and_calibrate_under_mixed_precision(mixed, tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(h))
    rep = autoinit_tf.measure(model)
    assert all(np.isfinite(r.outputs[0].var) for r in rep.rows)
    model, rep = autoinit_tf.wrap(model, calibrate="probe", return_report=True, seed=0)
    assert len(rep.calibration) == 2  # both convs calibrated
    x = np.random.default_rng(0).normal(size=(512, 8, 8, 3)).astype("float32")
    out = np.asarray(keras.ops.convert_to_numpy(model(x, training=True)), dtype=np.float64)
    assert abs(out.var() - 1.0) < 0.1  # the last conv's output is on target in its compute dtype
    path = tmp_path / "mp.keras"
    model.save(path)
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    res = CliRunner().invoke(cli, ["report", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "Incompatible type conversion" not in res.output


# ----------------------------------------------------------------------- 8. extreme variances
@pytest.mark.parametrize("kw", [dict(signal_variance=1e-300), dict(input_moments=(0.0, 1e300))])
def test_unrepresentable_variance_refused_before_assignment(kw):
    model = _eight_inputs()
    before = _snapshot(model)
    with pytest.raises(UnrepresentableVarianceError, match="float32"):
        autoinit_tf.wrap(model, **kw)
    _assert_unchanged(model, before)


def test_cli_extreme_signal_variance_is_an_error(tmp_path):
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    path = tmp_path / "m.keras"
    _eight_inputs().save(path)
    res = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "o.keras"), "--signal-variance", "1e-300"],
                             catch_exceptions=False)
    assert res.exit_code == 1 and "underflow" in res.output
    assert not (tmp_path / "o.keras").exists()


def test_small_but_representable_variance_still_works():
    model = _eight_inputs()
    autoinit_tf.wrap(model, signal_variance=1e-20, seed=0)
    assert np.all(np.isfinite(model.layers[1].kernel.numpy())) and np.std(model.layers[1].kernel.numpy()) > 0


# ----------------------------------------------------------------- 9. WS layers vs NumPy
def _np_standardized(w, gain, eps=1e-4):
    w = w.astype(np.float64)
    axes = tuple(range(w.ndim - 1))
    fan_in = int(np.prod(w.shape[:-1]))
    mean = w.mean(axis=axes, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
    return (w - mean) / np.sqrt(np.maximum(var * fan_in, eps)) * gain


def _np_conv(x, k, stride=1, causal_left=0):
    """Valid N-D correlation, channels last, stride 1 or given (NumPy reference)."""
    if causal_left:
        x = np.pad(x, [(0, 0), (causal_left, 0), (0, 0)])
    rank = k.ndim - 2
    out_sp = [(x.shape[1 + i] - k.shape[i]) // stride + 1 for i in range(rank)]
    out = np.zeros((x.shape[0], *out_sp, k.shape[-1]))
    for idx in np.ndindex(*out_sp):
        sl = tuple(slice(i * stride, i * stride + k.shape[d]) for d, i in enumerate(idx))
        patch = x[(slice(None),) + sl]
        out[(slice(None),) + idx] = np.tensordot(patch, k, axes=(list(range(1, rank + 2)), list(range(rank + 1))))
    return out


@pytest.mark.parametrize("cls, shape, kw", [
    (ai_layers.WSConv1D, (2, 9, 3), dict(filters=4, kernel_size=3)),
    (ai_layers.WSConv1D, (2, 9, 3), dict(filters=4, kernel_size=3, padding="causal")),
    (ai_layers.WSConv2D, (2, 6, 6, 3), dict(filters=4, kernel_size=3)),
    (ai_layers.WSConv3D, (1, 4, 4, 4, 2), dict(filters=3, kernel_size=2)),
])
def test_ws_convs_equal_a_numpy_standardized_convolution(cls, shape, kw):
    keras.utils.set_random_seed(0)
    layer = cls(**kw, bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    layer.gain.assign(np.linspace(0.5, 2.0, layer.filters).astype("float32"))
    y = keras.ops.convert_to_numpy(layer(x))
    k = _np_standardized(layer.kernel.numpy(), layer.gain.numpy())
    left = kw["kernel_size"] - 1 if kw.get("padding") == "causal" else 0
    ref = _np_conv(x.astype(np.float64), k, causal_left=left) + layer.bias.numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_ws_conv1d_gain_has_a_gradient():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient is taken with tf.GradientTape")
    import tensorflow as tf

    layer = ai_layers.WSConv1D(4, 3)
    x = tf.random.normal((2, 9, 3))
    layer(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    g = tape.gradient(loss, layer.gain)
    assert g is not None and float(tf.reduce_sum(tf.abs(g))) > 0


def test_ws_dense_equals_numpy():
    layer = ai_layers.WSDense(5)
    x = np.random.default_rng(0).normal(size=(3, 7)).astype("float32")
    layer(x)
    ref = x.astype(np.float64) @ _np_standardized(layer.kernel.numpy(), layer.gain.numpy()) + layer.bias.numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- smaller
def test_lambda_inside_time_distributed_is_found():
    inp = keras.Input((4, 3))
    out = keras.layers.TimeDistributed(keras.layers.Lambda(lambda t: t * 2.0, name="double"))(inp)
    config = {"class_name": "Functional", "config": keras.Model(inp, out).get_config()}
    with pytest.raises(formats.ConversionError, match="'double'"):
        formats.check_lambda(config, allow_lambda=False)


def test_groupnorm_swaps_adapt_the_default_groups_and_keep_explicit_ones_strict():
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(36, 3)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(h))
    for recipe in ("bn->groupnorm", "bn->proxynorm"):
        new = autoinit_tf.rewrite(model, [recipe])
        groups = [ly.groups for ly in new.layers if isinstance(ly, keras.layers.GroupNormalization)]
        assert groups == [18], (recipe, groups)  # the largest divisor of 36 not above 32
    from autoinit_tf.rewrite import SwapError

    with pytest.raises(SwapError, match="groups=32 does not divide"):
        autoinit_tf.rewrite(model, ["bn->groupnorm(groups=32)"])
