"""wrap/analyze on every kind of graph, determinism, in-place behaviour and clear errors."""

import json
import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import FallbackRuleWarning, Moments, UnsupportedLayerError

pytestmark = pytest.mark.core
L = keras.layers


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def mlp(width=16, depth=3, act="relu"):
    inp = keras.Input((8,))
    x = inp
    for _ in range(depth):
        x = L.Dense(width, activation=act)(x)
    return keras.Model(inp, L.Dense(3)(x))


def test_wrap_returns_same_object_and_changes_weights():
    m = mlp()
    before = weights_of(m)
    out = autoinit_tf.wrap(m, seed=1)
    assert out is m
    after = weights_of(m)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_analyze_changes_nothing_and_matches_wrap_with_same_seed():
    m = mlp()
    before = weights_of(m)
    rep = autoinit_tf.analyze(m, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(m)))
    _, rep2 = autoinit_tf.wrap(m, seed=5, return_report=True)
    assert [r.outputs[0].var for r in rep.rows] == [r.outputs[0].var for r in rep2.rows]
    data = json.loads(rep.to_json())
    assert [n["name"] for n in data["nodes"]] == [r.name for r in rep.rows]
    assert "dense" in rep.table()


def test_deterministic_for_a_seed():
    a, b = mlp(), mlp()
    autoinit_tf.wrap(a, seed=7)
    autoinit_tf.wrap(b, seed=7)
    for x, y in zip(weights_of(a), weights_of(b)):
        np.testing.assert_array_equal(x, y)


def test_compiled_model_keeps_training_after_wrap():
    m = mlp()
    m.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(64, 8).astype("float32"), np.random.rand(64, 3).astype("float32")
    m.fit(x, y, epochs=1, verbose=0)
    opt_vars = list(m.optimizer.variables)
    autoinit_tf.wrap(m, seed=0)
    assert m.compiled and list(m.optimizer.variables) == opt_vars
    h = m.fit(x, y, epochs=2, verbose=0)
    assert np.isfinite(h.history["loss"]).all()


def test_sequential_built_and_unbuilt():
    s = keras.Sequential([keras.Input((8,)), L.Dense(4, activation="tanh"), L.Dense(2)])
    _, rep = autoinit_tf.wrap(s, seed=0, return_report=True)
    assert [r.type for r in rep.rows] == ["Dense", "Dense"]
    unbuilt = keras.Sequential([L.Dense(4), L.Dense(2)])
    with pytest.raises(TypeError, match="not built"):
        autoinit_tf.wrap(unbuilt)


def test_nested_model_called_twice_and_shared_layer_fit_combined_moments():
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, L.Dense(8, activation="relu", name="inner_dense")(inner_in), name="block")
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = L.Dense(4, name="shared")
    h1, h2 = inner(a), inner(b)
    out = L.Concatenate()([shared(h1), shared(h2)])
    model = keras.Model([a, b], out)
    rep = autoinit_tf.analyze(model, input_moments=[(0.0, 1.0), (0.0, 9.0)], seed=0)
    names = [r.name for r in rep.rows]
    assert "block/inner_dense#0" in names and "block/inner_dense#1" in names
    assert "shared#0" in names and "shared#1" in names
    d0, d1 = rep["block/inner_dense#0"], rep["block/inner_dense#1"]
    # One weight tensor, fitted to the combined second moment (1 + 9) / 2 = 5.
    assert d0.weight_scale == d1.weight_scale == pytest.approx(1.0 / (8 * 5.0))
    low, high = sorted([d0, d1], key=lambda r: r.inputs[0].var)
    assert (low.inputs[0].var, high.inputs[0].var) == (1.0, 9.0)
    assert high.outputs[0].var == pytest.approx(9.0 * low.outputs[0].var, rel=1e-6)


def test_multi_input_multi_output_dict_and_raw_ops():
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    x = L.Dense(6, name="da")(a) + L.Dense(6, name="db")(b) * 2.0
    x = keras.ops.relu(x)
    left, right = keras.ops.split(x, 2, axis=-1)
    y = keras.ops.softmax(keras.ops.matmul(left, keras.ops.transpose(right)))
    z = keras.ops.mean(x[:, :4], axis=-1)
    model = keras.Model({"a": a, "b": b}, {"y": y, "z": z, "r": keras.ops.reshape(x, (-1, 3, 2))})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        rep = autoinit_tf.analyze(model, input_moments={"a": (0.0, 1.0), "b": (1.0, 4.0)}, seed=0)
    types = {r.type for r in rep.rows}
    assert {"Add", "Multiply", "Relu", "Split", "Matmul", "Softmax", "GetItem", "Mean", "Reshape"} <= types
    autoinit_tf.wrap(model, data={"a": np.random.randn(32, 6), "b": np.random.randn(32, 6) + 1.0}, seed=0)


