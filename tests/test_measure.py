"""measure / compare / calibrate: exactness against sub-models, no side effects, calibrated variance."""

import importlib
import math
import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import calibration, compare, graph, statistics
from autoinit_tf.measure import CALIBRATION_RSE, CalibrationWarning, calibrate, measure

measure_module = importlib.import_module("autoinit_tf.measure")  # the package attribute is the function


def _np_moments(y):
    a = np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)
    return a.mean(), a.var()


def _mixed_model():
    inp = keras.Input((8, 8, 3), name="img")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    b = keras.layers.Conv2D(8, 1, name="c2")(h)
    h = keras.layers.Add(name="add")([h, b])
    h = keras.ops.relu(h) * 0.5
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="tanh", name="head")(h))


def _snapshot(model):
    vs = list(model.variables)
    if getattr(model, "optimizer", None) is not None and model.optimizer.built:
        vs += list(model.optimizer.variables)
    return [(v.path, np.array(keras.ops.convert_to_numpy(v.value))) for v in vs]


@pytest.mark.core
def test_measure_matches_submodels():
    model = _mixed_model()
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype("float32")
    report = measure(model, x, training=False)
    assert report.source == "measured"
    fn = graph.as_functional(model)
    names = [r.name for r in report.rows]
    assert names[:3] == ["c1", "bn", "pool"] and names[-1] == "head"
    for node in graph.topo_nodes(fn):
        if node.is_input:
            continue
        op = node.operation
        sub = keras.Model(fn.inputs, node.outputs[0])
        want_mean, want_var = _np_moments(sub(x, training=False))
        row = report[op.name]
        got = row.outputs[0]
        assert got.mean == pytest.approx(want_mean, rel=1e-4, abs=1e-5), op.name
        assert got.var == pytest.approx(want_var, rel=1e-4, abs=1e-6), op.name
        ch = row.channel[0]
        assert ch["var"] <= got.var + 1e-6 and ch["mean_sq"] >= 0
    # the fused activation's input is reported as the pre-activation
    pre = report["head"].preactivation
    assert pre is not None and pre.var > report["head"].outputs[0].var
    # training=True on a model without randomness: same as the sub-model called in training mode
    rep_t = measure(model, x, training=True)
    m_bn, v_bn = _np_moments(keras.Model(fn.inputs, model.get_layer("bn").output)(x, training=True))
    assert rep_t["bn"].outputs[0].var == pytest.approx(v_bn, rel=1e-4)
    assert rep_t["bn"].outputs[0].var == pytest.approx(1.0, rel=1e-2)  # batch statistics


