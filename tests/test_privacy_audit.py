"""The eight defects of the independent DP-SGD audit, one test (or more) each (TensorFlow backend;
the JAX noise test runs in a KERAS_BACKEND=jax subprocess)."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from autoinit_tf import privacy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _values(model):
    return [np.array(v.numpy()) for v in model.trainable_variables]


def _update(model, before):
    return np.concatenate([(a - b).ravel() for a, b in zip(before, _values(model))])


def _dense(width=3000, inputs=4):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(width, use_bias=False)])


# ----------------------------------------------------------------------------- 1. noise repeats
def _two_phase_noise(model, batch, width):
    """Updates of 2 steps after compile #1 and 2 steps after compile #2 (fresh optimizer): with no
    real row in the batch, an SGD(1) update is exactly -noise / batch_size."""
    sw = {"dp_poisson_mask": np.zeros(batch, bool), "dp_sampling_rate": np.float64(batch / 100)}
    x, y = np.zeros((batch, 4), "float32"), np.zeros((batch, width), "float32")
    phases = []
    for _ in range(2):
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        steps = []
        for _ in range(2):
            before = _values(model)
            model.train_on_batch(x, y, sample_weight=sw)
            steps.append(_update(model, before))
        phases.append(steps)
    return phases


def test_noise_never_repeats_across_compiles_tf():
    model = privacy.make_private(_dense(), l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=10, dataset_size=100, seed=5)
    (a0, a1), (b0, b1) = _two_phase_noise(model, 10, 3000)
    for u, v in [(a0, b0), (a1, b1), (a0, a1), (b0, b1)]:
        assert abs(np.corrcoef(u, v)[0, 1]) < 0.05  # 12000 coordinates: |corr| ~ 0.009 by chance


JAX_NOISE = textwrap.dedent(
    r"""
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np, keras
    from autoinit_tf import privacy
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3000, use_bias=False)])
    privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=10, dataset_size=100, seed=5)
    sw = {"dp_poisson_mask": np.zeros(10, bool), "dp_sampling_rate": np.float64(0.1)}
    vals = lambda: [np.array(v.numpy()) for v in model.trainable_variables]
    phases = []
    for _ in range(2):
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        steps = []
        for _ in range(2):
            before = vals()
            model.train_on_batch(np.zeros((10, 4), "float32"), np.zeros((10, 3000), "float32"), sample_weight=sw)
            steps.append(np.concatenate([(a - b).ravel() for a, b in zip(before, vals())]))
        phases.append(steps)
    (a0, a1), (b0, b1) = phases
    corr = [abs(np.corrcoef(u, v)[0, 1]) for u, v in [(a0, b0), (a1, b1), (a0, a1)]]
    print("CORR", corr)
    assert max(corr) < 0.05, corr
    assert abs(a0.std() / 0.1 - 1) < 0.05  # std sigma C / B
    print("JAX NOISE OK")
    """
)


def test_noise_never_repeats_across_compiles_jax():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-c", JAX_NOISE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "JAX NOISE OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


# ------------------------------------------------------------ 2. augmentation vs noise randomness
def test_augmentation_randomness_independent_of_noise():
    b, k = 160, 2
    captured = tf.Variable(tf.zeros([2], tf.int64), trainable=False)
    flip_only = privacy.random_flip_and_crop(padding=0)

    def augment(x, seed):
        captured.assign(tf.cast(seed, tf.int64))
        return flip_only(x, seed)

    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(2000, use_bias=False)])
    privacy.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=b, dataset_size=1600, augmult=k, augment=augment,
        seed=11, per_example_method="vectorized_map", jit_compile=False,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    agree = []
    for _ in range(2):
        before = _values(model)
        sw = {"dp_poisson_mask": np.zeros(b, bool), "dp_sampling_rate": np.float64(b / 1600)}
        model.train_on_batch(np.zeros((b, 2, 2, 1), "float32"), np.zeros((b, 2000), "float32"), sample_weight=sw)
        noise = -_update(model, before) * b  # no real rows: the update is -noise / B
        # the flips this step made: augment an image whose columns differ, with the seed it got
        probe = np.tile(np.array([[0.0, 1.0], [0.0, 1.0]], "float32")[None, :, :, None], (b * k, 1, 1, 1))
        flipped = flip_only(tf.constant(probe), captured.read_value()).numpy()[:, 0, 0, 0] == 1.0
        agree.extend(flipped[1::2] == (noise[0 : 2 * b : 2] > 0))
    agree = np.array(agree)
    # was 320 of 320 (the flips read the noise's own Philox stream); independent: Binomial(n, 1/2)
    assert stats.binomtest(int(agree.sum()), len(agree), 0.5).pvalue > 1e-4, agree.mean()


def test_flip_and_crop_stateless():
    aug = privacy.random_flip_and_crop(padding=2)
    x = tf.constant(np.arange(64 * 8 * 8, dtype="float32").reshape(64, 8, 8, 1))
    a = aug(x, tf.constant([3, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(a, aug(x, tf.constant([3, 7], tf.int64)).numpy())  # same seed, same views
    assert not np.array_equal(a, aug(x, tf.constant([3, 9], tf.int64)).numpy())


# ------------------------------------------------------------------ 3. example-mixing layers
class CenterOverBatch(keras.layers.Layer):
    """A custom layer no name list knows: x - mean over the batch."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


