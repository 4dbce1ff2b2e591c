"""Per-example gradients, clipping and noise of the DP-SGD train step."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("DP-SGD engine is TensorFlow-backend code", allow_module_level=True)
import tensorflow as tf  # noqa: E402

from autoinit_tf import privacy  # noqa: E402

RNG = np.random.default_rng(0)


def _mse(y_true, y_pred):
    return tf.reduce_mean(tf.square(tf.cast(y_true, y_pred.dtype) - y_pred))


def _dense():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def _conv():
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(3, 2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def _embedding():
    return keras.Sequential(
        [keras.Input((5,), dtype="int32"), keras.layers.Embedding(11, 4), keras.layers.Flatten(), keras.layers.Dense(3)]
    )


def _layernorm():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.LayerNormalization(), keras.layers.Dense(3)]
    )


def _groupnorm():
    return keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(8, 3, padding="same"),
            keras.layers.GroupNormalization(groups=4),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def _inputs(name, n):
    if name == "conv":
        return RNG.normal(size=(n, 8, 8, 2)).astype("float32")
    if name == "embedding":
        return RNG.integers(0, 11, size=(n, 5)).astype("int32")
    if name == "groupnorm":
        return RNG.normal(size=(n, 6, 6, 4)).astype("float32")
    return RNG.normal(size=(n, 6)).astype("float32")


MODELS = {"dense": _dense, "conv": _conv, "embedding": _embedding, "layernorm": _layernorm, "groupnorm": _groupnorm}


def _one_at_a_time(model, x, y):
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = _mse(y[i : i + 1], model(x[i : i + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        out.append([tf.convert_to_tensor(g).numpy() for g in grads])
    return [np.stack([o[k] for o in out]) for k in range(len(out[0]))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_example_equals_one_at_a_time(name):
    model = MODELS[name]()
    x = _inputs(name, 7)
    y = RNG.normal(size=(7, 3)).astype("float32")
    engine = privacy.PerExampleGradients(model, _mse)  # default: the direct engine
    grads = engine.per_example_gradients(x, y)[0]
    expected = _one_at_a_time(model, x, y)
    # Dense / Conv / Embedding variables in closed form; LayerNorm / GroupNorm scales via vectorized_map
    fallback = [p.split("/")[-1] for p in engine.fallback_variables]
    assert fallback == (["gamma", "beta"] if name in ("layernorm", "groupnorm") else []), fallback
    # the tf.vectorized_map engine too (with the vectorizable conv kernel gradient for conv nets)
    vmap = privacy.PerExampleGradients(model, _mse, method="vectorized_map", fast_conv=name in ("conv", "groupnorm"))
    for g, e in zip(vmap.per_example_gradients(x, y)[0], expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=2e-4, atol=2e-5)
    assert len(grads) == len(expected) == len(model.trainable_variables)
    for g, e, v in zip(grads, expected, model.trainable_variables):
        assert g.shape == (7,) + tuple(v.shape)
        np.testing.assert_allclose(g.numpy(), e, rtol=2e-4, atol=2e-5, err_msg=v.path)
        assert np.abs(e).max() > 0  # the comparison is not trivially 0 == 0


def _seq_model():
    """Conv1D (dilated, same; ghost norm), a Dense shared by two calls on a sequence, a final Dense."""
    inp = keras.Input((6, 4))
    h = keras.layers.Conv1D(16, 3, dilation_rate=2, padding="same", activation="tanh")(inp)
    shared = keras.layers.Dense(16, activation="tanh")
    h = shared(shared(h))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    return keras.Model(inp, out)


def _conv_dilated():
    return keras.Sequential(
        [
            keras.Input((9, 9, 2)),
            keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", activation="tanh"),
            keras.layers.Conv2D(3, (3, 2), strides=(2, 3), padding="valid", use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def _short_embedding():  # 3 ids, vocab 11: ghost norm with repeated ids
    return keras.Sequential(
        [keras.Input((3,), dtype="int32"), keras.layers.Embedding(11, 4), keras.layers.Flatten(), keras.layers.Dense(3)]
    )


class TiedOutput(keras.layers.Layer):
    """Reads another layer's kernel (weight tying): the direct engine must leave it to vectorized_map."""

    def __init__(self, source, **kw):
        super().__init__(**kw)
        self.source = source

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.source.kernel))