@pytest.mark.core
def test_measure_nested_and_shared_names_match_analyze():
    block_in = keras.Input((6,))
    block = keras.Model(block_in, keras.layers.Dense(6, name="inner")(block_in), name="block")
    shared = keras.layers.Dense(6, name="shared")
    inp = keras.Input((6,))
    h = shared(block(inp))
    h = shared(h)
    model = keras.Model(inp, h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predicted = autoinit_tf.analyze(model)
    measured = measure(model)
    assert [r.name for r in measured.rows] == [r.name for r in predicted.rows]
    assert "block/inner" in [r.name for r in measured.rows]
    both = predicted.with_measurement(measured)
    assert all(r.measured for r in both.rows)


@pytest.mark.core
def test_nothing_changes_after_measure_analyze_compare():
    model = _mixed_model()
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 8, 8, 3)).astype("float32")
    model.fit(x, rng.standard_normal((8, 5)).astype("float32"), epochs=1, verbose=0)
    before = _snapshot(model)
    assert any("moving_mean" in p for p, _ in before)
    assert any("seed_generator" in p for p, _ in before)  # Dropout's RNG state
    assert sum("adam" in p for p, _ in before) > 2  # optimizer slots
    measure(model, x, training=True)
    measure(model)
    autoinit_tf.analyze(model)
    rep = compare(model, x)
    rep.table(color=False)
    after = _snapshot(model)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (path, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype and np.array_equal(a, b), path


def _mlp(depth, width, act, fused):
    inp = keras.Input((width,))
    h = inp
    for _ in range(depth):
        if fused:
            h = keras.layers.Dense(width, activation=act)(h)
        else:
            h = keras.layers.Activation(act)(keras.layers.Dense(width)(h))
    return keras.Model(inp, keras.layers.Dense(10)(h))


def _realized(report, row):
    r = report[row.name]
    return (r.preactivation or r.outputs[0]).var


def _check_calibrated(model, fresh, tol=0.05, **measure_kw):
    _, report = autoinit_tf.wrap(model, calibrate="probe", seed=0, return_report=True)
    weighted = [r for r in report.rows if r.weighted]
    assert weighted and set(report.calibration) == {r.name for r in weighted}
    for r in weighted:  # exact on the calibration probe
        assert any(n.startswith("calibrated: kernel x") for n in r.notes), r.notes
        assert (r.preactivation or r.measured[0]).var == pytest.approx(1.0, rel=1e-3), r.name
    again = measure(model, fresh, **measure_kw) if fresh is not None else measure(model, seed=123, **measure_kw)
    ratios = np.array([_realized(again, r) for r in weighted])
    assert np.all(np.abs(ratios - 1.0) <= tol), (ratios.min(), ratios.max())
    return ratios


@pytest.mark.core
@pytest.mark.parametrize("act,fused", [("relu", False), ("tanh", True), ("selu", False)])
def test_calibrate_probe_deep_mlp(act, fused):
    keras.utils.set_random_seed(0)
    model = _mlp(100, 64, act, fused)
    # 8192 fresh examples: on 1024 the worst of the 100 layers' measured variances alone moves by +-3%
    # from one fresh seed to the next (per-example energies spread with depth)
    _check_calibrated(model, None, batch_size=8192)


def test_calibrate_probe_plain_cnn():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = inp
    for i, f in enumerate([16, 16, 32, 32, 32]):
        h = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(h)
        if i in (1, 3):
            h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    _check_calibrated(model, None, batch_size=256)


def test_calibrate_probe_small_resnet():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(16, 3, padding="same")(inp)
    for _ in range(3):
        b = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
        b = keras.layers.BatchNormalization()(b)
        b = keras.layers.Conv2D(16, 3, padding="same")(b)
        h = keras.layers.Activation("relu")(keras.layers.Add()([h, b]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    _check_calibrated(model, None, batch_size=256)


@pytest.mark.core
def test_calibrate_on_data_with_nonzero_bias_is_exact():
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    h = keras.layers.Dense(24, bias_initializer=keras.initializers.Constant(0.3), activation="relu",
                           name="d1")(inp)
    h = keras.layers.Dense(24, bias_initializer=keras.initializers.RandomNormal(stddev=0.2), name="d2")(h)
    model = keras.Model(inp, h)
    x = (np.random.default_rng(3).standard_normal((128, 12)) * 3.0 + 1.0).astype("float32")
    # 128 examples fix d2's variance only to about +-5% (the weights differ per backend): said, with the batch
    # size that would do.
    with pytest.warns(CalibrationWarning, match=r"'d2' only to \+-\d+\.\d% .* batch_size=\d+"):
        rep = calibrate(model, x, signal_variance=2.0)
    assert set(rep.calibration) == {"d1", "d2"}
    after = measure(model, x)
    assert after["d1"].preactivation.var == pytest.approx(2.0, rel=1e-3)
    assert after["d2"].outputs[0].var == pytest.approx(2.0, rel=1e-3)


@pytest.mark.core
def test_calibrate_bias_split_conv_and_attention_is_exact():
    # Conv2D and MultiHeadAttention with nonzero biases: the bias term is computed on one example.
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(8, 3, padding="same", bias_initializer=keras.initializers.RandomNormal(stddev=0.5),
                            activation="relu", name="conv")(inp)
    h = keras.layers.Reshape((36, 8))(h)
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    h = mha(h, h)
    model = keras.Model(inp, h)
    mha._output_dense.bias.assign(np.linspace(-0.5, 0.5, 8).astype("float32"))
    mha._key_dense.bias.assign(np.full(mha._key_dense.bias.shape, 0.7, "float32"))
    x = (np.random.default_rng(0).standard_normal((32, 6, 6, 4)) * 2.0 + 0.5).astype("float32")
    with pytest.warns(CalibrationWarning, match="data sample of 32 examples"):
        rep = calibrate(model, x, signal_variance=1.5)
    # The query, key and value projections first, each on its input, then the output projection.
    assert set(rep.calibration) == {"conv", "mha", "mha/query", "mha/key", "mha/value"}
    after = measure(model, x)
    assert after["conv"].preactivation.var == pytest.approx(1.5, rel=1e-3)
    assert after["mha"].outputs[0].var == pytest.approx(1.5, rel=1e-3)
    tokens = keras.ops.convert_to_numpy(keras.Model(inp, model.layers[-2].output)(x))
    for dense in (mha._query_dense, mha._key_dense, mha._value_dense):
        assert float(np.var(keras.ops.convert_to_numpy(dense(tokens)))) == pytest.approx(1.5, rel=1e-3)


@pytest.mark.core
def test_calibrate_grouped_query_attention_projections_and_output_are_exact():
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 12))
    h = keras.layers.LayerNormalization(name="ln")(inp)
    gqa = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2, name="gqa")
    model = keras.Model(inp, gqa(h, h))
    # Anisotropic tokens: two directions carry most of the energy, so a projection's variance depends on
    # its particular kernel, not only on its scale.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 10, 12)) * np.r_[5.0, 4.0, np.ones(10)]).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        rep = calibrate(model, x, signal_variance=0.5)
    assert set(rep.calibration) == {"gqa", "gqa/query", "gqa/key", "gqa/value"}
    tokens = keras.ops.convert_to_numpy(model.get_layer("ln")(x))
    for dense in (gqa._query_dense, gqa._key_dense, gqa._value_dense):
        assert float(np.var(keras.ops.convert_to_numpy(dense(tokens)))) == pytest.approx(0.5, rel=1e-3)
    assert float(np.var(keras.ops.convert_to_numpy(model(x)))) == pytest.approx(0.5, rel=1e-3)


