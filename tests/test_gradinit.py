"""GradInit (`autoinit_tf.gradinit`) against a reference written for this test: the two-layer MLP, its loss
and GradInit's objective written by hand in `jax.numpy` (second derivatives by `jax.grad` of `jax.grad`),
and the scales' Adam written out below, step by step as the paper describes it."""

import numpy as np
import pytest

import keras

import autoinit_tf
from autoinit_tf.gradinit import half_batches

pytestmark = pytest.mark.core

N, D, H, K = 120, 6, 8, 3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype("float32")
    y = rng.integers(0, K, N).astype("int32")
    return x, y


def _mlp(seed=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((D,)),
        keras.layers.Dense(H, activation="relu", bias_initializer=keras.initializers.RandomNormal(0.1, 0.1, seed=3)),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(K),  # zero bias: never scaled
    ])
    return model


def _reference(weights, x, y, *, steps, batch_size, lr, eta, gamma, sgd, min_scale, seed):
    """Scales and the number of constraint steps, computed independently of the library's objective."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jax.config.update("jax_enable_x64", False)
    w1, b1, w2, b2 = (jnp.asarray(w) for w in weights)

    def loss(params, xb, yb):
        a1, c1, a2, c2 = params
        h = jnp.maximum(xb @ a1 + c1, 0.0)
        z = h @ a2 + c2
        logp = z - jax.scipy.special.logsumexp(z, axis=1, keepdims=True)
        return -jnp.mean(logp[jnp.arange(len(yb)), yb])

    def parts(s, xs, ys, xt, yt):
        params = (s[0] * w1, s[1] * b1, s[2] * w2, b2)  # b2 is zero: not scaled
        g = jax.grad(loss)(params, xs, ys)
        if sgd:
            norm = jnp.sqrt(sum(jnp.sum(gi ** 2) for gi in g))
            stepped = tuple(p - eta * gi / norm for p, gi in zip(params, g))
        else:
            norm = sum(jnp.sum(jnp.abs(gi)) for gi in g)
            stepped = tuple(p - eta * jnp.sign(gi) for p, gi in zip(params, g))
        return norm, loss(stepped, xt, yt) / eta

    norm_grad = jax.grad(lambda s, *b: parts(s, *b)[0])
    look_grad = jax.grad(lambda s, *b: parts(s, *b)[1])
    floor = np.array([min_scale, 0.0, min_scale])
    s = np.ones(3)
    m = {"objective": np.zeros(3), "constraint": np.zeros(3)}
    t_branch = {"objective": 0, "constraint": 0}
    v, t, constrained_steps = np.zeros(3), 0, 0
    half = batch_size // 2
    for b0, b1_, b2_ in half_batches(len(x), half, steps, seed):
        xs, ys = x[np.r_[b0, b1_]], y[np.r_[b0, b1_]]
        xt, yt = x[np.r_[b0, b2_]], y[np.r_[b0, b2_]]
        norm, _ = parts(jnp.asarray(s, jnp.float32), xs, ys, xt, yt)
        branch = "constraint" if float(norm) > gamma else "objective"
        constrained_steps += branch == "constraint"
        fn = norm_grad if branch == "constraint" else look_grad
        g = np.clip(np.asarray(fn(jnp.asarray(s, jnp.float32), xs, ys, xt, yt), np.float64), -1.0, 1.0)
        t += 1
        t_branch[branch] += 1
        m[branch] = 0.9 * m[branch] + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        s = s - lr * (m[branch] / (1 - 0.9 ** t_branch[branch])) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        s = np.maximum(s, floor)
    return s, constrained_steps


def _run(optimizer, gamma, lr=0.05, min_scale=0.01, steps=6):
    x, y = _data()
    model = _mlp()
    weights = [np.array(v.numpy()) for v in model.trainable_variables]
    kwargs = dict(steps=steps, batch_size=16, lr=lr, gamma=gamma, min_scale=min_scale, seed=0)
    report = autoinit_tf.gradinit(model, (x, y), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                  optimizer=optimizer, progress=False, **kwargs)
    eta = 0.1 if optimizer == "sgd" else 1e-3
    ref, ref_constrained = _reference(weights, x, y, eta=eta, sgd=optimizer == "sgd", **kwargs)
    return model, weights, report, ref, ref_constrained


@pytest.mark.parametrize("optimizer,gamma", [("sgd", 1e9), ("sgd", 0.5), ("adam", 1e9)])
def test_scales_match_an_independent_reference(optimizer, gamma):
    model, weights, report, ref, ref_constrained = _run(optimizer, gamma)
    scales = np.array(list(report.scales.values()))
    assert len(scales) == 3, report.scales  # the zero bias is not scaled
    np.testing.assert_allclose(scales, ref, rtol=2e-4, atol=2e-4)
    assert report.constraint_steps == ref_constrained
    assert not np.allclose(scales, 1.0)
    # The weights are multiplied in place by their scales; the zero bias stays zero.
    after = [np.array(v.numpy()) for v in model.trainable_variables]
    for w, a, s in zip(weights[:3], after[:3], ref):
        np.testing.assert_allclose(a, w * s, rtol=3e-4, atol=1e-6)
    assert np.all(after[3] == 0)


def test_constraint_branch_taken_when_the_gradient_norm_exceeds_gamma():
    _, _, report, _, ref_constrained = _run("sgd", 0.5)
    _, _, free, _, _ = _run("sgd", 1e9)
    assert report.constraint_steps == ref_constrained > 0
    assert free.constraint_steps == 0
    assert report.grad_norm_after < report.grad_norm_before  # the constraint steps lower ||g||


def test_objective_branch_lowers_the_lookahead_loss():
    _, _, report, _, _ = _run("sgd", 1e9, steps=12)
    assert report.lookahead_after < report.lookahead_before


def test_min_scale_respected_and_biases_may_go_lower():
    _, _, report, ref, _ = _run("sgd", 1e-6, lr=0.5, min_scale=0.6, steps=8)  # always minimizing ||g||
    scales = report.scales
    kernels = [v for k, v in scales.items() if k.endswith("kernel")]
    assert min(kernels) >= 0.6 - 1e-12
    assert any(abs(v - 0.6) < 1e-9 for v in kernels)  # the bound is active
    np.testing.assert_allclose(list(scales.values()), ref, rtol=2e-4, atol=2e-4)


def test_no_variable_added_serialization_unchanged_bn_statistics_kept_dropout_restored():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5, 5, 2)).astype("float32")
    y = rng.integers(0, 3, 60).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5, 5, 2)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Dropout(0.3), keras.layers.Flatten(), keras.layers.Dense(3),
    ])
    ids = [id(v) for v in model.variables]
    config = model.get_config()
    bn = model.layers[1]
    moving = [np.array(bn.moving_mean.numpy()), np.array(bn.moving_variance.numpy())]
    report = autoinit_tf.gradinit(model, (x, y), loss="sparse_categorical_crossentropy", steps=3, batch_size=8,
                                  progress=False, seed=1)
    assert [id(v) for v in model.variables] == ids
    assert model.get_config() == config
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])
    assert model.layers[3].rate == 0.3
    assert set(report.scales) == {v.path for v in model.trainable_variables if np.any(v.numpy() != 0)} - set()
    assert "GradInit (sgd" in str(report) and '"scales"' in report.to_json()


def test_failure_leaves_every_variable_unchanged():
    x, y = _data()
    x[5] = np.nan
    model = _mlp()
    before = [np.array(v.numpy()) for v in model.variables]
    with pytest.raises(FloatingPointError, match="unchanged"):
        autoinit_tf.gradinit(model, (x, y), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             steps=40, batch_size=16, progress=False, seed=0)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_argument_errors_say_what_to_do():
    x, y = _data()
    model = _mlp()
    with pytest.raises(ValueError, match="even"):
        autoinit_tf.gradinit(model, (x, y), loss="mse", batch_size=15)
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        autoinit_tf.gradinit(model, (x, y), loss="mse", optimizer="rmsprop")
    with pytest.raises(ValueError, match="3 half-batches"):
        autoinit_tf.gradinit(model, (x[:20], y[:20]), loss="mse", batch_size=16)


def test_half_batches_are_disjoint_and_cover_permutations():
    triples = list(half_batches(30, 4, 5, seed=3))
    for t in triples:
        flat = np.concatenate(t)
        assert len(set(flat.tolist())) == 12
    # 30 // 12 = 2 triples per permutation
    assert not set(np.concatenate(triples[0])) & set(np.concatenate(triples[1]))