def _tied():
    inp = keras.Input((6,))
    first = keras.layers.Dense(5, activation="tanh")
    h = first(inp)
    h = TiedOutput(first, name="tied")(h)  # (B, 6)
    return keras.Model(inp, keras.layers.Dense(3)(h))


EXTRA = {
    "seq": (_seq_model, lambda n: RNG.normal(size=(n, 6, 4)).astype("float32"), []),
    "conv_dilated": (_conv_dilated, lambda n: RNG.normal(size=(n, 9, 9, 2)).astype("float32"), []),
    "short_embedding": (_short_embedding, lambda n: RNG.integers(0, 4, size=(n, 3)).astype("int32"), []),
    "tied": (_tied, lambda n: RNG.normal(size=(n, 6)).astype("float32"), ["kernel", "bias"]),
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_direct_engine_equals_one_at_a_time(name):
    build, inputs, fallback = EXTRA[name]
    model = build()
    x = inputs(6)
    y = RNG.normal(size=(6, 3)).astype("float32")
    engine = privacy.PerExampleGradients(model, _mse, jit_compile=False)
    grads = engine.per_example_gradients(x, y)[0]
    assert [p.split("/")[-1] for p in engine.fallback_variables] == fallback
    expected = _one_at_a_time(model, x, y)
    for g, e, v in zip(grads, expected, model.trainable_variables):
        np.testing.assert_allclose(g.numpy(), e, rtol=2e-4, atol=2e-5, err_msg=v.path)
    # the training path (norms by ghost / materialized / outer-product rules, weighted sums)
    norms = np.sqrt(sum((e.reshape(6, -1) ** 2).sum(1) for e in expected))
    clip = float(np.median(norms))
    s, _, _, n, _ = _clipped_sum(model, x, y, np.ones(6, bool), clip, jit_compile=False)
    np.testing.assert_allclose(n.numpy(), norms, rtol=1e-4)
    factors = np.minimum(1.0, clip / norms)
    for a, e in zip(s, expected):
        np.testing.assert_allclose(a.numpy(), np.tensordot(factors, e, 1), rtol=2e-4, atol=2e-5)


def test_direct_equals_vectorized_map_masked_microbatched_augmult():
    model = _conv()
    x = _inputs("conv", 7)
    y = RNG.normal(size=(7, 3)).astype("float32")
    mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    # jit_compile=False for both: stateless random crops differ between XLA and plain TF kernels
    kw = dict(augmult=2, augment=privacy.random_flip_and_crop(padding=1), microbatch_size=3, jit_compile=False)
    out = {
        m: _clipped_sum(model, x, y, mask, 0.05, method=m, **kw)
        for m in ("direct", "vectorized_map")
    }
    (s_d, l_d, p_d, n_d, _), (s_v, l_v, p_v, n_v, _) = out["direct"], out["vectorized_map"]
    for a, b in zip(s_d, s_v):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)
        assert np.abs(b.numpy()).max() > 0
    np.testing.assert_allclose(l_d.numpy(), l_v.numpy(), rtol=1e-5)
    np.testing.assert_allclose(p_d.numpy(), p_v.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n_d.numpy(), n_v.numpy(), rtol=1e-4)


def _clipped_sum(model, x, y, mask, clip, microbatch_size=None, **kw):
    engine = privacy.PerExampleGradients(model, _mse, microbatch_size=microbatch_size, **kw)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    return engine.clipped_sum(tv, ntv, x, y, tf.constant(mask), tf.constant(clip, tf.float32), tf.constant([0, 0], tf.int64))


def test_clipping_bound_and_microbatches():
    model = _conv()
    x = _inputs("conv", 10) * 5.0
    y = RNG.normal(size=(10, 3)).astype("float32") * 10.0
    grads, _, _ = privacy.PerExampleGradients(model, _mse).per_example_gradients(x, y)
    norms = privacy.global_norms(grads).numpy()
    clip = float(np.median(norms))
    assert (norms > clip).any() and (norms < clip).any()
    clipped = privacy.clip_per_example(grads, clip)
    cn = privacy.global_norms(clipped).numpy()
    assert np.all(cn <= clip * (1 + 1e-5))
    # below the bound: untouched; above it: rescaled to exactly C, same direction
    small = norms <= clip
    np.testing.assert_allclose(cn[small], norms[small], rtol=1e-5)
    np.testing.assert_allclose(cn[~small], clip, rtol=1e-5)
    mask = np.ones(10, bool)
    s_full, losses, _, n_full, _ = _clipped_sum(model, x, y, mask, clip)
    expected = [c.numpy().sum(0) for c in clipped]
    for a, b in zip(s_full, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(n_full.numpy(), norms, rtol=1e-5)
    # micro-batches of 3 (10 = 3 + 3 + 3 + 1, padded) give the same sum, losses and norms
    s_mb, losses_mb, _, n_mb, _ = _clipped_sum(model, x, y, mask, clip, microbatch_size=3)
    for a, b in zip(s_mb, s_full):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses_mb.numpy(), losses.numpy(), rtol=1e-5)
    np.testing.assert_allclose(n_mb.numpy(), n_full.numpy(), rtol=1e-5)