@pytest.mark.core
def test_wrap_calibrate_without_report_equals_with_report():
    # wrap(calibrate=...) without return_report skips the per-node statistics: same weights.
    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(inp, keras.layers.Dense(4, bias_initializer="ones")(h))

    a, b = build(), build()
    autoinit_tf.wrap(a, seed=0, calibrate="probe")
    _, rep = autoinit_tf.wrap(b, seed=0, calibrate="probe", return_report=True)
    assert len(rep.calibration) == 2
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb), rtol=1e-6)


def _rnn_model(kind):
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((12, 8))
    if kind == "bidirectional":
        h = L.Bidirectional(L.LSTM(16, return_sequences=True))(inp)
        h = L.Bidirectional(L.GRU(16))(h)
    else:
        cls = {"lstm": L.LSTM, "gru": L.GRU, "simple_rnn": L.SimpleRNN}[kind]
        h = cls(32, return_sequences=True)(inp)
        h = cls(32)(h)
    return keras.Model(inp, L.Dense(10)(h))


def _cells(layer):
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer.cell, layer.backward_layer.cell]
    return [layer.cell]


@pytest.mark.core
@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn", "bidirectional"])
def test_calibrate_probe_recurrent(kind):
    # AutoInit's recurrent rule targets the input contribution x W of each gate's pre-activation: after
    # calibration every gate's x W has the target variance on the probe, and on a fresh probe every
    # weighted layer (recurrent layers and the head) is within 5%.
    model = _rnn_model(kind)
    _, report = autoinit_tf.wrap(model, calibrate="probe", seed=0, return_report=True)
    weighted = [r for r in report.rows if r.weighted]
    assert len(weighted) == 3 and set(report.calibration) == {r.name for r in weighted}
    probe = autoinit_tf.measure(model, batch_size=256, seed=0)  # the calibration probe's distribution
    for layer in model.layers:
        if layer.name not in report.calibration or isinstance(layer, keras.layers.Dense):
            continue
        assert any(n.startswith("calibrated: input kernel x(") for n in report[layer.name].notes)
        factors = report.calibration[layer.name]
        assert len(factors) == sum(c.kernel.shape[-1] // c.units for c in _cells(layer))
        # measure() reports x W (all gates side by side) as the row's pre-activation: check it by hand.
        x = keras.ops.convert_to_numpy(_layer_input(model, layer, seed=3))
        z = np.concatenate([x.reshape(-1, x.shape[-1]) @ keras.ops.convert_to_numpy(c.kernel) for c in _cells(layer)],
                           axis=1)
        got = autoinit_tf.measure(model, batch_size=64, seed=3)[layer.name].preactivation
        assert got.var == pytest.approx(z.astype(np.float64).var(), rel=1e-4)
        assert probe[layer.name].preactivation.var == pytest.approx(1.0, abs=0.05)
    fresh = autoinit_tf.measure(model, batch_size=2048, seed=123)
    ratios = np.array([_realized(fresh, r) for r in weighted])
    assert np.all(np.abs(ratios - 1.0) <= 0.05), ratios


def _layer_input(model, layer, seed):
    from autoinit_tf.inputs import probe_arrays

    (x,) = probe_arrays(graph.as_functional(model), None, 64, seed)  # the probe measure(batch_size=64, seed) uses
    if layer.input is model.inputs[0]:
        return x
    return keras.Model(model.inputs, layer.input)(x)


@pytest.mark.core
def test_calibrate_recurrent_changes_only_the_input_kernels():
    # Calibration scales each gate's columns of the input kernels (and the Dense kernel); recurrent
    # kernels, biases, BN moving statistics, RNG state and optimizer slots stay bit-identical.
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((10, 6))
    h = L.LSTM(16, return_sequences=True, name="lstm")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Dropout(0.2, name="drop")(h)
    h = L.Bidirectional(L.GRU(8), name="bi")(h)
    model = keras.Model(inp, L.Dense(3, name="head")(h))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((16, 10, 6)).astype("float32"), rng.standard_normal((16, 3)).astype("float32"),
              epochs=1, verbose=0)
    before = dict(_snapshot(model))
    rep = calibrate(model, "probe")
    assert set(rep.calibration) == {"lstm", "bi", "head"}
    scaled = {}
    for name in ("lstm", "bi"):
        layer = model.get_layer(name)
        factors = iter(rep.calibration[name])
        for cell in _cells(layer):
            gates = cell.kernel.shape[-1] // cell.units
            scaled[cell.kernel.path] = np.repeat([next(factors) for _ in range(gates)], cell.units)
    scaled[model.get_layer("head").kernel.path] = rep.calibration["head"]
    after = dict(_snapshot(model))
    assert list(before) == list(after)
    for path, a in before.items():
        if path in scaled:
            np.testing.assert_allclose(after[path], a * np.float32(scaled[path]), rtol=1e-6, err_msg=path)
        else:
            assert np.array_equal(a, after[path]), path


