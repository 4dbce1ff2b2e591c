"""make_private end to end: refusals, bad parameters, fit with Poisson batches, callback, statement, options."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("DP-SGD engine is TensorFlow-backend code", allow_module_level=True)
import tensorflow as tf  # noqa: E402

from autoinit_tf import privacy  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(200, 6, 6, 1)).astype("float32")
Y = (X.mean(axis=(1, 2, 3)) > 0).astype("int32")


def _cnn(extra=()):
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            *extra,
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )


def _compile(model, lr=0.5):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _private(model, **kw):
    args = dict(l2_norm_clip=1.0, noise_multiplier=0.5, batch_size=20, dataset_size=200, seed=0)
    args.update(kw)
    return privacy.make_private(model, **args)


def test_batchnorm_refused_with_swap_hint():
    model = _cnn([keras.layers.BatchNormalization(name="bn1")])
    with pytest.raises(privacy.ExampleMixingLayerError) as err:
        _private(model)
    msg = str(err.value)
    assert "bn1" in msg and "BatchNormalization" in msg and "bn->groupnorm" in msg and "GroupNormalization" in msg


def test_paper_batch_layers_refused():
    layers = pytest.importorskip("autoinit_tf.layers")
    for cls in ("IterNormWhitening", "DARBatchNormalization"):
        layer_cls = getattr(layers, cls, None)
        if layer_cls is None:
            continue
        model = keras.Sequential([keras.Input((4, 4, 8)), layer_cls(), keras.layers.Flatten(), keras.layers.Dense(2)])
        found = [name for _, name, _ in privacy.find_example_mixing_layers(model)]
        assert cls in found


def test_nested_batchnorm_refused():
    inner = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.BatchNormalization()], name="inner")
    model = keras.Sequential([keras.Input((6, 6, 1)), inner, keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(privacy.ExampleMixingLayerError):
        _private(model)


def test_activity_regularizer_refused():
    model = _cnn([keras.layers.Dense(3, activity_regularizer="l2", name="act")])
    with pytest.raises(ValueError, match="activity_regularizer"):
        _private(model)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(l2_norm_clip=0.0), "l2_norm_clip"),
        (dict(l2_norm_clip=-1.0), "l2_norm_clip"),
        (dict(target_delta=1.0), "delta"),
        (dict(noise_multiplier=None, target_epsilon=0.0, epochs=1), "epsilon"),
        (dict(noise_multiplier=None, target_epsilon=-2.0, epochs=1), "epsilon"),
        (dict(batch_size=500), "larger than dataset_size"),
        (dict(noise_multiplier=None, target_epsilon=1.0), "epochs or steps"),
        (dict(noise_multiplier=1.0, target_epsilon=1.0, epochs=1), "exactly one"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(accountant="gdp"), "accountant"),
        (dict(microbatch_size=0), "microbatch_size"),
        (dict(augmult=4), "augment"),
        (dict(ema_momentum=1.5), "ema_momentum"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        _private(_cnn(), **kw)


def test_other_backend_clear_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(NotImplementedError, match="KERAS_BACKEND=tensorflow"):
        _private(_cnn())


def test_sample_weight_refused():
    model = _compile(_private(_cnn()))
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(X, Y, sample_weight=np.ones(len(X)), batch_size=20, epochs=1, verbose=0)


def test_calibration_from_target_epsilon():
    model = _private(_cnn(), noise_multiplier=None, target_epsilon=2.0, epochs=3, accountant="rdp")
    cfg = model._dp_privacy_state.config
    assert cfg.planned_steps == 30
    assert cfg.noise_multiplier == pytest.approx(privacy.calibrate_noise_multiplier(2.0, 0.1, 30, 1e-5, "rdp"))


def test_fit_poisson_callback_statement_tensorboard(tmp_path):
    model = _compile(_private(_cnn([keras.layers.GroupNormalization(2)]), noise_multiplier=0.8, accountant="rdp"))
    cb = privacy.PrivacyCallback(log_dir=str(tmp_path / "tb"))
    tb = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb_keras"))
    hist = model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0), epochs=2, callbacks=[cb, tb], verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    eps = hist.history["epsilon"]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert eps[1] == pytest.approx(privacy.compute_epsilon(0.1, 0.8, 20, 1e-5, "rdp"))
    st = privacy.statement(model)
    assert st.steps == st.poisson_steps == 20
    assert st.epsilon == pytest.approx(eps[1])
    assert "Poisson" in st.sampling and st.noise_multiplier == 0.8 and st.l2_norm_clip == 1.0
    text = str(st)
    for piece in ("epsilon", "delta = 1e-05", "RDP", "20 steps", "noise multiplier 0.8", "clip norm 1"):
        assert piece in text
    assert "assume Poisson" not in text
    events = list((tmp_path / "tb").glob("events.*"))
    assert events
    tags = set()
    for e in tf.compat.v1.train.summary_iterator(str(events[0])):
        tags.update(v.tag for v in e.summary.value)
    assert "epsilon" in tags


def test_plain_batches_statement_has_caveat_and_training_learns():
    model = _compile(_private(_cnn(), noise_multiplier=0.3), lr=1.0)
    loss0 = model.evaluate(X, Y, verbose=0)[0]
    model.fit(X, Y, batch_size=20, epochs=4, verbose=0)
    assert model.evaluate(X, Y, verbose=0)[0] < loss0
    st = privacy.statement(model)
    assert st.steps == 40 and st.poisson_steps == 0
    assert "assume" in st.sampling and any("Poisson" in c for c in st.caveats)
    assert "Caveat" in str(st)


def test_poisson_rate_other_than_configured_gets_a_caveat():
    model = _compile(_private(_cnn(), noise_multiplier=0.5))  # configured q = 20 / 200
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0, steps_per_epoch=2), epochs=1, verbose=0)
    assert privacy.statement(model).caveats[0].startswith("Training losses")  # same rate: no caveat
    model.fit(privacy.poisson_batches(X, Y, batch_size=40, seed=0, steps_per_epoch=3), epochs=1, verbose=0)
    st = privacy.statement(model)
    assert st.steps == st.poisson_steps == 5
    assert any(c.startswith("3 Poisson batches were sampled at a rate other") for c in st.caveats), st.caveats


def test_budget_stop():
    model = _compile(_private(_cnn(), noise_multiplier=0.6, accountant="rdp"))
    budget = privacy.compute_epsilon(0.1, 0.6, 35, 1e-5, "rdp")  # 3.5 epochs of 10 steps
    cb = privacy.PrivacyCallback(max_epsilon=budget)
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=1), epochs=10, callbacks=[cb], verbose=0)
    assert model._dp_privacy_state.steps_taken == 30  # stopped before the 4th epoch would overshoot
    assert privacy.epsilon(model) <= budget


def test_weight_regularizer_handled_outside_clipping():
    def make():
        return keras.Sequential(
            [keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.5))]
        )

    x, y = X[:20], Y[:20]
    plain = make()
    dp = make()
    dp.set_weights(plain.get_weights())
    _private(dp, l2_norm_clip=1e6, noise_multiplier=0.0, batch_size=20)
    _compile(plain, lr=0.1)
    _compile(dp, lr=0.1)
    plain.fit(x, y, batch_size=20, epochs=1, verbose=0, shuffle=False)
    dp.fit(x, y, batch_size=20, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(dp.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_masks_differ_between_examples():
    model = keras.Sequential([keras.Input((50,)), keras.layers.Dropout(0.5), keras.layers.Dense(1, use_bias=False)])
    model.layers[-1].kernel.assign(np.ones((50, 1), "float32"))
    engine = privacy.PerExampleGradients(model, lambda yt, yp: tf.reduce_mean(yp))
    x = np.ones((6, 50), "float32")
    grads, _, _ = engine.per_example_gradients(x, np.zeros((6, 1), "float32"))
    g = grads[0].numpy()[..., 0]  # (6, 50): 0 or 2 where the unit was kept
    assert set(np.unique(g)) <= {0.0, 2.0}
    assert len({row.tobytes() for row in g}) == 6


def test_ema_and_augmult():
    model = _compile(
        _private(
            _cnn(),
            ema_momentum=0.9,
            augmult=3,
            augment=privacy.random_flip_and_crop(padding=1),
        )
    )
    raw_before = [v.numpy() for v in model.trainable_variables]
    cb = privacy.PrivacyCallback(evaluate_with_ema=True)
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0), epochs=1, validation_data=(X, Y), callbacks=[cb], verbose=0)
    raw = [v.numpy() for v in model.trainable_variables]
    ema = privacy.ema_values(model)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(raw, raw_before))
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(raw, ema))
    with privacy.ema_weights(model):
        for v, e in zip(model.trainable_variables, ema):
            np.testing.assert_array_equal(v.numpy(), e)
    for v, r in zip(model.trainable_variables, raw):  # restored (also after the callback's validation swap)
        np.testing.assert_array_equal(v.numpy(), r)
    assert privacy.statement(model).augmult == 3


def test_augment_function_is_per_image_and_shape_preserving():
    aug = privacy.random_flip_and_crop(padding=2)
    x = tf.constant(np.arange(8 * 8).reshape(1, 8, 8, 1).astype("float32").repeat(16, 0))
    out = aug(x, tf.constant([3, 4], tf.int64)).numpy()
    assert out.shape == x.shape
    assert len({o.tobytes() for o in out}) > 4


def test_wrapped_model_then_private():
    autoinit = pytest.importorskip("autoinit_tf.autoinit")
    model = autoinit.wrap(_cnn([keras.layers.GroupNormalization(2)]), seed=0)
    model = _compile(_private(model))
    model.fit(privacy.poisson_batches(X, Y, batch_size=20, seed=0), epochs=1, verbose=0)
    assert privacy.statement(model).steps == 10


def test_augmult_averages_loss_over_views_before_clipping():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)])
    k = 3

    def augment(x, seed):  # deterministic views: view j of every example is x * (1 + j)
        r = tf.range(tf.shape(x)[0]) % k
        return x * tf.cast(1 + r, x.dtype)[:, None]

    def mse(yt, yp):
        return tf.reduce_mean(tf.square(yt - yp))

    engine = privacy.PerExampleGradients(model, mse, augmult=k, augment=augment)
    x = RNG.normal(size=(4, 5)).astype("float32")
    y = RNG.normal(size=(4, 2)).astype("float32")
    grads, _, _ = engine.per_example_gradients(x, y)
    for i in range(4):
        views = np.stack([x[i] * (1 + j) for j in range(k)])
        with tf.GradientTape() as tape:
            loss = mse(np.repeat(y[i : i + 1], k, 0), model(views))
        expected = tape.gradient(loss, model.trainable_variables)
        for g, e in zip(grads, expected):
            np.testing.assert_allclose(g.numpy()[i], e.numpy(), rtol=1e-4, atol=1e-6)