def test_masked_rows_contribute_nothing():
    model = _dense()
    x = _inputs("dense", 8)
    y = RNG.normal(size=(8, 3)).astype("float32")
    mask = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    s_masked, *_ = _clipped_sum(model, x, y, mask, 0.5)
    s_subset, *_ = _clipped_sum(model, x[mask], y[mask], np.ones(mask.sum(), bool), 0.5)
    x2 = x.copy()
    x2[~mask] = 1e6  # garbage in the padded rows changes nothing
    s_garbage, *_ = _clipped_sum(model, x2, y, mask, 0.5)
    for a, b, c in zip(s_masked, s_subset, s_garbage):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.numpy(), c.numpy())


def _weights_after_one_step(model_fn, x, y, **dp):
    model = model_fn()
    keras.utils.set_random_seed(1)
    for v in model.trainable_variables:
        v.assign(RNG_W.normal(size=v.shape).astype("float32") * 0.3)
    w0 = [v.numpy() for v in model.trainable_variables]
    if dp:
        privacy.make_private(model, batch_size=len(x), dataset_size=len(x) * 10, seed=3, **dp)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return w0, [v.numpy() for v in model.trainable_variables]


RNG_W = np.random.default_rng(5)


def test_huge_clip_no_noise_equals_non_private_step():
    x = _inputs("dense", 16)
    y = RNG.normal(size=(16, 3)).astype("float32")
    state = RNG_W.bit_generator.state
    w0, w_dp = _weights_after_one_step(_dense, x, y, l2_norm_clip=1e6, noise_multiplier=0.0)
    RNG_W.bit_generator.state = state
    w0b, w_plain = _weights_after_one_step(_dense, x, y)
    for a, b in zip(w0, w0b):
        np.testing.assert_array_equal(a, b)
    for a, b, z in zip(w_dp, w_plain, w0):
        assert np.abs(b - z).max() > 1e-4  # the step moved the weights
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_update_norm_bounded_by_clip_without_noise():
    x = _inputs("dense", 16) * 10
    y = RNG.normal(size=(16, 3)).astype("float32") * 10
    w0, w1 = _weights_after_one_step(_dense, x, y, l2_norm_clip=0.1, noise_multiplier=0.0)
    # lr 1, mean of 16 clipped gradients: ||update|| <= C
    norm = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(w0, w1)))
    assert 0 < norm <= 0.1 * (1 + 1e-5)
    # 16 copies of one example (raw gradient norm >> C): the update is exactly the clipped gradient
    xs, ys = np.repeat(x[:1], 16, 0), np.repeat(y[:1], 16, 0)
    w0, w1 = _weights_after_one_step(_dense, xs, ys, l2_norm_clip=0.1, noise_multiplier=0.0)
    norm = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(w0, w1)))
    assert norm == pytest.approx(0.1, rel=1e-4)


def test_noise_standard_deviation():
    def wide():
        return keras.Sequential([keras.Input((50,)), keras.layers.Dense(200)])

    x = np.zeros((32, 50), "float32")  # zero input: kernel gradients are 0, the update is pure noise
    y = np.zeros((32, 200), "float32")
    sigma, clip = 1.3, 0.7
    w0, w1 = _weights_after_one_step(wide, x, y, l2_norm_clip=clip, noise_multiplier=sigma)
    kernel_update = (w1[0] - w0[0]).ravel()  # 10,000 noise coordinates
    expected = sigma * clip / 32
    assert kernel_update.std() == pytest.approx(expected, rel=0.03)
    assert abs(kernel_update.mean()) < 4 * expected / np.sqrt(kernel_update.size)