def test_layer_with_several_outputs_and_subclassed_view():
    class Twice(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = L.Dense(8, activation="relu")
            self.d2 = L.Dense(2)

        def call(self, x):
            return self.d2(self.d1(x))

    m = Twice()
    m(np.zeros((1, 5), "float32"))
    before = weights_of(m)
    autoinit_tf.wrap(m, seed=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(m)))

    class Branchy(keras.Model):
        def call(self, x):
            if keras.ops.convert_to_numpy(keras.ops.sum(x)) > 0:
                return x
            return -x

    b = Branchy()
    b(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        autoinit_tf.wrap(b)


def test_frozen_layers_kept_unless_include_frozen():
    m = mlp()
    m.layers[1].trainable = False
    frozen_before = [np.array(v) for v in m.layers[1].get_weights()]
    autoinit_tf.wrap(m, seed=0)
    for a, b in zip(frozen_before, m.layers[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    autoinit_tf.wrap(m, seed=0, include_frozen=True)
    assert not np.array_equal(frozen_before[0], m.layers[1].get_weights()[0])


@pytest.mark.parametrize("bad,match", [((0.0, 0.0), "zero"), ((0.0, -1.0), "positive"),
                                        ((float("nan"), 1.0), "finite"), ((0.0, float("inf")), "finite")])
def test_bad_input_moments_are_refused_and_nothing_changes(bad, match):
    m = mlp()
    before = weights_of(m)
    with pytest.raises(ValueError, match=match):
        autoinit_tf.wrap(m, input_moments=bad)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(m)))


def test_bad_model_and_bad_data():
    with pytest.raises(TypeError, match="keras.Model"):
        autoinit_tf.wrap(object())
    m = mlp()
    with pytest.raises(ValueError, match="shape"):
        autoinit_tf.wrap(m, data=np.zeros((4, 7)))
    with pytest.raises(ValueError, match="zero variance"):
        autoinit_tf.wrap(m, data=np.ones((4, 8)))


def test_failure_part_way_assigns_nothing():
    class Broken(L.Layer):
        def call(self, x):
            return x

    def bad_rule(ctx):
        raise RuntimeError("boom")

    inp = keras.Input((8,))
    m = keras.Model(inp, Broken()(L.Dense(4)(inp)))
    before = weights_of(m)
    with pytest.raises(RuntimeError, match="boom"):
        autoinit_tf.wrap(m, rules={Broken: bad_rule})
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(m)))


def test_unknown_layer_warns_once_then_strict_raises():
    class Scale(L.Layer):
        def call(self, x):
            if isinstance(x, keras.KerasTensor):  # not traceable: the probe fallback measures it
                raise TypeError("concrete tensors only")
            return 3.0 * x

    inp = keras.Input((16,))
    m = keras.Model(inp, Scale()(Scale()(inp)))
    with pytest.warns(FallbackRuleWarning, match="register_rule") as rec:
        rep = autoinit_tf.analyze(m)
    assert len([w for w in rec if issubclass(w.category, FallbackRuleWarning)]) == 1
    assert rep.rows[-1].outputs[0].var == pytest.approx(81.0, rel=0.05)
    with pytest.raises(UnsupportedLayerError, match="Scale"):
        autoinit_tf.wrap(m, strict=True)