@pytest.mark.core
def test_calibrate_skips_frozen_and_keeps_report_rows():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    frozen = keras.layers.Dense(8, name="frozen")
    frozen.trainable = False
    h = keras.layers.Dense(8, name="free")(frozen(inp))
    model = keras.Model(inp, h)
    k = np.array(frozen.kernel.numpy() if hasattr(frozen.kernel, "numpy") else frozen.kernel)
    rep = calibrate(model, "probe")
    assert list(rep.calibration) == ["free"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(frozen.kernel), k)


def test_compare_default_init_vs_wrap():
    keras.utils.set_random_seed(0)
    model = _mlp(3, 64, "relu", False)
    rep = compare(model, seed=0)
    assert rep.has_measurement and all(r.measured for r in rep.rows)
    autoinit_tf.wrap(model, seed=0)
    rep2 = compare(model, seed=0, batch_size=1024)  # analyze with the same seed predicts wrap's weights
    errs = dict(rep2.log_errors())
    assert set(errs) == {r.name for r in rep2.rows}
    first = rep2.rows[0]
    assert first.weighted and errs[first.name] < 0.05  # Gaussian input, exact drawn weights
    assert rep2.rows[0].measured[0].var == pytest.approx(measure(model, batch_size=1024).rows[0].outputs[0].var)


@pytest.mark.core
def test_relative_standard_error_predicts_the_spread_of_variance_estimates():
    # Heavy-tailed examples: each example's 32 values share a log-normal scale. The RSE computed from one
    # batch's per-example moments must match the spread of the variance estimate over many batches.
    rng = np.random.default_rng(0)
    n, batches = 256, 600
    scale = np.exp(0.4 * rng.standard_normal((batches, n, 1)))
    x = scale * rng.standard_normal((batches, n, 32)) + 0.3
    estimates = x.reshape(batches, -1).var(axis=1)
    spread = estimates.std() / estimates.mean()
    flat = x[0]
    rse = statistics.relative_se(flat.mean(axis=1), np.mean(flat * flat, axis=1))
    rses = [statistics.relative_se(b.mean(axis=1), np.mean(b * b, axis=1)) for b in x]
    assert np.median(rses) == pytest.approx(spread, rel=0.15)
    assert rse == pytest.approx(spread, rel=0.5)
    # The sliced backend path gives the same per-example moments as numpy.
    m1, m2 = statistics.example_moments(keras.ops.convert_to_tensor(x[0].astype("float32")))
    np.testing.assert_allclose(m1, x[0].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m2, np.mean(x[0] ** 2, axis=1), rtol=1e-5)


