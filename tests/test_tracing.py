"""Walking inside subclassed layers (issue 15, item 1) and calibrate="auto" (item 5): what the analytic
pass cannot predict exactly is calibrated on a probe by default; exact models pay nothing."""

import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import FallbackRuleWarning, declared, graph, tracing

pytestmark = pytest.mark.core
L = keras.layers


class Residual(L.Layer):
    """x + Dense(relu(Dense(x))): a subclassed block of Keras layers and keras.ops."""

    def __init__(self, width, **kw):
        super().__init__(**kw)
        self.up = L.Dense(2 * width, activation="relu", name="up")
        self.down = L.Dense(width, name="down")

    def call(self, x, scale=None, training=None):
        y = self.down(self.up(x))
        if scale is not None:
            y = y * keras.ops.expand_dims(scale, -1)
        return x + y


class Stack(L.Layer):
    """Two Residual blocks (a traced block inside a traced block) and one Dense shared by both ends."""

    def __init__(self, width, **kw):
        super().__init__(**kw)
        self.first = Residual(width, name="first")
        self.second = Residual(width, name="second")
        self.mix = L.Dense(width, name="mix")

    def call(self, x):
        return self.mix(self.second(self.mix(self.first(x))))


class Causal(L.Layer):
    """Builds its mask from ops.shape(x)[0] and [1]: traceable only at concrete shapes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.attention = L.MultiHeadAttention(2, 8, name="attention")

    def call(self, x):
        n, t = keras.ops.shape(x)[0], keras.ops.shape(x)[1]
        mask = keras.ops.broadcast_to(keras.ops.tril(keras.ops.ones((t, t), dtype="int32")), (n, t, t))
        return self.attention(x, x, attention_mask=mask)


class Untraceable(L.Layer):
    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            raise TypeError("concrete tensors only")
        return 3.0 * x


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_nested_blocks_shared_sublayers_and_extra_arguments_are_walked_inside():
    inp = keras.Input((8, 16))
    scale = keras.Input((8,))
    block = Residual(16, name="block")
    stack = Stack(16, name="stack")
    out = stack(block(inp, scale=scale, training=False))
    model = keras.Model([inp, scale], out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, strict=True, return_report=True)
    names = [r.name for r in rep.rows]
    assert "block/up" in names and "block/down" in names and "block/multiply" in names
    assert "stack/first/up" in names and "stack/second/down" in names
    assert "stack/mix#0" in names and "stack/mix#1" in names  # one layer, two calls
    weighted = {v.path for v in model.weights if len(v.shape) == 2}
    assert weighted <= set(rep.assigned)  # every kernel, inside every block
    assert rep.auto_calibrated == {} and rep.calibration == {}  # exact: no calibration replay


def test_trace_names_and_counts_agree_between_the_analytic_pass_and_a_replay():
    inp = keras.Input((8, 16))
    model = keras.Model(inp, Stack(16, name="stack")(inp))
    _quiet(autoinit_tf.wrap, model, seed=0)
    rep = autoinit_tf.compare(model, seed=0, batch_size=256)
    rows = [r for r in rep.rows if r.weighted]
    assert [r.name for r in rows] == ["stack/first/up", "stack/first/down", "stack/mix#0", "stack/second/up",
                                      "stack/second/down", "stack/mix#1"]
    assert all(r.measured for r in rep.rows)  # every analytic row has its measured twin, by name
    # The first block and the shared Dense's first call are on the prediction (fresh probe, 256 x 8
    # positions). (Further on, a Dense after Dense after a ReLU block drifts: the per-unit offsets a
    # ReLU leaves are carried only pooled, a limit of the analytic pass, not of the trace.)
    for r in rows[:3]:
        assert r.measured[0].var == pytest.approx(r.outputs[0].var, rel=0.1), r.name


def test_a_call_that_needs_concrete_shapes_is_traced_at_them():
    inp = keras.Input((None, 16))
    layer = Causal(name="causal")
    model = keras.Model(inp, layer(inp))
    node = next(n for n in graph.topo_nodes(model) if n.operation is layer)
    with pytest.raises(graph.TraceError):
        graph.trace_call(node)
    tracer = tracing.CallTracer(length=12)
    view = tracer(node, None)
    assert view is not None and tuple(view.inputs[0].shape) == (tracing.RETRY_BATCH, 12, 16)
    _, rep = _quiet(autoinit_tf.wrap, model, seed=0, return_report=True)
    assert [r.name for r in rep.rows if r.weighted] == ["causal/attention"]
    # The causal mask is not modelled: the default wrap calibrates the attention on a probe.
    assert list(rep.auto_calibrated) == ["causal/attention"]
    length = declared.probe_length(model)  # the probe calibrates at the probe length
    x = np.random.default_rng(1).standard_normal((256, length, 16)).astype("float32")
    assert float(np.var(keras.ops.convert_to_numpy(model(x)))) == pytest.approx(1.0, rel=0.15)


def test_a_trace_that_reads_weights_eagerly_is_refused():
    """ops.transpose(other.kernel) in call() is computed while tracing: the view would hold the kernel
    as it was, not as this pass draws it, so the layer keeps the probe fallback (with the reason)."""

    class TiedTranspose(L.Layer):
        def __init__(self, dense, **kw):
            super().__init__(**kw)
            self.dense = dense

        def call(self, x):
            return keras.ops.matmul(x, keras.ops.transpose(self.dense.kernel))

    inp = keras.Input((8,))
    enc = L.Dense(16, name="enc")
    model = keras.Model(inp, TiedTranspose(enc, name="tied")(enc(inp)))
    with pytest.warns(FallbackRuleWarning, match="outside the symbolic graph"):
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert rep["tied"].rule == "fallback"


def test_auto_calibration_corrects_what_follows_a_probe_estimate_and_nothing_else():
    inp = keras.Input((32,))
    h = L.Dense(32, activation="tanh", name="before")(inp)
    h = Untraceable(name="opaque")(h)
    h = L.Dense(32, activation="tanh", name="after")(h)
    h = L.LayerNormalization(name="norm")(h)
    out = L.Dense(8, name="clean")(h)
    model = keras.Model(inp, out)
    _, rep = _quiet(autoinit_tf.wrap, model, seed=0, return_report=True)
    assert list(rep.auto_calibrated) == ["after"]  # LayerNormalization stops the taint
    assert "opaque" in rep.auto_calibrated["after"]
    assert list(rep.calibration) == ["after"]
    x = np.random.default_rng(2).standard_normal((8192, 32)).astype("float32")
    opaque = keras.Model(inp, model.get_layer("opaque").output)
    pre = keras.ops.convert_to_numpy(opaque(x)) @ keras.ops.convert_to_numpy(model.get_layer("after").kernel)
    assert float(np.var(pre)) == pytest.approx(1.0, rel=0.1)


def test_a_recurrent_layer_has_exact_kernels_and_an_estimated_output():
    """An LSTM's input kernel is drawn exactly for its input moments; only its state's moments come from
    a simulation on probe sequences. Fed by an Embedding, the probe is the rows of the table for uniform
    token ids (the input's exact distribution) and its sampling error is small: nothing is calibrated, and
    the Dense after it is on target on real sequences. Fed by a Gaussian stand-in (the input of a Dense),
    the default wrap calibrates the Dense it feeds, not the LSTM (it used to: calibration moved its kernel by
    under 1%, the Dense not at all); after a layer measured on a probe both are calibrated."""
    def build(middle):
        inp = keras.Input((12,), dtype="int32")
        h = L.Embedding(50, 16, name="embedding")(inp)
        h = middle(h)
        h = L.LSTM(16, name="lstm")(h)
        return keras.Model(inp, L.Dense(4, name="dense")(h))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(lambda h: h)
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
        assert rep.auto_calibrated == {}
        row = next(r for r in rep.rows if r.name == "lstm")
        assert any("rows of embedding" in n for n in row.notes)
        ids = np.random.default_rng(3).integers(0, 50, (4000, 12)).astype("int32")
        y = keras.ops.convert_to_numpy(model(ids))
        assert float(np.var(y)) == pytest.approx(rep.rows[-1].outputs[0].var, rel=0.06)
        _, rep = autoinit_tf.wrap(build(L.Dense(16, name="mix")), seed=0, return_report=True)
        assert set(rep.auto_calibrated) == {"dense"}
        assert "lstm" in rep.auto_calibrated["dense"]
        _, rep = autoinit_tf.wrap(build(Untraceable(name="odd")), seed=0, return_report=True)
        assert {"lstm", "dense"} <= set(rep.auto_calibrated)


def test_exact_models_pay_nothing_and_match_the_pure_analytic_pass():
    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((16,))
        return keras.Model(inp, L.Dense(4)(L.Dense(32, activation="relu")(inp)))

    a, b = build(), build()
    _, rep = autoinit_tf.wrap(a, seed=5, return_report=True)
    autoinit_tf.wrap(b, seed=5, calibrate=None)
    assert rep.auto_calibrated == {} and rep.calibration_batch is None
    assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a.weights, b.weights))


class ShapeBaked(L.Layer):
    """ops.reshape(x, ops.shape(x)) on a symbolic input bakes an unknown dimension into a constant."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.proj = L.Dense(8, name="proj")

    def call(self, x):
        y = self.proj(x)
        b, t, c = keras.ops.shape(y)
        return keras.ops.reshape(keras.ops.reshape(y, (b, t, 2, c // 2)), (b, t, c))


def test_a_constant_shape_with_an_unknown_dimension_forces_a_trace_at_concrete_shapes():
    inp = keras.Input((None, 8))
    layer = ShapeBaked(name="baked")
    model = keras.Model(inp, layer(inp))
    node = next(n for n in graph.topo_nodes(model) if n.operation is layer)
    with pytest.raises(graph.TraceError, match="unknown dimension as a constant shape"):
        graph.trace_call(node)
    graph.trace_call(node, shapes=[(4, 6, 8)])  # fine at concrete shapes
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert [r.name for r in rep.rows if r.weighted] == ["baked/proj"]
    # A replay on real tensors of another length traces again at their shapes.
    x = np.random.default_rng(3).standard_normal((64, 11, 8)).astype("float32")
    measured = autoinit_tf.measure(model, x)
    assert measured["baked/proj"].outputs[0].var == pytest.approx(rep["baked/proj"].outputs[0].var, rel=0.1)


@pytest.mark.parametrize("op", ["pad", "pad_last", "roll"])
def test_pad_and_roll_ops_against_the_real_op(op):
    inp = keras.Input((10, 6))
    h = L.Dense(6, activation="relu", name="d")(inp)
    if op == "pad":
        h = keras.ops.pad(h, ((0, 0), (2, 3), (0, 0)), constant_values=0.5)
    elif op == "pad_last":
        h = keras.ops.pad(h, ((0, 0), (0, 0), (1, 1)))
    else:
        h = keras.ops.roll(h, 3, axis=1)
    model = keras.Model(inp, h)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    pred = rep.rows[-1].outputs[0]
    x = np.random.default_rng(0).standard_normal((20000, 10, 6)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    assert y.mean() == pytest.approx(pred.mean, rel=0.03)
    assert y.var() == pytest.approx(pred.var, rel=0.03)


@pytest.mark.parametrize("widths", [((0, 0), (0, 0), (0, 0)), ((0, 0), (2, 3), (0, 0))])
def test_pad_keeps_the_channel_offsets(widths):
    """Channel offsets known only as pooled moments (`between`, after a raw reshape) survive a pad: Swin's
    patch merging pads nothing on even maps and used to drop them, so stage 1's attended values lost their
    per-unit offsets. Measured: the variance of the per-channel means after the pad."""
    inp = keras.Input((10, 6))
    h = L.Dense(6, bias_initializer=keras.initializers.RandomNormal(0, 1.0, seed=3), name="d")(inp)
    h = keras.ops.transpose(keras.ops.transpose(h, (0, 2, 1)), (0, 2, 1))
    model = keras.Model(inp, keras.ops.pad(h, widths))
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    pred = rep.rows[-1].outputs[0]
    x = np.random.default_rng(0).standard_normal((4000, 10, 6)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    assert pred.between > 0.05
    assert y.mean(axis=(0, 1)).var() == pytest.approx(pred.between, rel=0.15)
    assert y.var() == pytest.approx(pred.var, rel=0.05)


def test_widely_spread_softmax_logits_are_marked_inexact_and_calibrated():
    """Logits with a large structured constant added (a relative position bias) are beyond the log-normal
    softmax: the default wrap calibrates the layer after it. A -100 mask is not such a constant: its rows
    reach the softmax (`Moments.visible`: Swin's shifted windows were 0.01 of target through attention);
    a layer reading the masked weights directly sees their positional pattern, so it is calibrated too."""
    x = np.random.default_rng(4).standard_normal((4096, 16, 16)).astype("float32")
    bias = np.random.default_rng(1).normal(0.0, 5.0, (16, 16)).astype("float32")
    mask = np.where(np.tril(np.ones((16, 16))) > 0, 0.0, -100.0).astype("float32")
    for added, why in ((bias, "softmax of logits with variance"), (mask, "softmax of masked logits")):
        inp = keras.Input((16, 16))
        weights = keras.ops.softmax(L.Dense(16, name="logits")(inp) + added, axis=-1)
        model = keras.Model(inp, L.Dense(8, name="proj")(weights))
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
        assert list(rep.auto_calibrated) == ["proj"] and why in rep.auto_calibrated["proj"]
        assert float(np.var(keras.ops.convert_to_numpy(model(x)))) == pytest.approx(1.0, rel=0.1)


def test_a_per_example_gate_marks_every_weighted_layer_after_it_inexact():
    """Squeeze-and-excitation makes the signal a scale mixture: BN and calibration do not remove that, so the
    default wrap calibrates every weighted layer downstream (EfficientNetB0: 62% -> 99% of layers within
    [0.8, 1.25]); a Multiply of same-shaped maps is exact and taints nothing."""
    inp = keras.Input((8, 8, 4))
    h = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    g = L.GlobalAveragePooling2D(keepdims=True)(h)
    g = L.Conv2D(8, 1, activation="sigmoid", name="gate")(g)
    h = L.Multiply(name="excite")([h, g])
    h = L.Conv2D(8, 1, name="project")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Conv2D(8, 3, padding="same", name="after_bn")(L.Activation("swish")(h))
    plain = L.Multiply(name="same_shape")([h, L.Conv2D(8, 1, name="other")(h)])
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(plain)))
    _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert sorted(rep.auto_calibrated) == ["after_bn", "head", "other", "project"]
    assert all("per-example gate" in reason for reason in rep.auto_calibrated.values())
    inp = keras.Input((8, 8, 4))
    h = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    same = L.Multiply()([h, L.Conv2D(8, 1, name="c2")(inp)])
    _, rep = autoinit_tf.wrap(keras.Model(inp, L.Conv2D(4, 1, name="c3")(same)), seed=0, return_report=True)
    assert not rep.auto_calibrated


class Patches(L.Layer):
    """Like keras-hub's ViT patching layer: a sublayer called on position ids the layer holds."""

    def __init__(self, n, width, **kw):
        super().__init__(**kw)
        self.n = n
        self.proj = L.Dense(width, name="proj")
        self.pos = L.Embedding(n, width, embeddings_initializer=keras.initializers.RandomNormal(0, 0.02), name="pos")

    def build(self, shape):
        self.position_ids = keras.ops.expand_dims(keras.ops.arange(self.n), 0)
        self.built = True

    def call(self, x):
        return self.proj(x) + self.pos(self.position_ids)


def test_a_sublayer_called_on_held_constants_is_walked_too():
    """The position table used to be read eagerly while tracing and kept at keras-hub's init (ViT). It is
    walked and drawn: a sublayer's table added to the layer's projection is a per-position bias of it, as a
    raw table is (`RawTable` below; `LookedUpPositions` measures the policy), so the sum is on the target."""
    from autoinit_tf.rules.provenance import POSITION_BIAS_STD

    inp = keras.Input((6, 4))
    layer = Patches(6, 8, name="patches")
    model = keras.Model(inp, layer(inp))
    before = layer.pos.embeddings.numpy().copy()
    node = next(n for n in graph.topo_nodes(model) if n.operation is layer)
    view = graph.trace_call(node)
    assert len(graph.lifted_constants(view)) == 1 and len(view.inputs) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert {"patches/proj", "patches/pos"} <= {r.name for r in rep.rows if r.weighted}
    drawn = layer.pos.embeddings.numpy()
    assert not np.array_equal(drawn, before) and rep["patches/pos"].target == pytest.approx(POSITION_BIAS_STD**2)
    assert float(np.var(drawn)) == pytest.approx(POSITION_BIAS_STD**2, rel=0.35)
    x = np.random.default_rng(5).standard_normal((2048, 6, 4)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    assert y.var() == pytest.approx(rep.rows[-1].outputs[0].var, rel=0.1)
    assert y.var() == pytest.approx(1.0, rel=0.1)
    measured = autoinit_tf.measure(model, x)
    assert measured["patches/pos"].outputs[0].var == pytest.approx(rep["patches/pos"].outputs[0].var, rel=0.05)


def test_a_calibrated_output_computed_from_constants_has_no_sampling_error():
    """The position table's output is the same for every example: its variance is not an estimate (its
    relative standard error was inf, which grew the probe to the memory bound)."""
    inp = keras.Input((6, 4))
    model = keras.Model(inp, Patches(6, 8, name="patches")(inp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate="probe", return_report=True)
    assert rep.calibration_error["patches/pos"] == 0.0
    assert "patches/pos" in rep.calibration


class RawTable(L.Layer):
    """Like keras-hub's DeiT embedding layer: a learned position table the layer adds itself
    (``ops.add(x, self.position_embedding)``), no sublayer owning it, and a matrix its call multiplies by.
    ``lookup=True``: the table is added to a token lookup (BERT-like) instead of a Dense projection."""

    def __init__(self, n, width, mix=True, lookup=False, **kw):
        super().__init__(**kw)
        self.proj = L.Embedding(50, width, name="tokens") if lookup else L.Dense(width, name="proj")
        self.n, self.width, self.use_mix = n, width, mix

    def build(self, shape):
        init = keras.initializers.RandomNormal(0, 0.02)
        self.position_embedding = self.add_weight(shape=(1, self.n, self.width), initializer=init,
                                                  name="position_embedding")
        self.mix = self.add_weight(shape=(self.width, self.width), initializer=init, name="mix")
        self.built = True

    def call(self, x):
        y = keras.ops.add(self.proj(x), self.position_embedding)
        return keras.ops.matmul(y, self.mix) if self.use_mix else y


def test_a_table_a_traced_layer_adds_to_its_projection_is_a_small_position_bias():
    """DeiT's position table, added to its patch convolution's output inside the layer whose output is the
    sum: drawn as a per-position bias (std `POSITION_BIAS_STD` = 0.02 of the signal's, the ViT / DeiT
    reference scale), so the layer's own output stays on the target (it came out at 1.95 with the table at
    the signal's variance); the add's prediction follows the drawn table, measured on real inputs, and a
    matrix read another way is still kept and named."""
    from autoinit_tf.rules.provenance import POSITION_BIAS_STD

    inp = keras.Input((6, 4))
    layer = RawTable(6, 8, name="raw")
    model = keras.Model(inp, layer(inp))
    old_mix = layer.mix.numpy().copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    table = layer.position_embedding.numpy()
    assert float(table.var()) == pytest.approx(POSITION_BIAS_STD**2, rel=0.35)
    assert np.array_equal(layer.mix.numpy(), old_mix)
    assert set(rep.untouched) == {"raw/mix"} and "raw ops" in rep.untouched["raw/mix"]
    unowned = [str(w.message) for w in caught if issubclass(w.category, FallbackRuleWarning)]
    assert any("raw/mix" in m and "position_embedding" not in m for m in unowned)
    x = np.random.default_rng(3).standard_normal((4096, 6, 4)).astype("float32")
    summed = keras.Model(inp, layer.proj(inp) + layer.position_embedding)
    y = np.asarray(keras.ops.convert_to_numpy(summed(x)), dtype=np.float64)
    add_row = next(r for r in rep.rows if r.name.endswith("/add"))
    assert add_row.weighted and any("per-position bias" in n for n in add_row.notes)
    assert y.var() == pytest.approx(add_row.outputs[0].var, rel=0.05)
    assert y.var() == pytest.approx(1.0, rel=0.1)


class LookedUpPositions(L.Layer):
    """Like keras-hub's ViT patching layer: a patch convolution, a class token joined in front, plus a
    position `Embedding` sublayer read at ids the layer holds (``position_embedding(self.position_ids)``).
    ``tokens=True``: the positions are added to a token lookup (BERT-like) instead."""

    def __init__(self, width, tokens=False, **kw):
        super().__init__(**kw)
        self.width, self.tokens = width, tokens
        self.proj = L.Embedding(50, width, name="tokens") if tokens else L.Conv2D(width, 4, strides=4, name="patches")
        self.positions = L.Embedding(17, width, name="positions",
                                     embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))

    def build(self, shape):
        self.class_token = self.add_weight(shape=(1, 1, self.width), initializer="random_normal", name="cls")
        self.position_ids = keras.ops.expand_dims(keras.ops.arange(16 if self.tokens else 17), 0)
        self.built = True

    def call(self, x):
        y = self.proj(x)
        if not self.tokens:
            y = keras.ops.reshape(y, (keras.ops.shape(y)[0], -1, self.width))
            cls = keras.ops.tile(self.class_token, (keras.ops.shape(y)[0], 1, 1))
            y = keras.ops.concatenate([cls, y], axis=1)
        return keras.ops.add(y, self.positions(self.position_ids))


def test_a_position_embedding_added_to_a_projection_is_a_small_bias_with_its_own_target():
    """keras-hub ViT's position `Embedding` (a sublayer read at ids its layer holds) added to the patch
    convolution: drawn as a per-position bias (std `POSITION_BIAS_STD` = 0.02 of the signal's, the scale
    keras-hub's ViT gives it), as DeiT's raw table is, so the patching layer's output is on the target (it
    was the patches plus a table at the signal's variance, 1.96x); the Embedding's row names that variance
    as its own target, and `calibrate="probe"` aims it there instead of pushing it up to 1. Measured on
    real inputs; added to a token lookup (BERT-like) the table stays a signal at the target."""
    from autoinit_tf.rules.provenance import POSITION_BIAS_STD

    inp = keras.Input((16, 16, 3))
    layer = LookedUpPositions(8, name="vit")
    model = keras.Model(inp, layer(inp))
    x = np.random.default_rng(3).standard_normal((2048, 16, 16, 3)).astype("float32")
    for calibrate in (None, "probe"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, rep = autoinit_tf.wrap(model, seed=0, calibrate=calibrate, return_report=True)
        table = layer.positions.embeddings.numpy().astype(np.float64)
        # every row is read (ids 0..16): rescaled so what the layer outputs has the target variance exactly
        assert table.var() == pytest.approx(POSITION_BIAS_STD**2, rel=1e-3)
        row = rep["vit/positions"]
        assert row.target == pytest.approx(POSITION_BIAS_STD**2)
        assert any("per-position bias" in n for n in row.notes)
        assert row.to_dict()["target"] == row.target and rep.targets() == {"vit/positions": row.target}
        y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)[:, 1:]  # the class token aside
        assert y.var() == pytest.approx(1.0, rel=0.1)
        assert rep["vit/add"].outputs[0].var == pytest.approx(1.0, rel=0.1)

    # frozen: the table is kept as it is (frozen-layer policy, named), and its row states no target
    layer.positions.trainable = False
    kept = layer.positions.embeddings.numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=2, calibrate=None, return_report=True)
    assert np.array_equal(layer.positions.embeddings.numpy(), kept)
    assert rep["vit/positions"].target is None and not rep.targets()
    assert "vit/positions/embeddings" in rep.untouched

    ids = keras.Input((16,), dtype="int32")
    lookup = LookedUpPositions(8, tokens=True, name="bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(keras.Model(ids, lookup(ids)), seed=0, calibrate=None, return_report=True)
    assert float(lookup.positions.embeddings.numpy().var()) == pytest.approx(1.0, rel=0.35)
    assert rep["bert/positions"].target is None


class VariableIds(LookedUpPositions):
    """`LookedUpPositions` with its position ids kept as a non-trainable integer variable, as keras-hub's
    CLIP vision embedding keeps them (zeros until a preset fills them; arange here)."""

    def build(self, shape):
        super().build(shape)
        ids = np.arange(17)[None]
        self.position_ids = self.add_weight(shape=(1, 17), initializer=keras.initializers.Constant(ids),
                                            dtype="int32", trainable=False, name="position_ids")


def test_position_ids_held_as_an_integer_variable_are_lifted_too():
    """Ids the layer keeps as a non-trainable integer variable used to make the position Embedding's call run
    eagerly while tracing: its table was kept at Keras' init and named in `report.untouched` (and so were the
    ids). Now the variable's value is lifted like a constant tensor's: the table is drawn as the per-position
    bias, the sum measured on target, the ids left alone and not reported as an untouched weight."""
    from autoinit_tf.rules.provenance import POSITION_BIAS_STD

    inp = keras.Input((16, 16, 3))
    layer = VariableIds(8, name="clip")
    model = keras.Model(inp, layer(inp))
    before = layer.positions.embeddings.numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    table = layer.positions.embeddings.numpy().astype(np.float64)
    assert not np.array_equal(table, before) and rep["clip/positions"].target == pytest.approx(POSITION_BIAS_STD**2)
    assert table.var() == pytest.approx(POSITION_BIAS_STD**2, rel=1e-3)
    assert np.array_equal(layer.position_ids.numpy(), np.arange(17)[None])
    assert not any("positions" in p or "position_ids" in p for p in rep.untouched)
    x = np.random.default_rng(4).standard_normal((2048, 16, 16, 3)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)[:, 1:]
    assert y.var() == pytest.approx(1.0, rel=0.1)
    # ids loaded after the first wrap (as a preset fills CLIP's zeros) are read by the next one, though the
    # trace is cached: only the rows now read are rescaled to the target
    layer.position_ids.assign(np.zeros((1, 17), dtype="int32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=1, calibrate=None, return_report=True)
    row0 = layer.positions.embeddings.numpy()[0].astype(np.float64)
    assert row0.var() == pytest.approx(POSITION_BIAS_STD**2, rel=1e-3)
    assert rep["clip/positions"].outputs[0].var == pytest.approx(row0.var(), rel=1e-3)


class ConvPatches(L.Layer):
    """Like keras-hub's DeiT embeddings: a patch convolution, its output reshaped to tokens, a class token
    concatenated in front, then a position table the layer adds itself."""

    def __init__(self, width, **kw):
        super().__init__(**kw)
        self.width = width
        self.patch = L.Conv2D(width, 4, strides=4, name="patch")

    def build(self, shape):
        tokens = (shape[1] // 4) * (shape[2] // 4) + 1
        init = keras.initializers.RandomNormal(0, 0.02)
        self.class_token = self.add_weight(shape=(1, 1, self.width), initializer="zeros", name="class_token")
        self.position_embedding = self.add_weight(shape=(1, tokens, self.width), initializer=init,
                                                  name="position_embedding")
        self.built = True

    def call(self, x):
        y = self.patch(x)
        y = keras.ops.reshape(y, (keras.ops.shape(y)[0], -1, self.width))
        cls = keras.ops.tile(self.class_token, (keras.ops.shape(y)[0], 1, 1))
        y = keras.ops.concatenate([cls, y], axis=1)
        return keras.ops.add(y, self.position_embedding)


def test_a_position_bias_is_found_behind_reshapes_and_the_class_token():
    """DeiT's path: the table meets the convolution's output through a reshape and a concatenation with the
    class token (`provenance.projection_behind` looks through both): drawn as the bias, and the layer's
    output measured on target."""
    from autoinit_tf.rules.provenance import POSITION_BIAS_STD

    inp = keras.Input((16, 16, 3))
    layer = ConvPatches(8, name="emb")
    model = keras.Model(inp, layer(inp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert float(layer.position_embedding.numpy().var()) == pytest.approx(POSITION_BIAS_STD**2, rel=0.35)
    x = np.random.default_rng(4).standard_normal((2048, 16, 16, 3)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)[:, 1:]  # the patch tokens
    assert y.var() == pytest.approx(1.0, rel=0.1)


def test_a_table_a_traced_layer_adds_to_a_lookup_is_drawn_like_an_embedding():
    """Added to a token lookup (token plus position, as BERT and GPT-2 sum them), the table is an embedding
    like the tokens': drawn with variance `signal_variance`, the add's predicted variance follows the drawn
    table (measured on uniform token ids), and averaging over positions is predicted from its split."""
    ids = keras.Input((6,), dtype="int32")
    layer = RawTable(6, 8, lookup=True, name="raw")
    model = keras.Model(ids, layer(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    table = layer.position_embedding.numpy()
    assert float(table.var()) == pytest.approx(1.0, rel=0.35)
    x = np.random.default_rng(3).integers(0, 50, (4096, 6)).astype("int32")
    summed = keras.Model(ids, layer.proj(ids) + layer.position_embedding)
    y = np.asarray(keras.ops.convert_to_numpy(summed(x)), dtype=np.float64)
    add_row = next(r for r in rep.rows if r.name.endswith("/add"))
    assert add_row.weighted and not any("per-position bias" in n for n in add_row.notes)
    assert y.var() == pytest.approx(add_row.outputs[0].var, rel=0.05)
    assert y.var() > 1.5
    # Averaged over positions (what attention and pooling do) the table's rows cancel: its per-channel
    # means are the sum's fixed offsets (`between`), its variation over positions is counted as a
    # fluctuation, as keras-hub's PositionEmbedding rule does (an average over all n positions removes it
    # entirely, so the pooled prediction is high by that part / n: 1.6x over 6 positions here). Taken whole
    # as fixed offsets, as before, the pooled variance came out 4.8x high and DeiT's attention outputs 6x.
    raw2 = RawTable(6, 8, mix=False, lookup=True, name="raw2")
    pooled = keras.Model(ids, L.GlobalAveragePooling1D(name="gap")(raw2(ids)))
    autoinit_tf.wrap(pooled, seed=0, calibrate=None)
    rep = autoinit_tf.analyze(pooled, seed=0)
    table = raw2.position_embedding.numpy()[0].astype(np.float64)
    tokens = raw2.proj.embeddings.numpy().astype(np.float64)
    offsets = tokens.mean(0) + table.mean(0)  # each channel's fixed offset: its token and position means
    assert rep["raw2/add"].outputs[0].between == pytest.approx(offsets.var(), rel=1e-6)
    measured = np.asarray(keras.ops.convert_to_numpy(pooled(x)), dtype=np.float64).var()
    predicted = rep["gap"].outputs[0].var
    assert measured < predicted < measured + table.var(0).mean() / 6 * 1.1


class ScoresBlock(L.Layer):
    """Returns (y, None) when no scores are asked for, as keras-hub's DeiT blocks do."""

    def __init__(self, width, **kw):
        super().__init__(**kw)
        self.proj = L.Dense(width, name="proj")

    def call(self, x, return_scores=False):
        y = self.proj(x)
        return y, (y if return_scores else None)


class ScoresEncoder(L.Layer):
    """Two ScoresBlocks; also returns an ``ops.empty`` placeholder computed from static shapes (DeiTEncoder)."""

    def __init__(self, width, **kw):
        super().__init__(**kw)
        self.blocks = [ScoresBlock(width, name=f"block_{i}") for i in range(2)]

    def call(self, x):
        for block in self.blocks:
            x, _ = block(x)
        empty = keras.ops.empty((0, keras.ops.shape(x)[1], keras.ops.shape(x)[2]), dtype=x.dtype)
        return x, empty


def test_blocks_returning_none_and_constant_outputs_are_walked_inside():
    inp = keras.Input((6, 16))
    out, _ = ScoresEncoder(16, name="encoder")(inp)
    model = keras.Model(inp, out)
    node = next(n for n in graph.topo_nodes(model) if n.operation.name == "encoder")
    assert isinstance(tracing.CallTracer()(node, None), keras.Model)  # was: "returned a non-tensor: None"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, strict=True, return_report=True)
    assert [r.name for r in rep.rows if r.weighted] == ["encoder/block_0/proj", "encoder/block_1/proj"]
    assert {v.path for v in model.weights if len(v.shape) == 2} <= set(rep.assigned)
    # The walk fed the placeholder back as an output, and a replay on real tensors runs through too:
    # the first block's output is on target (the second reads 16 correlated channels, which the pass
    # takes as independent).
    measured = autoinit_tf.compare(model, seed=0, batch_size=512)
    assert all(r.measured for r in measured.rows)
    first = next(r for r in measured.rows if r.name == "encoder/block_0/proj")
    assert first.measured[0].var == pytest.approx(1.0, rel=0.05)


class HeadsReshuffle(L.Layer):
    """Gemma's attention pattern: an EinsumDense declared with ``output_shape=(None, heads, dim)`` (unknown
    sequence length even at concrete shapes), then ``ops.reshape(..., ops.shape(x))``, and a mask test."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.query = L.EinsumDense("btd,ndh->btnh", output_shape=(None, 2, 8), name="query")

    def call(self, x, attention_mask=None):
        q = self.query(x)
        q = keras.ops.reshape(keras.ops.stack(keras.ops.split(q, 2, axis=-1), axis=-1), keras.ops.shape(q))
        none_seen = keras.ops.all(keras.ops.equal(attention_mask, 0), axis=-1, keepdims=True)[..., None, None]
        return keras.ops.where(none_seen, keras.ops.zeros_like(q), q)


def test_an_einsum_dense_with_an_unknown_declared_length_is_traced_at_concrete_shapes():
    inp, mask = keras.Input((None, 16)), keras.Input((None,), dtype="int32")
    model = keras.Model([inp, mask], HeadsReshuffle(name="heads")(inp, attention_mask=mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)  # traced; the mask ops have rules
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert [r.name for r in rep.rows if r.weighted] == ["heads/query"]
    assert model.get_layer("heads").query.kernel.path in rep.assigned
    x = np.random.default_rng(0).standard_normal((256, 12, 16)).astype("float32")
    out = keras.ops.convert_to_numpy(model([x, np.ones((256, 12), "int32")]))
    assert float(np.var(out)) == pytest.approx(1.0, rel=0.1)