def test_traceable_custom_layer_is_walked_inside_without_a_warning():
    """A subclassed layer built from Keras layers and keras.ops is traced: its inner Dense gets its own
    rule and weights (strict mode accepts it), its raw ops their exact rules."""

    class Block(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.inner = L.Dense(32, activation="relu", kernel_initializer=keras.initializers.RandomNormal(0, 0.001),
                                 name="inner")

        def call(self, x):
            return 3.0 * self.inner(x)

    inp = keras.Input((16,))
    block = Block(name="block")
    m = keras.Model(inp, block(inp))
    before = np.array(block.inner.kernel.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(m, strict=True, seed=0, return_report=True)
    assert [(r.name, r.rule) for r in rep.rows] == [("block/inner", "weighted_linear_rule"),
                                                    ("block/multiply", "multiply_op_rule")]
    assert not np.array_equal(before, block.inner.kernel.numpy())
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype("float32")
    y = keras.ops.convert_to_numpy(m(x))
    # ReLU(Dense) on the AutoInit target, then x3: second moment 9 * signal
    pred = rep.rows[-1].outputs[0]
    assert float(np.mean(y * y)) == pytest.approx(pred.second, rel=0.1)
    assert pred.second == pytest.approx(9.0 * rep.rows[0].outputs[0].second, rel=1e-6)


def test_register_rule_decorator_and_rules_argument():
    class Scale(L.Layer):
        def __init__(self, factor=2.0, **kw):
            super().__init__(**kw)
            self.factor = factor

        def call(self, x):
            return self.factor * x

    @autoinit_tf.register_rule(Scale)
    def scale_rule(ctx):
        return ctx.input.scaled(ctx.layer.factor)

    try:
        inp = keras.Input((4,))
        m = keras.Model(inp, Scale(5.0)(inp))
        assert autoinit_tf.analyze(m, strict=True).rows[-1].outputs[0].var == pytest.approx(25.0)
        rep = autoinit_tf.analyze(m, rules={Scale: lambda ctx: Moments(1.0, 2.0)})
        assert rep.rows[-1].outputs[0].mean == 1.0
    finally:
        autoinit_tf.unregister_rule(Scale)   # the registry is process-wide: leave it as found
    assert Scale not in autoinit_tf.rules.registered_rules()


def test_mixed_precision_assigns_in_variable_dtype():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = mlp()
        autoinit_tf.wrap(m, seed=0)
        assert str(m.layers[1].kernel.dtype) == "float32"
        y = m(np.random.randn(4, 8).astype("float32"))
        assert np.isfinite(keras.ops.convert_to_numpy(y)).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("dist", ["truncated_normal", "untruncated_normal", "uniform", "orthogonal"])
def test_distributions_hit_the_target_variance(dist):
    inp = keras.Input((256,))
    m = keras.Model(inp, L.Dense(256)(inp))
    _, rep = autoinit_tf.wrap(m, distribution=dist, input_moments=(0.0, 2.0), seed=0, return_report=True)
    k = keras.ops.convert_to_numpy(m.layers[1].kernel)
    assert k.var() == pytest.approx(1.0 / (256 * 2.0), rel=0.02)
    if dist == "truncated_normal":
        assert np.abs(k).max() <= 2.0 * np.sqrt(1.0 / 512) / 0.8796 + 1e-6


def test_a_few_unit_layer_reading_a_dominant_mean_is_on_target_for_its_drawn_kernel():
    # 8 units reading 32 inputs of mean 0.2 and variance 1e-4 (a squeeze-and-excitation reduce conv after
    # GAP): the pre-activation variance is ~0.04 * var_j(sum_c W[c, j]), a chi-square of 8 column sums,
    # so the expectation formula alone lands anywhere from 0.1x to 2x. The pass rescales the drawn kernel
    # for the drawn values; checked by running the real layer on NumPy samples of the input.
    rng = np.random.default_rng(0)
    x = (0.2 + 0.01 * rng.standard_normal((20000, 32))).astype("float32")
    plain = []
    for seed in range(8):
        inp = keras.Input((32,))
        m = keras.Model(inp, L.Dense(8)(inp))
        autoinit_tf.wrap(m, input_moments=(0.2, 1e-4), seed=seed, calibrate=None)
        assert float(np.var(keras.ops.convert_to_numpy(m(x)))) == pytest.approx(1.0, rel=0.03)
        # Draws without the rescaling (the reference-compatible class draws exactly as stated).
        autoinit_tf.AutoInit(input_data_mean=0.2, input_data_var=1e-4).initialize_model(m)
        plain.append(float(np.var(keras.ops.convert_to_numpy(m(x)))))
    assert max(abs(np.log(plain))) > 0.3  # what the rescaling corrects


def test_a_kernel_with_a_nonzero_bias_is_not_rescaled():
    inp = keras.Input((32,))
    m = keras.Model(inp, L.Dense(8, bias_initializer="ones")(inp))
    _, rep = autoinit_tf.wrap(m, input_moments=(0.2, 1e-4), seed=0, calibrate=None, return_report=True)
    row = next(r for r in rep.rows if r.weighted)
    assert row.weight_scale == pytest.approx(1.0 / (32 * (0.04 + 1e-4)))  # the expectation formula, unscaled


def test_reference_compatible_api():
    from autoinit_tf import AutoInit

    m = mlp()
    out = AutoInit(weight_init_config={"distribution": "uniform"}, input_data_var=4.0).initialize_model(m)
    assert out is m
    k = keras.ops.convert_to_numpy(m.layers[1].kernel)
    assert np.abs(k).max() <= np.sqrt(3.0 / (8 * 4.0)) + 1e-6
    cfg_model, est = AutoInit().initialize_model(m.to_json(), return_estimates=True)
    assert isinstance(cfg_model, keras.Model) and len(est) == 4

    class Halve:
        def __init__(self, layer):
            self.layer = layer

        def estimate(self, means_in, vars_in):
            return means_in[0], vars_in[0] / 2

    class Custom(L.Layer):
        def call(self, x):
            return x

    inp = keras.Input((4,))
    cm = keras.Model(inp, Custom(name="custom")(inp))
    _, est = AutoInit(custom_distribution_estimators={Custom: Halve}).initialize_model(cm, return_estimates=True)
    assert est["custom"] == (0.0, 0.5)
    with pytest.raises(ValueError, match="distribution"):
        AutoInit(weight_init_config={"distribution": "cauchy"})


def test_progress_callback_sees_every_node_once():
    m = mlp(depth=5)
    calls = []
    autoinit_tf.wrap(m, seed=0, progress=lambda done, total, name: calls.append((done, total, name)))
    assert [c[0] for c in calls] == list(range(1, 7))
    assert {c[1] for c in calls} == {6}
    assert calls[-1][2] == m.layers[-1].name


class _TiedTranspose(L.Layer):
    """y = x @ dense.kernel^T: a layer holding another layer's variable (weight tying)."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(self.dense.kernel))


def _rows(rep):
    return [(r.name, r.weighted, r.weight_scale, [(o.mean, o.var) for o in r.outputs]) for r in rep.rows]


def test_analyze_drops_drawn_arrays_after_each_layer_but_predicts_what_wrap_leaves():
    from autoinit_tf.engine import run_analytic_pass as _run

    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, L.Dense(8, activation="relu", name="inner_dense")(inner_in), name="block")
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = L.Dense(6, activation="tanh", name="shared")
    h = L.Concatenate()([shared(inner(a)), shared(inner(b))])
    enc = L.Dense(8, name="enc")
    z = enc(L.Dense(8, name="mix")(h))
    out = _TiedTranspose(enc, name="tied")(z)  # reads enc's drawn kernel after enc's last call
    model = keras.Model([a, b], out)
    options = dict(input_moments=None, data=None, signal_variance=1.0, distribution="truncated_normal", seed=3,
                   strict=False, rules=None, include_frozen=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackRuleWarning)
        lean = _run(model, **options, keep_drawn=False)
        full = _run(model, **options, keep_drawn=True)
        rep = autoinit_tf.analyze(model, seed=3)
    # Only the tied kernel (held by two layers) is still held at the end; wrap's engine holds all.
    assert sorted(lean.pending) == [enc.kernel.path]
    assert len(full.pending) == 4  # every kernel (biases keep their zeros)
    assert _rows(lean) == _rows(full) == [
        (r.name, r.weighted, r.weight_scale, [(o.mean, o.var) for o in r.outputs]) for r in rep.rows
    ]


def test_the_report_names_every_weight_left_as_it_was_with_the_reason():
    inp = keras.Input((6,), dtype="int32")
    emb = L.ReversibleEmbedding(50, 16, tie_weights=False, name="tokens")  # forward call only (a backbone)
    frozen = L.Dense(16, name="frozen")
    h = frozen(emb(inp))
    frozen.trainable = False
    model = keras.Model(inp, L.Dense(4, name="head")(h))
    _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert set(rep.untouched) == {"frozen/kernel"}
    assert rep.untouched["frozen/kernel"] == "frozen"
    # The untied head table this model never calls is drawn for the LM head a task model will add.
    assert {"tokens/embeddings", "tokens/reverse_embeddings", "head/kernel"} <= set(rep.assigned)
    assert rep.to_dict()["untouched"] == rep.untouched


def test_rescaling_a_drawn_kernel_is_in_place_and_never_touches_another_array():
    """`RuleContext.rescale` multiplies the array its own `draw` made in place (no second copy of a large
    kernel) and copies anything else (an array recorded from elsewhere, which may be shared)."""
    from autoinit_tf.rules.context import RuleContext

    class Var:
        def __init__(self, path, shape):
            self.path, self.shape, self.trainable = path, shape, True

    class Engine:  # the part of the analytic pass a RuleContext uses to draw, read and record
        distribution = "truncated_normal"
        seed = 0

        def __init__(self):
            self.pending, self.visit_records = {}, []

        def may_reinit(self, op, variable):
            return True

        def ordinal(self, op):
            return 0

        def value(self, variable):
            return self.pending[variable.path]

        def record(self, op, variable, array):
            self.visit_records.append(variable.path)
            self.pending[variable.path] = array

    engine = Engine()
    op = L.Dense(4, name="d")
    ctx = RuleContext(op, None, [], (), {}, None, engine)
    a, b = Var("d/kernel", (3, 4)), Var("d/other", (3, 4))
    drawn = ctx.draw(a, 1.0)
    before = drawn.copy()
    ctx.rescale(a, 2.0)
    assert engine.pending["d/kernel"] is drawn  # the same buffer, scaled
    np.testing.assert_array_equal(drawn, 2.0 * before)
    shared = np.ones((3, 4), dtype="float32")
    ctx.assign(b, shared)
    ctx.rescale(b, 3.0)
    np.testing.assert_array_equal(shared, 1.0)  # not modified in place
    np.testing.assert_array_equal(engine.pending["d/other"], 3.0)


def _raw_attention_model(seq=16, dim=32, shared=True):
    """softmax(q k^T / sqrt(d)) @ v in raw ops, then an output Dense; with `shared`, every position of an
    example carries the same extra component (as after an earlier attention's averaging)."""
    tokens = keras.Input((seq, dim))
    x = tokens
    if shared:
        per_example = keras.Input((1, dim))
        x = L.Add()([tokens, keras.ops.repeat(per_example, seq, axis=1)])
        inputs = [tokens, per_example]
    else:
        inputs = tokens
    q, k, v = (L.Dense(dim, use_bias=False, name=n)(x) for n in ("q", "k", "v"))
    scores = keras.ops.softmax(keras.ops.matmul(q, keras.ops.transpose(k, (0, 2, 1))) / np.sqrt(dim), axis=-1)
    out = L.Dense(dim, use_bias=False, name="out")(keras.ops.matmul(scores, v))
    return keras.Model(inputs, out)


def test_raw_op_attention_weights_times_values_is_calibrated_by_default():
    """Attention written in raw ops (keras-hub's MiT and Swin): the matmul of softmax weights and values
    treats the values as independent across positions. Where they share a part (here a per-example
    component with 3x the tokens' variance) the analytic output is far off (variance 6.1 measured, target
    1); the default wrap calibrates the layers after that matmul and says why."""
    model = _raw_attention_model()
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((2000, 16, 32)).astype("float32"),
         (np.sqrt(3.0) * rng.standard_normal((2000, 1, 32))).astype("float32")]
    moments = [(0.0, 1.0), (0.0, 3.0)]
    autoinit_tf.wrap(model, input_moments=moments, seed=0, calibrate=None)
    analytic = float(np.var(keras.ops.convert_to_numpy(model(x))))
    _, rep = autoinit_tf.wrap(model, input_moments=moments, seed=0, return_report=True)
    default = float(np.var(keras.ops.convert_to_numpy(model(x))))
    assert "out" in rep.auto_calibrated and "attention weights" in rep.auto_calibrated["out"]
    assert abs(np.log(analytic)) > 0.5  # what the analytic pass misses
    assert default == pytest.approx(1.0, rel=0.1)


def test_a_product_of_two_independent_signals_stays_analytic():
    """A matmul of two signals that are not attention weights keeps the analytic (exact) rule: no probe."""
    a_in, b_in = keras.Input((8, 16)), keras.Input((16, 8))
    model = keras.Model([a_in, b_in], L.Dense(8, name="after")(keras.ops.matmul(a_in, b_in)))
    _, rep = autoinit_tf.wrap(model, input_moments=[(0.0, 1.0), (0.0, 1.0)], seed=0, return_report=True)
    assert not rep.auto_calibrated