@pytest.mark.core
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-3)])
def test_per_example_moments_of_large_tensors_match_numpy(dtype, rtol):
    """Past the numpy size (2**20 elements): float32 by a mean and a batched dot product, half precision in
    batch slices; both against float64 numpy."""
    rng = np.random.default_rng(1)
    x = (np.exp(0.5 * rng.standard_normal((40, 1, 1, 1))) * rng.standard_normal((40, 64, 64, 16)) + 0.2)
    m1, m2 = statistics.example_moments(keras.ops.convert_to_tensor(x.astype(dtype)))
    flat = x.astype(dtype).astype(np.float64).reshape(40, -1)
    np.testing.assert_allclose(m1, flat.mean(axis=1), rtol=rtol, atol=rtol * 1e-1)
    np.testing.assert_allclose(m2, np.mean(flat ** 2, axis=1), rtol=rtol)


def _cubic_model():
    # d1 -> cube -> d2: d2's input is heavy-tailed, so a 1024-example probe knows its variance to ~7%.
    inp = keras.Input((16,))
    h = keras.layers.Dense(16, name="d1")(inp)
    return keras.Model(inp, keras.layers.Dense(8, name="d2")(keras.ops.power(h, 3)))


@pytest.mark.core
def test_probe_grows_until_heavy_tailed_variances_are_known_to_the_target_precision():
    keras.utils.set_random_seed(0)
    model = _cubic_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate="probe", return_report=True)
    assert rep.calibration_batch > 4 * 1024  # grew from the automatic 1024
    assert set(rep.calibration_error) == {"d1", "d2"}
    assert max(rep.calibration_error.values()) <= CALIBRATION_RSE
    assert "+-" in " ".join(rep["d2"].notes) and f"on {rep.calibration_batch} examples" in " ".join(rep["d2"].notes)
    data = rep.to_dict()
    assert data["calibration_batch"] == rep.calibration_batch and set(data["calibration_error"]) == {"d1", "d2"}
    # A fresh probe 4x larger lands within 5% of the target on both layers.
    again = measure(model, batch_size=4 * rep.calibration_batch, seed=77)
    assert again["d1"].outputs[0].var == pytest.approx(1.0, rel=0.05)
    assert again["d2"].outputs[0].var == pytest.approx(1.0, rel=0.05)


@pytest.mark.core
def test_probe_growth_stops_at_the_memory_bound_and_warns(monkeypatch):
    keras.utils.set_random_seed(0)
    model = _cubic_model()
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)  # widest activation: 16 per example
    monkeypatch.setattr(calibration, "MAX_ROUNDS", 1)  # no rounds on fresh probes: one probe, a warning
    with pytest.warns(CalibrationWarning, match=r"'d2' only to .* probe of 2048 examples \(the automatic probe "
                                                r"stops growing there.*MAX_ROUNDS = \d+ \(each round one replay"):
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate="probe", return_report=True)
    assert rep.calibration_batch == 2048
    assert rep.calibration_error["d2"] > CALIBRATION_RSE
    # An explicit batch size is used as given (no growth).
    with pytest.warns(CalibrationWarning, match="probe of 512 examples"):
        rep = calibrate(model, "probe", batch_size=512)
    assert rep.calibration_batch == 512


@pytest.mark.core
@pytest.mark.parametrize("training_batch", [32, 50])
def test_a_grown_probe_is_whole_training_batches(monkeypatch, training_batch):
    """Grown to the memory bound (2000 examples here), the probe is cut down to whole training batches, so
    batch-statistics layers normalize every chunk over as many examples as training will."""
    keras.utils.set_random_seed(0)
    model = _cubic_model()
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2000)
    monkeypatch.setattr(calibration, "MAX_ROUNDS", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate="probe", return_report=True,
                                  training_batch_size=training_batch)
    assert rep.calibration_batch == 2000 - 2000 % training_batch


