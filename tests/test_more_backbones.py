"""What a sweep of keras-hub's other backbones (`benchmarks/hub_sweep.py`) found, as minimal models: an op
whose bounds it holds itself (``ops.clip`` in GPT-OSS), a ``training`` keyword passed to a sublayer whose
call takes none (DINOv2's patch convolution), a sublayer whose declared output shape misses the tuple its
call returns (ESM's rotary layer), and a layer that cannot run on the probe its declared shapes give (XLNet)."""

import warnings

import keras
import numpy as np
import pytest
from scipy import integrate, stats

import autoinit_tf
from autoinit_tf import FallbackRuleWarning, ProbeFailedError
from autoinit_tf.execute import call_stateless


def _clipped_normal_moments(lo, hi):
    """E[clip(Z)], Var clip(Z) for Z ~ N(0, 1), by scipy quadrature (independent of the rule's panels)."""
    def clip(z):
        return min(max(z, lo), hi)

    def moment(p):
        pieces = [(-np.inf, lo), (lo, hi), (hi, np.inf)]
        return sum(integrate.quad(lambda z: clip(z) ** p * stats.norm.pdf(z), a, b, epsabs=1e-13)[0] for a, b in pieces)

    m1, m2 = moment(1), moment(2)
    return m1, m2 - m1 * m1


def test_clip_reads_the_bounds_the_op_holds():
    """GPT-OSS crashed in the clip rule (IndexError): Keras' Clip op holds x_min / x_max itself and its node
    has x alone. Standard normal inputs clipped to [-0.5, 1]: the predicted mean and variance are the clipped
    normal's (quadrature), and the Dense after it lands on target on fresh inputs."""
    x = keras.Input((64,))
    y = keras.layers.Dense(8)(keras.ops.clip(x, -0.5, 1.0))
    model = keras.Model(x, y)
    _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    row = next(r for r in report.rows if "clip" in r.name)
    mean, var = _clipped_normal_moments(-0.5, 1.0)
    assert row.outputs[0].mean == pytest.approx(mean, rel=1e-6)
    assert row.outputs[0].var == pytest.approx(var, rel=1e-6)
    out = model.predict(np.random.default_rng(1).standard_normal((20000, 64)).astype("float32"), verbose=0)
    assert float(np.var(out)) == pytest.approx(float(report.output.var), rel=0.05)


def test_a_training_keyword_is_dropped_for_a_call_that_takes_none():
    """DINOv2's embeddings call their Conv2D with ``training=training``; Layer.__call__ drops it for a call
    without the argument but stateless_call passes it on (TypeError in the default wrap's replay)."""
    conv = keras.layers.Conv2D(3, 2)
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 4)).astype("float32")
    conv.build(x.shape)
    for training in (None, True, False):
        got = call_stateless(conv, [x], {"training": True}, training)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(conv(x)))


class PairScale(keras.layers.Layer):
    """Returns a pair but declares one shape (as keras-hub's ESM rotary layer inherits RotaryEmbedding's)."""

    def call(self, a, b):
        return a * 2.0, b * 0.5

    def compute_output_shape(self, input_shape):
        return input_shape


