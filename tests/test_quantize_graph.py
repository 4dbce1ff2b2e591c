"""quantize.prepare / convert / `autoinit-tf quantize`: BatchNorm folding (TorchFold) against a NumPy
reference in inference and training mode, fake-quant placement per graph level, the EMA observer, the input
model untouched, `.keras` round trips and `fit` on every method, and the TFLite int8 model against the QAT
model it came from."""

import hashlib
import os
import warnings

import numpy as np
import pytest

import keras

from autoinit_tf import quantize
from autoinit_tf.quantize import FakeQuant, QuantizedLayer, prepare, quantizers_of

pytestmark = pytest.mark.core

TF = keras.backend.backend() == "tensorflow"


def _residual_net(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(i)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    s = h
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.SeparableConv2D(8, 3, padding="same")(h)
    h = keras.layers.Add()([h, s])
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    o = keras.layers.Dense(4)(h)
    model = keras.Model(i, o)
    _randomize_bn(model, seed)
    return model


def _randomize_bn(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.3, c),
                               rng.uniform(0.3, 2.0, c)])


def _np(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def _x(n=32, seed=1, shape=(10, 10, 3)):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype("float32")


def _observe(qat, on=True):
    acts, weights = quantizers_of(qat)
    for a in acts:
        if on:
            a.start_observing()
        else:
            a.finish_observing()
    for w in weights:
        w.observing = on


def test_folding_is_exact_with_quantization_off():
    model, x = _residual_net(), _x()
    qat = prepare(model, "tensorrt", 8, "minmax", data=x)
    acts, weights = quantizers_of(qat)
    folded = [w for w in weights if w.batch_norm is not None]
    assert len(folded) == 2  # conv+BN and depthwise+BN; the separable conv is followed by Add
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers)
    _observe(qat, True)
    np.testing.assert_allclose(_np(qat(x, training=False)), _np(model(x, training=False)),
                               rtol=1e-4, atol=1e-5)
    _observe(qat, False)