@pytest.mark.core
def test_rounds_on_fresh_probes_accumulate_precision_past_the_memory_bound(monkeypatch):
    """Statistics accumulate over several probes (each round moves the factors by the k-th root of its
    own estimate), so precision is not bounded by one batch's memory (here 2048 examples): over 24 models and
    seeds, the realized error of the heavy-tailed layer (its variance measured on 131072 fresh examples) with up
    to 8 rounds is, in root mean square, well under one round's (expected 1/sqrt(rounds used), ~0.5 here; 0.75
    leaves a margin of about two standard errors of the ratio of two 24-sample RMS), and within 2x of what
    the calibration itself claims (`calibration_error`). (The earlier form, two seeds, passed or failed with
    the random streams: its ratio of two-sample sums has a spread of about 50%.)"""
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)
    errors, claimed = {1: [], 8: []}, {1: [], 8: []}
    for seed in range(1, 25):
        for rounds in (1, 8):
            monkeypatch.setattr(calibration, "MAX_ROUNDS", rounds)
            keras.utils.set_random_seed(seed)
            model = _cubic_model()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                _, rep = autoinit_tf.wrap(model, seed=seed, calibrate="probe", return_report=True)
            assert rep.calibration_batch == 2048
            again = measure(model, batch_size=1 << 17, seed=77)
            errors[rounds].append(math.log(again["d2"].outputs[0].var))
            claimed[rounds].append(rep.calibration_error["d2"])

    def rms(v):
        return math.sqrt(sum(x * x for x in v) / len(v))

    assert rms(errors[8]) < 0.75 * rms(errors[1])
    assert rms(errors[8]) < 2.0 * rms(claimed[8])
    assert rms(claimed[8]) < 0.6 * rms(claimed[1])


class _OpaqueCube(keras.layers.Layer):
    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            raise TypeError("concrete tensors only")
        return x * x * x


@pytest.mark.core
def test_the_default_wrap_refines_over_at_most_auto_rounds_probes_and_says_what_refines_further(monkeypatch):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = keras.layers.Dense(16, name="d1")(inp)
    h = _OpaqueCube(name="cube")(h)  # no rule, not traceable: probe-estimated, so d2 is auto-calibrated
    model = keras.Model(inp, keras.layers.Dense(8, name="d2")(h))
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", autoinit_tf.FallbackRuleWarning)
        with pytest.warns(CalibrationWarning, match=rf"'d2' only to .* on the {calibration.AUTO_ROUNDS} probes of "
                                                    r"2048 examples.*calibrate=\"probe\"\) refines over up to 8"):
            _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert "d2" in rep.auto_calibrated and rep.calibration_batch == 2048


def _replay_sizes(monkeypatch):
    """The probe size of every calibration replay that runs (recorded in order)."""
    from autoinit_tf import signal_replay

    sizes, run = [], signal_replay.SignalReplay.run

    def recording(self, inputs):
        sizes.append(int(keras.tree.flatten(inputs)[0].shape[0]))
        return run(self, inputs)

    monkeypatch.setattr(signal_replay.SignalReplay, "run", recording)
    return sizes


@pytest.mark.core
@pytest.mark.parametrize("spread,first", [(None, 1024), (0.1, 1024), (100.0, 2048)])
def test_a_predicted_energy_spread_past_the_memory_bound_starts_the_probe_there(monkeypatch, spread, first):
    """The first probe is the automatic one (1024 examples here) unless the predicted spread of the examples'
    energies needs more than the memory bound allows (2048 here) for `GROWTH_RSE`: 1.1 * 0.1 / 0.015^2 = 489
    examples do not, 1.1 * 100 / 0.015^2 do. Either way the probe ends at the bound (the cube's heavy tail)."""
    keras.utils.set_random_seed(0)
    model = _cubic_model()
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)
    monkeypatch.setattr(calibration, "MAX_ROUNDS", 1)
    sizes = _replay_sizes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        replay, _ = calibration.calibration_replay(model, "probe", only=None, record=False, seed=0,
                                                   energy_spread=spread)
    assert sizes[0] == first and replay.batch == 2048
    assert len(sizes) == (1 if first == 2048 else 2)


def _replay_records(monkeypatch):
    """(probe size, whether it records per-node statistics) of every calibration replay that runs."""
    from autoinit_tf import signal_replay

    runs, run = [], signal_replay.SignalReplay.run

    def recording(self, inputs):
        runs.append((int(keras.tree.flatten(inputs)[0].shape[0]), self.record))
        return run(self, inputs)

    monkeypatch.setattr(signal_replay.SignalReplay, "run", recording)
    return runs