class PairBlock(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.left, self.right, self.out = keras.layers.Dense(32), keras.layers.Dense(32), keras.layers.Dense(16)
        self.pair = PairScale()

    def call(self, x):
        a, b = self.pair(self.left(x), self.right(x))
        return self.out(a + b)


def test_a_sublayer_whose_declared_shape_misses_its_tuple_output_is_walked_inside():
    """ESM2's attention fell back ('Iterating over a symbolic KerasTensor'): its rotary sublayer returns
    (q, k) but its inherited compute_output_shape gives one shape. While tracing, the structure the call
    returns wins: the block is walked inside, its three Dense kernels drawn, and the predicted output
    variance is the measured one."""
    x = keras.Input((24,))
    model = keras.Model(x, PairBlock()(x))
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert not report.fallbacks
    kernels = [v for v in model.weights if v.path.endswith("kernel")]
    assert len(kernels) == 3 and all(not np.array_equal(before[v.path], v.numpy()) for v in kernels)
    out = model.predict(np.random.default_rng(2).standard_normal((20000, 24)).astype("float32"), verbose=0)
    assert float(np.var(out)) == pytest.approx(float(report.output.var), rel=0.06)


class RunsAtSevenOnly(keras.layers.Layer):
    """Cannot be traced (reads its input as NumPy) and fails on the probe's length (32), as XLNet's attention
    fails on the (None, 1, hidden) its relative encoding declares."""

    def build(self, input_shape):
        self.dense = keras.layers.Dense(8)
        self.dense.build(input_shape)

    def call(self, x):
        if keras.ops.convert_to_numpy(x).shape[1] != 7:
            raise RuntimeError("runs at length 7 only")
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (8,)


def test_a_layer_that_fails_on_its_probe_is_named_and_nothing_changes():
    x = keras.Input((None, 8))
    model = keras.Model(x, keras.layers.Dense(4)(RunsAtSevenOnly(name="seven_only")(keras.layers.Dense(8)(x))))
    before = [np.array(v.numpy()) for v in model.weights]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackRuleWarning)
        with pytest.raises(ProbeFailedError, match=r"seven_only.*RunsAtSevenOnly.*runs at length 7 only.*register_rule"):
            autoinit_tf.wrap(model, seed=0, calibrate=None)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.weights))


class Experts(keras.layers.Layer):
    """Mixture-of-experts feed-forward with its kernels as raw weights, as keras-hub's Mixtral, Qwen-MoE and
    GPT-OSS hold them: ``einsum("th,ehm->etm", x, w_in)``, ReLU, ``einsum("etm,emh->eth", h, w_out)``."""

    def __init__(self, experts=4, hidden=24, width=48, **kwargs):
        super().__init__(**kwargs)
        self.experts, self.hidden, self.width = experts, hidden, width

    def build(self, input_shape):
        self.w_in = self.add_weight(shape=(self.experts, self.hidden, self.width), initializer="glorot_uniform")
        self.w_out = self.add_weight(shape=(self.experts, self.width, self.hidden), initializer="glorot_uniform")

    def call(self, x):
        h = keras.ops.relu(keras.ops.einsum("th,ehm->etm", x, self.w_in))
        return keras.ops.einsum("etm,emh->eth", h, self.w_out)

    def compute_output_shape(self, input_shape):
        return (self.experts, input_shape[0], self.hidden)


def test_expert_kernels_read_by_raw_einsums_are_drawn():
    """Was: Mixtral's, Qwen-MoE's and GPT-OSS's expert kernels (56-78% of the kernels) were kept at keras-hub's
    init, warned about as read by raw ops, expert outputs at variance e^-4.9 to e^-13. Now an einsum of the
    signal with such a weight is a linear map drawn as AutoInit draws a Dense kernel: both expert kernels
    change, nothing is left untouched, and the predicted output variance is the measured one."""
    x = keras.Input((24,))
    y = Experts(name="experts")(keras.layers.Dense(24)(x))
    model = keras.Model(x, y)
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackRuleWarning)
        _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert not report.untouched
    for name in ("w_in", "w_out"):
        v = getattr(model.get_layer("experts"), name)
        assert not np.array_equal(before[v.path], v.numpy())
    out = model.predict(np.random.default_rng(3).standard_normal((8192, 24)).astype("float32"), verbose=0)
    assert float(np.var(out)) == pytest.approx(float(report.output.var), rel=0.06)
    assert float(report.output.var) == pytest.approx(1.0, rel=0.05)


def _predicted_and_measured(model, shape, n=4096, seed=0):
    _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    z = np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype("float32")
    return float(report.output.var), float(np.var(model.predict(z, verbose=0)))