class PerExampleScale(keras.layers.Layer):
    def build(self, shape):
        self.g = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.g


def _mlp(middle):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), middle, keras.layers.Dense(3)])


def _clipped_sum(model, x, y, c=1.0):
    engine = privacy.PerExampleGradients(model, LOSS)
    trainable = [v.value for v in model.trainable_variables]
    nt = [v.value for v in model.non_trainable_variables]
    sums, _, _, _, _ = engine.clipped_sum(trainable, nt, x, y, tf.ones([len(x)], tf.bool), tf.constant(c), tf.constant([0, 0], tf.int64))
    return np.concatenate([s.numpy().ravel() for s in sums])


def test_custom_mixing_layer_refused_by_the_probe_not_by_name():
    keras.utils.set_random_seed(0)  # the weights decide how far one example moves the others' gradients
    model = _mlp(CenterOverBatch(name="center"))
    # what the refusal prevents: the clipped sum moves by more than C between neighbouring batches
    # (every example clipped: inputs x10; largest over the 8 neighbours, 1.35-2.74 over init seeds 0-5)
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=(8, 6)) * 10).astype("float32"), rng.integers(0, 3, 8)
    s_full = _clipped_sum(model, x, y)
    moved = [np.linalg.norm(s_full - _clipped_sum(model, np.delete(x, d, 0), np.delete(y, d))) for d in range(8)]
    assert max(moved) > 1.2, moved
    before = [np.array(v.numpy()) for v in model.variables]
    with pytest.raises(privacy.ExampleMixingLayerError, match="'center' \\(CenterOverBatch\\)"):
        privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)
    for a, v in zip(before, model.variables):
        np.testing.assert_array_equal(a, v.numpy())  # the probe changed nothing


def test_mixup_inside_the_model_refused():
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.MixUp(name="mix"), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with pytest.raises(privacy.ExampleMixingLayerError, match="'mix'"):
        privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)


def test_mixing_inside_a_nested_block_names_the_inner_layer():
    inner = keras.Sequential([keras.layers.Dense(8), CenterOverBatch(name="inner_center"), keras.layers.Dense(8)], name="block")
    model = keras.Sequential([keras.Input((6,)), inner, keras.layers.Dense(3)])
    with pytest.raises(privacy.ExampleMixingLayerError, match="inner_center"):
        privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)


def test_accepted_model_holds_the_sensitivity_bound():
    keras.utils.set_random_seed(0)
    model = _mlp(PerExampleScale())
    privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 6)).astype("float32") * 10, rng.integers(0, 3, 8)
    for drop in range(8):
        keep = np.arange(8) != drop
        d = np.linalg.norm(_clipped_sum(model, x, y) - _clipped_sum(model, x[keep], y[keep]))
        assert d <= 1.0 + 1e-5


def test_subclassed_model_without_inputs_needs_probe_inputs():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="probe_inputs"):
        privacy.make_private(net, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)
    privacy.make_private(net, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40,
                         probe_inputs=np.ones((4, 5), "float32"))


# ----------------------------------------------------------------- 4. epsilon of the rates used
def _cnn():
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(), keras.layers.Dense(3)])


RNG = np.random.default_rng(3)
X = RNG.normal(size=(200, 6, 6, 1)).astype("float32")
Y = RNG.integers(0, 3, 200)


def _private(**kw):
    model = privacy.make_private(_cnn(), l2_norm_clip=1.0, noise_multiplier=kw.pop("sigma", 0.8),
                                 batch_size=kw.pop("batch_size", 20), dataset_size=200, accountant="rdp", **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    return model


def _dp_accounting_epsilon(events, sigma, delta=1e-5):
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    for q, n in events:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n))
    return acc.get_epsilon(delta)


def test_epsilon_uses_the_rate_the_batches_carried():
    model = _private()
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0, steps_per_epoch=2), epochs=1, verbose=0)
    model.fit(privacy.poisson_batches(X, Y, batch_size=40, seed=0, steps_per_epoch=3), epochs=1, verbose=0)
    st = privacy.statement(model)
    assert st.guarantee and st.steps == st.poisson_steps == 5
    assert st.rates == ((0.1, 2), (0.2, 3))
    assert st.epsilon == pytest.approx(_dp_accounting_epsilon([(0.1, 2), (0.2, 3)], 0.8), rel=1e-12)
    assert st.epsilon > privacy.compute_epsilon(0.1, 0.8, 5, 1e-5, "rdp")  # the old, configured-rate figure
    assert privacy.epsilon(model) == st.epsilon
    assert str(st).startswith("(epsilon = ")


