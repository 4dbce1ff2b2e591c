"""make_private on the JAX backend (jax.vmap per-example gradients), run in a KERAS_BACKEND=jax subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SCRIPT = textwrap.dedent(
    r"""
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np
    import jax, jax.numpy as jnp
    import keras
    assert keras.backend.backend() == "jax"
    from autoinit_tf import privacy
    from autoinit_tf.privacy import jax_step

    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    Y = rng.integers(0, 3, 24).astype("int32")
    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def cnn(seed=0):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.GroupNormalization(2),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ])

    def values(model):
        return [np.array(v.numpy()) for v in model.trainable_variables]

    def batch_grad(model, x, y):
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        def loss(t):
            yp, _ = model.stateless_call(t, ntv, x, training=True)
            return LOSS(y, yp)
        return [np.asarray(g) for g in jax.grad(loss)(tv)]

    def private(model, **kw):
        args = dict(l2_norm_clip=1.0, noise_multiplier=0.0, batch_size=8, dataset_size=24, seed=0)
        args.update(kw)
        privacy.make_private(model, **args)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
        return model

    # 1. per-example gradients equal one-example-at-a-time gradients (Conv, GroupNorm, Dense,
    #    LayerNorm), also with micro-batches
    m = cnn()
    m.compile(optimizer="sgd", loss=LOSS)
    per = privacy.per_example_gradients(m, X[:6], Y[:6])
    per_mb = privacy.per_example_gradients(m, X[:6], Y[:6], microbatch_size=4)
    for i in range(6):
        one = batch_grad(m, X[i:i + 1], Y[i:i + 1])
        for a, b, c in zip(per, per_mb, one):
            np.testing.assert_allclose(np.asarray(a)[i], c, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(np.asarray(b)[i], c, rtol=1e-4, atol=1e-6)
    print("per-example OK")

    # 2. clipped sum: every clipped per-example gradient has norm <= C and the sum is theirs
    c = 0.05
    sums, norms = jax_step.clipped_sum(m, X[:6], Y[:6], c)
    flat = [np.asarray(g).reshape(6, -1) for g in per]
    ref_norms = np.sqrt(sum((f ** 2).sum(1) for f in flat))
    np.testing.assert_allclose(np.asarray(norms), ref_norms, rtol=1e-4)
    factors = np.minimum(1.0, c / ref_norms)
    assert (ref_norms > c).all()  # every example is clipped at this C
    clipped_norms = factors * ref_norms
    assert (clipped_norms <= c * (1 + 1e-5)).all()
    for s, f in zip(sums, flat):
        np.testing.assert_allclose(np.asarray(s).reshape(-1), (factors[:, None] * f).sum(0), rtol=1e-4, atol=1e-7)
    print("clip OK")

    # 3. noise 0, one example per step: the update (lr 1) has norm <= C
    m = private(cnn(), l2_norm_clip=c, batch_size=1)
    before = values(m)
    m.train_on_batch(X[:1], Y[:1])
    delta = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(values(m), before)))
    assert 0 < delta <= c * (1 + 1e-5), delta
    print("noise-0 step OK")

    # 4. huge C, noise 0: the update is the non-private mean gradient
    m = private(cnn(), l2_norm_clip=1e6)
    before = values(m)
    ref = batch_grad(m, X[:8], Y[:8])
    m.train_on_batch(X[:8], Y[:8])
    for a, b, g in zip(before, values(m), ref):
        np.testing.assert_allclose(a - b, g, rtol=1e-3, atol=1e-6)
    print("huge-C OK")

    # 5. Poisson padding rows contribute nothing; the denominator is the expected batch size
    mask = np.array([True] * 5 + [False] * 3)
    garbage = X[:8].copy()
    garbage[5:] = 100.0 * rng.normal(size=garbage[5:].shape)
    sw = {"dp_poisson_mask": mask, "dp_sampling_rate": np.float64(8 / 24)}
    m = private(cnn(), l2_norm_clip=1e6)
    before = values(m)
    ref = batch_grad(m, X[:5], Y[:5])  # mean over the 5 real rows
    m.train_on_batch(garbage, Y[:8], sample_weight=sw)
    for a, b, g in zip(before, values(m), ref):
        np.testing.assert_allclose(a - b, g * 5 / 8, rtol=1e-3, atol=1e-6)
    st = privacy.statement(m)
    assert st.steps == 1 and st.poisson_steps == 1, st
    assert not any("rate other" in c for c in st.caveats), st.caveats
    m.train_on_batch(X[:8], Y[:8], sample_weight={"dp_poisson_mask": mask, "dp_sampling_rate": np.float64(0.5)})
    assert any(c.startswith("1 Poisson batches were sampled at a rate other") for c in privacy.statement(m).caveats)
    print("padding OK")

    # 6. noise: no real rows, so the update is -noise / B with std sigma * C / B; fresh each step
    big = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3000)])
    privacy.make_private(big, l2_norm_clip=2.0, noise_multiplier=1.5, batch_size=10, dataset_size=100, seed=3)
    big.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    sw = {"dp_poisson_mask": np.zeros(10, bool), "dp_sampling_rate": np.float64(0.1)}
    steps = []
    for _ in range(2):
        w0 = values(big)
        big.train_on_batch(np.zeros((10, 4), "float32"), np.zeros((10, 3000), "float32"), sample_weight=sw)
        steps.append(np.concatenate([(a - b).ravel() for a, b in zip(w0, values(big))]))
    expected = 1.5 * 2.0 / 10
    for d in steps:
        assert abs(d.std() / expected - 1) < 0.05, (d.std(), expected)
        assert abs(d.mean()) < 4 * expected / np.sqrt(d.size)
    assert abs(np.corrcoef(steps[0], steps[1])[0, 1]) < 0.05
    print("noise OK")

    # 7. fit on Poisson batches with the callback, statement and EMA
    m = cnn()
    privacy.make_private(m, l2_norm_clip=1.0, target_epsilon=8.0, target_delta=1e-3, batch_size=8, dataset_size=24,
                         epochs=2, seed=0, ema_momentum=0.9)
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    cb = privacy.PrivacyCallback()
    h = m.fit(privacy.poisson_batches(X, Y, batch_size=8, seed=0, padding="max"), epochs=2, callbacks=[cb], verbose=0)
    st = privacy.statement(m)
    assert st.steps == 6 and st.poisson_steps == 6 and st.sampling.startswith("Poisson"), st
    assert len(h.history["epsilon"]) == 2 and 0 < h.history["epsilon"][-1] <= 8.0
    ema = privacy.ema_values(m)
    raw = values(m)
    assert any(not np.allclose(a, b) for a, b in zip(ema, raw))
    with privacy.ema_weights(m):
        assert all(np.allclose(a, b) for a, b in zip(values(m), ema))
    assert all(np.allclose(a, b) for a, b in zip(values(m), raw))
    print("fit OK")

    # 8. clear errors: BatchNormalization refused, augmult not on JAX
    bn = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    try:
        privacy.make_private(bn, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=2, dataset_size=10)
        raise AssertionError("BatchNormalization accepted")
    except privacy.ExampleMixingLayerError:
        pass
    try:
        privacy.make_private(cnn(), l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=2, dataset_size=10,
                             augmult=2, augment=lambda x, s: x)
        raise AssertionError("augmult accepted on JAX")
    except NotImplementedError as err:
        assert "TensorFlow backend" in str(err)
    print("ALL OK")
    """
)


def test_make_private_on_jax_backend():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL OK" in proc.stdout, out[-4000:]