@pytest.mark.parametrize("case", ["grouped_strided", "grouped_5x5", "depthwise_small_map", "conv_small_map"])
def test_zero_padding_then_a_valid_convolution_reads_the_border(case):
    """The zeros a ZeroPadding puts on a small map's border are read in position-dependent numbers by the
    windows of a valid convolution after it. Were: a grouped Conv2D (keras-hub's MobileNetV3 depthwise
    stages, ``groups=channels``) had no element maps (1.34x, 1.66x measured against predicted); a padding
    of an input with per-channel moments only used the pooled fraction of real entries (1.97x on a 4x4 map
    padded by 2, 1.43x for a stride-2 conv on a 6x6 map padded by 1)."""
    L = keras.layers
    if case == "grouped_strided":
        shape, build = (8, 8, 8), lambda x: L.Conv2D(8, 3, strides=2, groups=8)(L.ZeroPadding2D(1)(x))
    elif case == "grouped_5x5":
        shape, build = (8, 8, 8), lambda x: L.Conv2D(8, 5, groups=8)(L.ZeroPadding2D(2)(L.ReLU()(L.Conv2D(8, 1)(x))))
    elif case == "depthwise_small_map":
        shape, build = (4, 4, 8), lambda x: L.DepthwiseConv2D(5)(L.ZeroPadding2D(2)(x))
    else:
        shape, build = (6, 6, 8), lambda x: L.Conv2D(8, 3, strides=2)(L.ZeroPadding2D(1)(x))
    x = keras.Input(shape)
    predicted, measured = _predicted_and_measured(keras.Model(x, build(x)), shape)
    assert measured == pytest.approx(predicted, rel=0.03)


def test_global_average_of_images_of_unknown_size():
    """keras-hub's vision backbones declare images (None, None, 3). Global average pooling read the unknown
    size as one position and passed the whole variance through (hub EfficientNet's first squeeze-and-excite:
    pooled variance predicted 0.31, measured 0.0005; its expand conv at e^-2.7 after wrap). Unknown sizes are
    now the probe's (`graph.concrete_shapes`), where calibration and the probe run: the Dense after the
    pooling lands where predicted on images of that size."""
    from autoinit_tf import declared

    L = keras.layers
    x = keras.Input((None, None, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x)))
    model = keras.Model(x, L.Dense(8)(L.GlobalAveragePooling2D()(h)))
    size = declared.DEFAULT_PROBE_LENGTH
    _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    z = np.random.default_rng(4).standard_normal((512, size, size, 3)).astype("float32")
    measured = float(np.var(keras.ops.convert_to_numpy(model(z, training=True))))
    assert measured == pytest.approx(float(report.output.var), rel=0.1)