def _dense_bn(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((5,))
    h = keras.layers.Dense(6)(i)
    o = keras.layers.BatchNormalization(epsilon=1e-3)(h)
    model = keras.Model(i, o)
    rng = np.random.default_rng(seed)
    model.layers[1].set_weights([rng.normal(size=(5, 6)), rng.normal(size=6)])
    _randomize_bn(model, seed)
    return model


def _numpy_dense_bn(model, x, qat, training):
    """TorchFold by hand: the input's symmetric narrow grid, W f per channel on [-127, 127], then
    BN(x^ @ Q(W f) / f + b) with the batch's or the moving statistics."""
    (fq,), (wrapper,) = quantizers_of(qat)
    w, b = (np.asarray(v, np.float64) for v in model.layers[1].get_weights())
    gamma, beta, mu, var = (np.asarray(v, np.float64) for v in model.layers[2].get_weights())
    s_in = np.abs(x).max() / 127.0  # calibrated on x itself: max |x| / ((127 - (-127)) / 2)
    assert fq.grid()[0] == pytest.approx(s_in, rel=1e-5)
    xq = np.clip(np.round(x / s_in), -127, 127) * s_in
    f = gamma / np.sqrt(var + 1e-3)
    wf = w * f
    s = np.abs(wf).max(axis=0) / 127.0
    wq = np.clip(np.round(wf / s), -127, 127) * s
    y0 = xq @ wq / f + b
    if training:
        m, v = y0.mean(axis=0), y0.var(axis=0)
        return (y0 - m) / np.sqrt(v + 1e-3) * gamma + beta
    return xq @ wq + beta + (b - mu) * f


def test_dense_bn_fold_inference_and_training_match_numpy():
    model, x = _dense_bn(), _x(64, shape=(5,))
    qat = prepare(model, "tensorrt", 8, "minmax", data=x)
    want = _numpy_dense_bn(model, x.astype(np.float64), qat, training=False)
    np.testing.assert_allclose(_np(qat(x, training=False)), want, rtol=2e-4, atol=2e-4)
    (_,), (wrapper,) = quantizers_of(qat)
    mu_before = _np(wrapper.batch_norm.moving_mean).copy()
    want = _numpy_dense_bn(model, x.astype(np.float64), qat, training=True)
    got = _np(qat(x, training=True))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    # BN in training mode updates its own moving statistics (the QAT model's, not the input model's)
    assert not np.allclose(_np(wrapper.batch_norm.moving_mean), mu_before)
    np.testing.assert_array_equal(_np(model.layers[2].moving_mean), mu_before)


def _consumers_of_quantizers(qat):
    kinds = set()
    for layer in qat.layers:
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                if isinstance(t._keras_history.operation, FakeQuant):
                    kinds.add(type(layer).__name__)
    return kinds


def test_graph_levels_and_signedness():
    model, x = _residual_net(), _x()
    academic = prepare(model, "academic", 8, "minmax", data=x)
    assert _consumers_of_quantizers(academic) == {"QuantizedLayer"}
    acts, _ = quantizers_of(academic)
    for fq in acts:  # adaptive signedness: the grids after a ReLU are unsigned
        producer = fq._inbound_nodes[0].input_tensors[0]._keras_history.operation
        after_relu = isinstance(producer, keras.layers.ReLU) or getattr(
            getattr(producer, "activation", None), "__name__", "") == "relu"
        assert (fq.q_min == 0) == after_relu, fq.name
    tensorrt = prepare(model, "tensorrt", 8, "minmax", data=x)
    assert _consumers_of_quantizers(tensorrt) == {"QuantizedLayer", "Add", "MaxPooling2D",
                                                 "GlobalAveragePooling2D"}
    assert all(fq.q_min == -127 and fq.q_max == 127 for fq in quantizers_of(tensorrt)[0])  # narrow, signed
    tvm = prepare(model, "tvm", 8, "minmax", data=x)
    assert {"ReLU", "Activation", "Add", "QuantizedLayer"} <= _consumers_of_quantizers(tvm)
    assert isinstance(tvm.outputs[0]._keras_history.operation, FakeQuant)  # level 3: the output too
    s, _ = quantizers_of(tvm)[0][0].grid()
    assert np.log2(s) == pytest.approx(round(np.log2(s)))  # power-of-two scales


def test_input_model_untouched_and_nothing_shared():
    model, x = _residual_net(), _x()
    before = [np.array(v) for v in model.weights]
    qat = prepare(model, "tensorrt", 4, "lsq", data=x)
    assert not {id(v) for v in model.weights} & {id(v) for v in qat.weights}
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    qat.fit(x, np.ones((len(x), 4)), epochs=1, batch_size=16, verbose=0)
    for a, v in zip(before, model.weights):
        np.testing.assert_array_equal(a, np.array(v))


@pytest.mark.parametrize("method", ["lsq", "minmax", "pact", "dorefa"])
def test_fit_save_reload(tmp_path, method):
    model, x = _residual_net(), _x()
    y = np.random.default_rng(2).normal(size=(len(x), 4)).astype("float32")
    qat = prepare(model, "snpe" if method == "lsq" else "tensorrt", 4, method, data=x)
    # Adam moves every parameter by about lr per step: LSQ's small scales need a small rate
    qat.compile(keras.optimizers.Adam(1e-3), "mse")
    trainable = {v.path: np.array(v) for v in qat.trainable_weights}
    history = qat.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    moved = [p for p, v in trainable.items() if not np.array_equal(v, np.array(
        next(w for w in qat.trainable_weights if w.path == p)))]
    assert any("kernel" in p for p in moved)
    if method in ("lsq", "pact"):  # the quantizers' own parameters learn too
        assert any(p.endswith(("scale", "alpha", "lower", "zero_point")) for p in moved)
    path = tmp_path / "qat.keras"
    qat.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(again.predict(x, verbose=0)), np.asarray(qat.predict(x, verbose=0)))


def test_ema_observer():
    fq = FakeQuant(bits=8, method="minmax")
    x1, x2 = _x(8, 3, (4,)), 3 * _x(8, 4, (4,))
    fq(x1, training=True)  # the first batch sets the range
    assert float(fq.range_min) == pytest.approx(x1.min(), rel=1e-6)
    fq(x2, training=True)
    assert float(fq.range_max) == pytest.approx(0.9 * x1.max() + 0.1 * x2.max(), rel=1e-5)
    assert float(fq.range_min) == pytest.approx(0.9 * x1.min() + 0.1 * x2.min(), rel=1e-5)
    before = float(fq.range_max)
    fq(10 * x2, training=False)  # inference leaves the range alone
    assert float(fq.range_max) == before


def test_layers_without_quantized_form_warn():
    i = keras.Input((6, 6, 2))
    h = keras.layers.Conv2DTranspose(3, 3)(i)
    o = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(i, o)
    with pytest.warns(quantize.QuantizationWarning, match="conv2d_transpose"):
        qat = prepare(model, "academic", 8, "minmax", data=_x(8, shape=(6, 6, 2)))
    assert sum(isinstance(layer, QuantizedLayer) for layer in qat.layers) == 1


def test_probe_calibration_warns():
    with pytest.warns(quantize.QuantizationWarning, match="data="):
        prepare(_dense_bn(), "academic", 8, "minmax")


# --------------------------------------------------------------------------------------------------
# the integer model (TensorFlow backend)
# --------------------------------------------------------------------------------------------------
needs_tf = pytest.mark.skipif(not TF, reason="TFLite conversion runs on the TensorFlow backend")


