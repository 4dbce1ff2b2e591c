"""Network slimming: exactness of the channel surgery (channels with gamma = 0 removed, the model's outputs
unchanged thanks to the bias fold), residual coupling, Concatenate and Flatten index maps, the ratio and
min_channels rules, the sparsity regularizer, and keras.applications models pruned and reloaded."""

import os

import numpy as np
import pytest

import keras

from autoinit_tf.slimming import add_bn_sparsity, prune_channels, remove_bn_sparsity

pytestmark = pytest.mark.core


def _set_bn(model, zero=2, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            g = rng.uniform(0.5, 1.5, c)
            g[:zero] = 0.0
            layer.gamma.assign(g)
            layer.beta.assign(rng.normal(size=c))
            layer.moving_mean.assign(0.1 * rng.normal(size=c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))


def _branchy():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(keras.layers.Conv2D(8, 3, name="c1")(inp)))
    a = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn2")(keras.layers.Conv2D(6, 1, name="c2")(h)))
    b = keras.layers.ELU()(keras.layers.BatchNormalization(name="bn3")(keras.layers.Conv2D(4, 3, name="c3")(h)))
    b = keras.layers.ZeroPadding2D()(b)
    c = keras.layers.Concatenate()([a, b])
    return keras.Model(inp, keras.layers.Dense(5, name="head")(keras.layers.Flatten()(c)))


def _predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_removing_zero_gamma_channels_keeps_the_outputs():
    model = _branchy()
    _set_bn(model)
    new, report = prune_channels(model, threshold=1e-9)
    assert report.channels == {"c1": (6, 8), "c2": (4, 6), "c3": (2, 4)}
    assert new.get_layer("c1").kernel.shape == (3, 3, 3, 6) and new.get_layer("c2").kernel.shape == (1, 1, 6, 4)
    assert new.get_layer("head").kernel.shape[0] == 6 * 6 * 6
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    # c3 is 3x3 'valid' on c1's output and the zero padding is after bn3: every fold is exact here
    np.testing.assert_allclose(_predict(new, x), _predict(model, x), rtol=1e-4, atol=1e-4)
    # the original model is untouched (its gammas were zeroed only while the folds were computed)
    assert model.get_layer("c1").kernel.shape[-1] == 8
    assert float(np.abs(keras.ops.convert_to_numpy(model.get_layer("bn1").gamma.value)).max()) > 0.5


def test_residual_groups_are_kept_whole_and_the_rest_is_pruned():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 4))
    r = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(8, 1, name="ca")(inp)))
    r = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Conv2D(4, 1, name="cb")(r))
    h = keras.layers.ReLU()(keras.layers.Add()([inp, r]))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h)))
    _set_bn(model, zero=3)
    new, report = prune_channels(model, threshold=1e-9)
    assert report.coupled == ["bn_b"] and report.channels == {"ca": (5, 8)}
    assert new.get_layer("cb").kernel.shape == (1, 1, 5, 4)
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 4)).astype("float32")
    np.testing.assert_allclose(_predict(new, x), _predict(model, x), rtol=1e-4, atol=1e-4)


def test_ratio_is_global_and_no_layer_is_emptied():
    model = _branchy()
    _set_bn(model, zero=0)
    bn3 = model.get_layer("bn3")
    bn3.gamma.assign(np.full(4, 1e-3, np.float32))  # the smallest everywhere
    new, report = prune_channels(model, ratio=0.25, min_channels=2)
    assert report.channels["c3"] == (2, 4)  # would have been emptied: min_channels keeps two
    removed = sum(n - k for k, n in report.channels.values())
    assert removed == int(0.25 * 18) - 2  # floor(ratio * N) chosen, two given back to c3
    with pytest.raises(ValueError, match="exactly one"):
        prune_channels(model)


def test_sparsity_regularizer_adds_l1_of_gamma():
    model = _branchy()
    _set_bn(model, zero=0)
    assert add_bn_sparsity(model, lam=1e-2) == 3
    gammas = [keras.ops.convert_to_numpy(model.get_layer(n).gamma.value) for n in ("bn1", "bn2", "bn3")]
    expected = 1e-2 * sum(np.abs(g).sum() for g in gammas)
    assert float(sum(keras.ops.convert_to_numpy(v) for v in model.losses)) == pytest.approx(expected, rel=1e-5)
    remove_bn_sparsity(model)
    assert not model.losses


def test_keras_application_prunes_and_reloads(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    _set_bn(model, zero=0)
    new, report = prune_channels(model, ratio=0.4)
    assert report.params_after < 0.7 * report.params_before and report.coupled  # residual groups kept
    path = os.path.join(tmp_path, "slim.keras")
    new.save(path)
    again = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(_predict(again, x), _predict(new, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "DenseNet121"])
def test_more_keras_applications_prune(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    _set_bn(model, zero=0)
    new, report = prune_channels(model, ratio=0.4)
    assert report.params_after < report.params_before
    assert _predict(new, np.zeros((1, 32, 32, 3), "float32")).shape == (1, 10)


def test_cli_prune_writes_a_smaller_model_and_never_touches_the_input(tmp_path):
    pytest.importorskip("tensorflow")
    from click.testing import CliRunner

    from autoinit_tf_cli.main import cli

    model = _branchy()
    _set_bn(model)
    src = tmp_path / "m.keras"
    model.save(src)
    before = src.read_bytes()
    r = CliRunner().invoke(cli, ["prune", str(src), "--threshold", "1e-9"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "m.slim.keras"
    assert out.exists() and "6 of 18 prunable channels removed" in r.output
    assert src.read_bytes() == before
    slim = keras.saving.load_model(out)
    assert slim.get_layer("c1").kernel.shape[-1] == 6
    r = CliRunner().invoke(cli, ["prune", str(src), "--threshold", "1e-9"])  # exists: refused
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(cli, ["prune", str(src), str(src), "--ratio", "0.3"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["prune", str(src)])
    assert r.exit_code == 2 and "exactly one" in r.output