def test_plain_batches_get_no_headline_and_an_honest_reference():
    model = _private()
    model.fit(X, Y, batch_size=100, epochs=1, verbose=0)  # q would be 0.5, not the configured 0.1
    st = privacy.statement(model)
    assert not st.guarantee and math.isinf(st.epsilon) and st.plain_steps == 2
    assert st.plain_batches == ((100, 2),)
    assert st.reference_epsilon == pytest.approx(_dp_accounting_epsilon([(0.5, 2)], 0.8), rel=1e-12)
    text = str(st)
    assert "-DP for each" not in text and text.startswith("NO proven")
    assert "2 plain batches" in text
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0, steps_per_epoch=2), epochs=1, verbose=0)
    st = privacy.statement(model)
    assert not st.guarantee and st.steps == 4 and st.poisson_steps == 2 and "mixed" in st.sampling


def test_callback_logs_inf_without_a_guarantee_and_stops_on_a_budget():
    model = _private()
    cb = privacy.PrivacyCallback(max_epsilon=100.0)
    hist = model.fit(X, Y, batch_size=20, epochs=3, verbose=0, callbacks=[cb])
    assert math.isinf(hist.history["epsilon"][0]) and len(hist.history["epsilon"]) == 1


# ----------------------------------------------------------------------- 5. truncated batches
def test_truncated_batches_are_disclosed():
    model = _private()
    ds = privacy.poisson_batches(X, Y, batch_size=20, seed=0, padding="max", max_batch_size=20)
    model.fit(ds, epochs=2, verbose=0)
    st = privacy.statement(model)
    assert st.truncated_steps == ds.dp_sampler.overflows > 0
    assert not st.guarantee and math.isinf(st.epsilon)
    assert "truncated" in str(st) and "-DP for each" not in str(st)
    assert f"{st.truncated_steps} Poisson batches truncated" in str(st)


# -------------------------------------------------------------------- 6. recurrent layers (TF)
def _reference_grads(model, x, y):
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i : i + 1], model(x[i : i + 1], training=True))
        out.append([tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)])
    return [np.stack(gs) for gs in zip(*out)]


@pytest.mark.parametrize("cell", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize("method", ["direct", "vectorized_map"])
def test_recurrent_layers_train_privately_with_exact_per_example_gradients(cell, method):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, size=(12, 7)), rng.integers(0, 2, 12)
    model = keras.Sequential([
        keras.Input((7,), dtype="int32"), keras.layers.Embedding(20, 8, mask_zero=(cell == "LSTM")),
        getattr(keras.layers, cell)(6), keras.layers.Dense(2),
    ])
    grads = privacy.per_example_gradients(model, x, y, loss_fn=LOSS, method=method)
    for g, r in zip(grads, _reference_grads(model, x, y)):
        np.testing.assert_allclose(g.numpy(), r, rtol=2e-4, atol=2e-6)
    assert not model.layers[1].unroll  # restored after tracing
    privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=0.5, batch_size=6, dataset_size=12, per_example_method=method)
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    assert privacy.statement(model).steps == 2


# ------------------------------------------------------------------------ 7. attention on TF
MHA_SCRIPT = textwrap.dedent(
    r"""
    import numpy as np, keras
    from autoinit_tf import privacy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 16, 32)).astype("float32"); y = rng.integers(0, 3, 128)
    inp = keras.Input((16, 32))
    h = keras.layers.MultiHeadAttention(4, 8, dropout=0.1)(inp, inp, use_causal_mask=True)
    h = keras.layers.LayerNormalization()(h + inp)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    m = keras.Model(inp, out)
    privacy.make_private(m, l2_norm_clip=1.0, noise_multiplier=0.5, batch_size=32, dataset_size=128, seed=0)
    assert m._dp_privacy_state.engine.method == "vectorized_map"
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(privacy.poisson_batches(x, y, batch_size=32, seed=0), epochs=2, verbose=0)
    m.fit(x, y, batch_size=32, epochs=1, verbose=0)
    print("MHA OK", privacy.statement(m).steps)
    """
)


def test_multi_head_attention_private_fit_survives_in_a_subprocess():
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-c", MHA_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "MHA OK" in proc.stdout, (proc.returncode, (proc.stdout + proc.stderr)[-3000:])


def test_multi_head_attention_per_example_gradients_exact():
    keras.utils.set_random_seed(1)
    inp = keras.Input((5, 8))
    h = keras.layers.MultiHeadAttention(2, 4)(inp, inp)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 5, 8)).astype("float32"), rng.integers(0, 3, 6)
    grads = privacy.per_example_gradients(model, x, y, loss_fn=LOSS, method="vectorized_map")
    for g, r in zip(grads, _reference_grads(model, x, y)):
        np.testing.assert_allclose(g.numpy(), r, rtol=2e-4, atol=2e-6)


# ------------------------------------------------------------------------------ 8. add_loss
class PenalizeActivations(keras.layers.Layer):
    def call(self, x):
        self.add_loss(keras.ops.mean(keras.ops.square(x)))
        return x


def test_data_dependent_add_loss_refused_with_the_remedy():
    model = _mlp(PenalizeActivations(name="penalty"))
    with pytest.raises(privacy.DataDependentLossError, match="'penalty'.*loss_fn"):
        privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)


def test_weight_regularizers_still_accepted():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, kernel_regularizer="l2")])
    privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=4, dataset_size=40)
