"""Transfer: the linear probe against scikit-learn's LogisticRegression on the same features, and
`wrap(only=...)` / `fine_tune_model` (pretrained variables bit-identical, the new head on target for the
backbone's real features, measured on fresh data)."""

import warnings

import numpy as np
import pytest

import keras

import autoinit_tf
from autoinit_tf.transfer import extract_features, fine_tune_model, linear_probe

pytestmark = pytest.mark.core


def _digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (x.reshape(-1, 8, 8, 1) / 16.0).astype("float32")
    return x, y.astype("int32")


def _backbone(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Conv2D(24, 3, activation="relu", name="c2")(h)
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="gap")(h), name="backbone")


def test_linear_probe_equals_sklearn_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = _digits()
    backbone = _backbone()
    train, val = (x[:900], y[:900]), (x[900:1300], y[900:1300])
    grid = [1e-3, 1e-1, 10.0, 1e3]
    head, report = linear_probe(backbone, train, val, l2_grid=grid, progress=False, max_iter=5000)
    f_train, f_val = extract_features(backbone, train[0]), extract_features(backbone, val[0])

    def sk(features, labels, l2):
        return linear_model.LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=20000).fit(features, labels)

    accs = [float(np.mean(sk(f_train, train[1], l2).predict(f_val) == val[1])) for l2 in grid]
    np.testing.assert_allclose(report.val_accuracy, accs, atol=1.5 / len(val[1]))  # at most one example apart
    assert report.chosen_l2 == grid[int(np.argmax(report.val_accuracy))]
    ref = sk(np.concatenate([f_train, f_val]), np.concatenate([train[1], val[1]]), report.chosen_l2)
    w, b = (keras.ops.convert_to_numpy(v) for v in (head.kernel, head.bias))
    # sklearn's multinomial parametrization is the same (K columns, L2 on W only, b free up to a constant).
    np.testing.assert_allclose(w, ref.coef_.T, rtol=2e-3, atol=2e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3 * np.abs(ref.intercept_).max() + 1e-4)
    logits = keras.ops.convert_to_numpy(head(backbone(x[1300:], training=False)))
    assert np.mean(np.argmax(logits, 1) == y[1300:]) == pytest.approx(
        np.mean(ref.predict(extract_features(backbone, x[1300:])) == y[1300:]), abs=2.0 / len(x[1300:]))
    assert len(report.l2_grid) == 4 and "linear probe" in str(report)


def test_default_grid_is_kornblith():
    from autoinit_tf.transfer import DEFAULT_L2_GRID

    assert len(DEFAULT_L2_GRID) == 45
    assert DEFAULT_L2_GRID[0] == pytest.approx(1e-6) and DEFAULT_L2_GRID[-1] == pytest.approx(1e5)


@pytest.mark.parametrize("freeze", [True, False])
def test_fine_tune_model_initializes_only_the_head_from_real_features(freeze):
    x, _ = _digits()
    backbone = _backbone()
    # "pretrained": weights and BN statistics that are not an initialization
    rng = np.random.default_rng(0)
    backbone.get_layer("c2").kernel.assign(backbone.get_layer("c2").kernel * 2.5)
    backbone.get_layer("bn").moving_mean.assign(rng.uniform(0, 0.3, 16).astype("float32"))
    backbone.get_layer("bn").moving_variance.assign(rng.uniform(0.2, 0.6, 16).astype("float32"))
    before = {v.path: np.array(keras.ops.convert_to_numpy(v.value)) for v in backbone.variables}
    model = fine_tune_model(backbone, 10, data=x[:600], seed=0, freeze=freeze)
    for v in backbone.variables:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value), before[v.path])
    assert not backbone.get_layer("bn").trainable  # bn="freeze": pretrained statistics, never updated
    # The head's output variance is on target for fresh real images, in training and in inference mode.
    for training in (True, False):
        out = keras.ops.convert_to_numpy(model(x[600:1400], training=training))
        assert float(np.var(out)) == pytest.approx(1.0, rel=0.12), training
    # A Keras-initialized head is far from it on this backbone.
    default = fine_tune_model(backbone, 10, freeze=freeze)
    assert abs(np.log(float(np.var(keras.ops.convert_to_numpy(default(x[600:1400], training=False)))))) > 0.3


def test_wrap_only_keeps_every_other_variable_bit_identical():
    x, _ = _digits()
    backbone = _backbone()
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Dense(32, activation="relu", name="new_hidden")(backbone(inp))
    model = keras.Model(inp, keras.layers.Dense(10, name="new_head")(h))
    before = {v.path: np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables}
    model, report = autoinit_tf.wrap(model, only="new_*", data=x[:512], seed=0, return_report=True)
    changed = {v.path for v in model.variables
               if not np.array_equal(keras.ops.convert_to_numpy(v.value), before[v.path])}
    assert changed == {"new_hidden/kernel", "new_head/kernel"}
    assert set(report.assigned) <= {"new_hidden/kernel", "new_hidden/bias", "new_head/kernel", "new_head/bias"}
    assert set(report.calibration) == {"new_hidden", "new_head"}  # the backbone is not rescaled, even in the replay
    with pytest.raises(ValueError, match="matched no layer"):
        autoinit_tf.wrap(model, only="nothing_*")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autoinit_tf.wrap(model, only=["new_head"], seed=0)
    assert any("data=" in str(w.message) for w in caught)