@needs_tf
@pytest.mark.parametrize("preset,method", [("tensorrt", "lsq"), ("academic", "minmax"), ("tvm", "minmax")])
def test_integer_model_matches_qat(preset, method):
    model, x = _residual_net(), _x(64)
    qat = prepare(model, preset, 8, method, data=x)
    q_out = np.asarray(qat.predict(x, verbose=0))
    # the export graph (TensorFlow's fake-quant ops) computes what the QAT model computes
    e_out = np.asarray(quantize.export_model(qat)(x))
    step = np.abs(q_out).max() / 127
    assert np.abs(e_out - q_out).max() <= 2 * step
    integer = quantize.convert(qat, data=x)
    types = integer.tensor_types()
    assert types.get("int8", 0) >= 12 and types.get("float32", 0) <= 6  # float only at the model's edges
    ops_ = integer.op_types()
    assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= set(ops_) or not ops_
    i_out = integer.predict(x)
    assert np.abs(i_out - q_out).max() <= 0.05 * np.abs(q_out).max()
    assert (i_out.argmax(1) == q_out.argmax(1)).mean() >= 0.9


@needs_tf
def test_asymmetric_weights_are_stated(tmp_path):
    model, x = _residual_net(), _x(32)
    qat = prepare(model, "fbgemm", 8, "minmax", data=x)
    with pytest.warns(quantize.QuantizationWarning, match="asymmetric weight grid"):
        integer = quantize.convert(qat, data=x)
    assert integer.notes and integer.predict(x).shape == (32, 4)
    integer.save(tmp_path / "m.tflite")
    with pytest.raises(FileExistsError):
        integer.save(tmp_path / "m.tflite")


@pytest.mark.skipif(TF, reason="the error is for the other backends")
def test_convert_needs_tensorflow():
    qat = prepare(_dense_bn(), "academic", 8, "minmax", data=_x(8, shape=(5,)))
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow"):
        quantize.convert(qat)


@needs_tf
def test_cli_quantize(tmp_path):
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    model, x = _residual_net(), _x(32)
    src = tmp_path / "m.keras"
    model.save(src)
    np.save(tmp_path / "calib.npy", x)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    run = CliRunner().invoke
    res = run(cli, ["quantize", str(src), "--data", str(tmp_path / "calib.npy"), "--preset", "tensorrt"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.int8.tflite"
    assert out.exists() and "int8 tensors" in res.output
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    res = run(cli, ["quantize", str(src), "--data", str(tmp_path / "calib.npy")])
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = run(cli, ["quantize", str(src), str(tmp_path / "other.tflite"), "--qat"])
    assert res.exit_code == 1 and "not a model from" in res.output
    integer = quantize.IntegerModel(out.read_bytes())
    want = np.asarray(model.predict(x, verbose=0))
    assert (integer.predict(x).argmax(1) == want.argmax(1)).mean() >= 0.9
    qat = prepare(model, "tensorrt", 8, "lsq", data=x)
    qat.save(tmp_path / "qat.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(cli, ["quantize", str(tmp_path / "qat.keras"), "--qat", "--data", str(tmp_path / "calib.npy")])
    assert res.exit_code == 0, res.output
    assert os.path.exists(tmp_path / "qat.int8.tflite")


@needs_tf
def test_keras_application_qat_reload_and_int8(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=5, alpha=0.35)
    x = _x(32, shape=(32, 32, 3))
    qat = prepare(model, "tensorrt", 8, "lsq", data=x)
    acts, weights = quantizers_of(qat)
    assert len(weights) == sum(isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                                  keras.layers.Dense)) for layer in model.layers)
    assert sum(w.batch_norm is not None for w in weights) == sum(
        isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)  # every BN folded
    path = tmp_path / "mobilenet_qat.keras"
    qat.save(path)
    again = keras.models.load_model(path)
    q_out = _np(qat(x, training=False))
    np.testing.assert_allclose(_np(again(x, training=False)), q_out, rtol=1e-5, atol=1e-6)
    integer = quantize.convert(again, data=x)
    i_out = integer.predict(x)
    assert np.abs(i_out - q_out).max() <= 0.1 * np.abs(q_out).max()


def test_nested_models_are_flattened_and_inner_layers_named():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, keras.layers.Dense(5, activation="relu")(inner_in), name="inner")
    i = keras.Input((6,))
    h = inner(i)
    a = keras.layers.MultiHeadAttention(2, 4)(keras.layers.Reshape((1, 5))(h), keras.layers.Reshape((1, 5))(h))
    o = keras.layers.Dense(3)(keras.layers.Flatten()(a))
    model = keras.Model(i, o)
    x = _x(16, shape=(6,))
    with pytest.warns(quantize.QuantizationWarning, match="MultiHeadAttention holds conv/dense layers"):
        qat = prepare(model, "academic", 8, "minmax", data=x)
    _, weights = quantizers_of(qat)
    assert sorted(w.layer.name for w in weights) == sorted([inner.layers[1].name, model.layers[-1].name])
    _observe(qat, True)
    np.testing.assert_allclose(_np(qat(x, training=False)), _np(model(x, training=False)), rtol=1e-5, atol=1e-6)
    _observe(qat, False)