class RawSqueezeExcite(keras.layers.Layer):
    """keras-hub MobileNetV3's squeeze-and-excitation, written with raw ops: ``ops.mean`` over the spatial
    axes and ``inputs * gate``."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.reduce = keras.layers.Conv2D(channels // 4, 1, activation="relu")
        self.expand = keras.layers.Conv2D(channels, 1, activation="hard_sigmoid")

    def call(self, x):
        return x * self.expand(self.reduce(keras.ops.mean(x, axis=(1, 2), keepdims=True)))


def _se_model(raw):
    L = keras.layers
    x = keras.Input((8, 8, 16))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x)))
    if raw:
        h = RawSqueezeExcite(16, name="se")(h)
    else:
        g = L.Reshape((1, 1, 16))(L.GlobalAveragePooling2D()(h))
        g = L.Conv2D(16, 1, activation="hard_sigmoid")(L.Conv2D(4, 1, activation="relu")(g))
        h = L.Multiply()([h, g])
    return keras.Model(x, L.Conv2D(16, 1, name="after")(h))


def test_raw_spatial_mean_and_gate_are_a_squeeze_and_excitation():
    """Was: a raw ``ops.mean`` over the spatial axes shrank only the within part by the count (no positions'
    correlation, no shared part), and a raw ``x * gate`` was not seen as a per-example gate, so the default
    wrap calibrated nothing after it (keras-hub MobileNetV3: auto 0, SE expand convs 1.5x off). Now the raw
    mean is a global average pooling (the same prediction as the layer's) and the product marks the layers
    after it for calibration."""
    rows = {}
    for raw in (False, True):
        keras.backend.clear_session()
        model = _se_model(raw)
        _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
        pooled = next(r for r in report.rows if r.type in ("Mean", "GlobalAveragePooling2D"))
        rows[raw] = pooled.outputs[0]
        if raw:
            z = np.random.default_rng(6).standard_normal((2048, 8, 8, 16)).astype("float32")
            h = keras.Model(model.inputs, model.get_layer("se").input)(z, training=True)
            measured = float(np.var(np.mean(keras.ops.convert_to_numpy(h), axis=(1, 2))))
            assert measured == pytest.approx(rows[raw].var, rel=0.1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, report = autoinit_tf.wrap(model, seed=0, return_report=True)
            assert "after" in report.auto_calibrated
    assert rows[True].mean == pytest.approx(rows[False].mean, rel=1e-9)
    assert rows[True].var == pytest.approx(rows[False].var, rel=1e-9)


class WeightTimesSignal(keras.layers.Layer):
    """``self.weight * x`` with the variable on the left, as keras-hub's T5LayerNorm writes its scale."""

    def build(self, input_shape):
        self.weight = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.dense = keras.layers.Dense(16)
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(self.weight * x)


def test_variable_times_symbolic_tensor_is_traced():
    """T5's layer norms fell back ('A KerasTensor cannot be used as input to a TensorFlow function'): Keras'
    Variable computes ``variable * x`` on its value with the backend. While tracing it defers to the symbolic
    tensor's reflected operator (a keras.ops multiply): the layer is walked inside, its Dense drawn, and the
    prediction is the measured variance."""
    x = keras.Input((24,))
    model = keras.Model(x, WeightTimesSignal(name="scaled")(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert not report.fallbacks
    assert any(r.name.endswith("dense") and r.weighted for r in report.rows)
    out = model.predict(np.random.default_rng(7).standard_normal((8192, 24)).astype("float32"), verbose=0)
    assert float(np.var(out)) == pytest.approx(float(report.output.var), rel=0.05)
    assert (keras.Variable(np.ones(3, dtype="float32")) * 2.0).shape == (3,)  # restored after tracing


def test_attention_scores_masked_by_where_with_a_sink_column():
    """keras-hub's GPT-OSS masks its scores with ``where(mask, scores, -1e9)``, joins a sink column, subtracts
    the row max and drops the sink after the softmax. Were: the where mixed the -1e9 fill into the logits'
    moments (variance 2.5e17), the softmax came out one-hot, and the output projection landed at 0.01 of its
    target (GPT-OSS: e^-4.75). Now the fill is a mask (`Moments.visible`, as an additive mask), the sink
    column a visible key, the row-max shift a shift, and the slice of the weights still attention weights."""
    from keras import ops

    T, C = 32, 32
    x = keras.Input((T, C), name="tokens")
    mask = keras.Input((T,), dtype="int32", name="padding_mask")
    h = keras.layers.LayerNormalization()(x)
    q, k, v = (keras.layers.Dense(C, name=n)(h) for n in ("q", "k", "v"))
    logits = ops.einsum("bqc,bkc->bqk", q, k) / np.sqrt(C)
    cond = ops.logical_and(ops.greater(mask[:, None, :], 0), ops.cast(ops.tril(ops.ones((T, T))), "bool")[None])
    joined = ops.concatenate([ops.where(cond, logits, -1e9), ops.zeros_like(logits[..., :1])], axis=-1)
    joined = joined - ops.stop_gradient(ops.max(joined, axis=-1, keepdims=True))
    weights = ops.softmax(joined, axis=-1)[..., :-1]
    model = keras.Model([x, mask], keras.layers.Dense(C, name="proj")(ops.einsum("bqk,bkc->bqc", weights, v)))
    _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    where = next(r for r in report.rows if r.type == "Where")
    assert where.outputs[0].var < 10.0
    z = np.random.default_rng(8).standard_normal((2048, T, C)).astype("float32")
    y = model.predict({"tokens": z, "padding_mask": np.ones((2048, T), "int32")}, verbose=0)
    assert float(np.var(y)) == pytest.approx(float(report.output.var), rel=0.15)
