import keras
import numpy as np
import pytest

from autoinit_tf.layers import StochasticDepth, linear_decay_survival
from test_layer_common import fit_step, mixed_precision_finite, roundtrip, to_np


def xs(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 2)).astype("float32"), (rng.normal(size=(n, 3, 2)) + 3).astype("float32")


@pytest.mark.core
def test_linear_decay_rule():
    np.testing.assert_allclose(linear_decay_survival(4, 0.5), [0.875, 0.75, 0.625, 0.5])
    np.testing.assert_allclose(linear_decay_survival(1, 0.2), [0.2])
    np.testing.assert_allclose(linear_decay_survival(54)[-1], 0.5)
    # expected depth ~ 3L/4 for p_L = 0.5
    assert abs(sum(linear_decay_survival(54)) - (54 * 3 / 4 - 0.25)) < 1e-9
    with pytest.raises(ValueError):
        linear_decay_survival(0)


@pytest.mark.core
def test_paper_mode_one_bernoulli_per_batch():
    s, r = xs()
    layer = StochasticDepth(0.7, mode="paper", seed=1)
    kept = []
    for _ in range(300):
        out = to_np(layer([s, r], training=True))
        full = np.allclose(out, s + r, atol=1e-6)
        dropped = np.allclose(out, s, atol=1e-6)
        assert full != dropped  # the whole batch shares one draw
        kept.append(full)
    assert abs(np.mean(kept) - 0.7) < 4 * np.sqrt(0.21 / 300)
    np.testing.assert_allclose(to_np(layer([s, r], training=False)), s + 0.7 * r, atol=1e-6)


@pytest.mark.core
def test_drop_path_mode_per_example():
    s, r = xs(n=400)
    layer = StochasticDepth(0.8, mode="drop_path", seed=2)
    out = to_np(layer([s, r], training=True))
    kept = np.all(np.isclose(out, s + r / 0.8, atol=1e-5), axis=(1, 2))
    dropped = np.all(np.isclose(out, s, atol=1e-6), axis=(1, 2))
    assert np.all(kept ^ dropped)
    assert 0 < kept.sum() < 400 and abs(kept.mean() - 0.8) < 4 * np.sqrt(0.16 / 400)
    np.testing.assert_allclose(to_np(layer([s, r], training=False)), s + r, atol=1e-6)


@pytest.mark.core
@pytest.mark.parametrize("mode", ["paper", "drop_path"])
def test_p_one_and_p_zero(mode):
    s, r = xs()
    for training in (True, False):
        np.testing.assert_allclose(to_np(StochasticDepth(1.0, mode=mode)([s, r], training=training)), s + r, atol=1e-6)
    np.testing.assert_allclose(to_np(StochasticDepth(0.0, mode=mode)([s, r], training=True)), s, atol=1e-6)
    test_out = to_np(StochasticDepth(0.0, mode=mode)([s, r], training=False))
    np.testing.assert_allclose(test_out, s if mode == "paper" else s + r, atol=1e-6)
    with pytest.raises(ValueError):
        StochasticDepth(1.5)
    with pytest.raises(ValueError):
        StochasticDepth(0.5, mode="row")


@pytest.mark.core
def test_seeded_reproducible():
    s, r = xs(n=64)
    a = [to_np(StochasticDepth(0.5, mode="drop_path", seed=7)([s, r], training=True)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])


def _block(mode):
    inp = keras.Input((4, 4, 3))
    branch = keras.layers.Conv2D(3, 3, padding="same")(inp)
    return keras.Model(inp, StochasticDepth(0.6, mode=mode, seed=3, name="sd")([inp, branch]))


@pytest.mark.core
@pytest.mark.parametrize("mode", ["paper", "drop_path"])
def test_roundtrip_functional_fit(mode, tmp_path):
    x = np.random.default_rng(4).normal(size=(8, 4, 4, 3)).astype("float32")
    model = _block(mode)
    loaded = roundtrip(model, x, tmp_path)
    cfg = loaded.get_layer("sd").get_config()
    assert cfg["mode"] == mode and cfg["survival_probability"] == 0.6
    assert model.get_layer("sd").compute_output_shape([(None, 4, 4, 3)] * 2) == (None, 4, 4, 3)
    model = _block(mode)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    losses = [model.fit(x, np.zeros_like(x), batch_size=8, epochs=1, verbose=0).history["loss"][0] for _ in range(3)]
    assert np.all(np.isfinite(losses))
    if mode == "drop_path":  # per-example draws: some rows keep the branch, so weights move
        fit_step(_block(mode), x, np.zeros_like(x))


@pytest.mark.core
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = np.random.default_rng(5).normal(size=(4, 4, 4, 3)).astype("float32")
    mixed_precision_finite(lambda: _block("drop_path"), x, policy)