@pytest.mark.core
def test_only_the_last_calibration_probe_records_its_statistics(monkeypatch):
    """Only the last replay's per-node statistics reach the report: where the predicted spread says more
    probes will follow, the earlier ones record nothing. Recording changes no calibrated value, and the
    report's rows are those of the last probe (every node, measured)."""
    keras.utils.set_random_seed(0)
    model = _cubic_model()
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)
    monkeypatch.setattr(calibration, "MAX_ROUNDS", 3)
    runs = _replay_records(monkeypatch)
    got = {}
    for record in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            got[record], _ = calibration.calibration_replay(model, "probe", only=None, record=record, seed=0,
                                                            energy_spread=100.0)
    recorded, plain = runs[:len(runs) // 2], runs[len(runs) // 2:]
    assert recorded == [(2048, False), (2048, False), (2048, True)]  # sqrt(100 / 2048) > CALIBRATION_RSE
    assert plain == [(2048, False)] * 3
    assert got[True].factors == got[False].factors and got[True].rse == got[False].rse
    rows = got[True].rows
    assert [r.name for r in rows if r.weighted] == ["d1", "d2"] and len(rows) > 2
    assert all(r.outputs and math.isfinite(r.outputs[0].var) for r in rows)


@pytest.mark.core
def test_a_probe_predicted_to_be_followed_but_precise_enough_gets_one_recorded_round(monkeypatch):
    """A predicted spread that the first probe proves wrong (a linear model: its variances are known to far
    better than `CALIBRATION_RSE`) leaves that probe unrecorded; one more round, recorded, gives the report
    its rows (and refines the factors)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    model = keras.Model(inp, keras.layers.Dense(8, name="d2")(keras.layers.Dense(16, name="d1")(inp)))
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 2048)
    runs = _replay_records(monkeypatch)
    replay, _ = calibration.calibration_replay(model, "probe", only=None, record=True, seed=0, energy_spread=100.0)
    assert [r for _, r in runs] == [False, True] and replay.rounds == 2
    assert [r.name for r in replay.rows if r.weighted] == ["d1", "d2"]
    # without a prediction every probe records, as before (whether another follows is known only after it)
    runs.clear()
    replay, _ = calibration.calibration_replay(model, "probe", only=None, record=True, seed=0)
    assert runs and all(r for _, r in runs) and replay.rounds == 1


@pytest.mark.core
def test_the_default_wrap_of_a_gated_network_starts_its_probe_at_the_memory_bound(monkeypatch):
    """After a squeeze-and-excitation gate every example has its own scale (`Moments.scale` > 0): wrap's default
    passes the predicted spread, so the calibration does not first replay the small automatic probe (8 examples
    of 16 x 16 x 64) that could only say the probe must grow to the memory bound."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 64))
    h = inp
    for b, width in enumerate((128, 8)):  # the first conv's output is the widest activation
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"c{b}")(h)
        g = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
        g = keras.layers.Conv2D(4, 1, activation="relu")(g)
        g = keras.layers.Conv2D(width, 1, activation="sigmoid")(g)
        h = keras.layers.Multiply()([h, g])
    h = keras.layers.Conv2D(8, 3, padding="same", name="c2")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(h)))
    report = autoinit_tf.analyze(model, seed=0)
    names = {r.name for r in report.rows if r.name in ("c2", "head")}
    lam = max(r.outputs[0].scale or 0.0 for r in report.rows if r.name in names)
    need = 1.1 * math.expm1(lam) / calibration.GROWTH_RSE ** 2  # examples for GROWTH_RSE
    bound = 8 * max(int(need // 8), 1)  # whole training batches of 8
    assert 8 < bound <= need, "the gate's predicted spread needs more than the bound set below"
    monkeypatch.setattr(calibration, "GROWTH_ELEMENTS", 16 * 16 * 128 * bound)
    sizes = _replay_sizes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True, training_batch_size=8)
    assert names <= set(rep.auto_calibrated), "the gate makes the layers after it estimates"
    assert sizes[0] == bound and set(sizes) == {bound}
    # without the prediction, the first probe is the automatic 8 examples, a replay more
    sizes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        calibration.calibration_replay(model, "probe", only=rep.auto_calibrated, record=False, seed=0,
                                       training_batch_size=8)
    assert sizes[0] == 8 and len(sizes) > 1 and sizes[1] > 8  # then a larger one
