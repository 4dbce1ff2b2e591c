"""Probes that fit the model (issue 15, item 3): unknown dimensions get the declared sequence length,
never the batch size; integer inputs are filled by what they are; probe batches respect a memory bound."""

import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import declared, graph, inputs

pytestmark = pytest.mark.core
L = keras.layers


def _concrete_only(x):
    """These layers stand for layers whose call cannot be traced symbolically (so the fallback probe runs)."""
    if isinstance(x, keras.KerasTensor):
        raise TypeError("this layer computes on concrete tensors only")


class TablePositions(L.Layer):
    """A learned position table of `sequence_length` rows, sliced to the input's length (keras-hub's
    PositionEmbedding does the same). Records the lengths it was called with; not traceable."""

    seen = []

    def __init__(self, sequence_length, **kw):
        super().__init__(**kw)
        self.sequence_length = sequence_length

    def build(self, shape):
        self.table = self.add_weight(shape=(self.sequence_length, shape[-1]), initializer="random_normal")

    def call(self, x):
        _concrete_only(x)
        n = x.shape[1]
        if isinstance(n, int):
            TablePositions.seen.append(n)
            if n > self.sequence_length:
                raise ValueError(f"sequence of {n} > table of {self.sequence_length}")
        return x + self.table[: keras.ops.shape(x)[1]]

    def compute_output_shape(self, shape):
        return shape


class TokenTable(L.Layer):
    """An embedding without a registered rule; records the largest token id it was called with."""

    seen = []

    def __init__(self, input_dim, output_dim, **kw):
        super().__init__(**kw)
        self.input_dim, self.output_dim = input_dim, output_dim

    def build(self, shape):
        self.table = self.add_weight(shape=(self.input_dim, self.output_dim), initializer="random_normal")

    def call(self, ids):
        _concrete_only(ids)
        try:
            TokenTable.seen.append(int(np.max(keras.ops.convert_to_numpy(ids))))
        except Exception:  # noqa: BLE001 - symbolic while Keras infers the output shape
            pass
        return keras.ops.take(self.table, ids, axis=0)


def test_unknown_sequence_dimension_gets_the_declared_length_not_the_batch():
    """BERT/GPT-2 crashed: the fallback probe of a position table replaced the unknown length by the
    probe batch (256 > 64 rows)."""
    TablePositions.seen.clear()
    inp = keras.Input((None, 16))
    model = keras.Model(inp, L.Dense(16)(TablePositions(8)(inp)))
    assert declared.declared_length(model) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autoinit_tf.wrap(model, seed=0)
        autoinit_tf.wrap(model, seed=0, calibrate="probe")
    assert TablePositions.seen and set(TablePositions.seen) == {8}


def _text_model(sequence_length=None):
    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    segments = keras.Input((None,), dtype="int32", name="segment_ids")
    mask = keras.Input((None,), dtype="int32", name="padding_mask")
    x = L.Embedding(500, 8)(tokens) + L.Embedding(2, 8)(segments)
    if sequence_length:
        x = TablePositions(sequence_length)(x)
    x = x * keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
    return keras.Model([tokens, segments, mask], L.Dense(4)(x))


def test_integer_inputs_are_filled_by_what_they_are():
    model = _text_model()
    fn = graph.as_functional(model)
    tokens, segments, mask = inputs.probe_arrays(fn, None, 64, seed=0)
    assert tokens.shape == (64, declared.DEFAULT_PROBE_LENGTH)
    assert tokens.min() == 0 and 450 <= tokens.max() < 500  # uniform over the vocabulary, not {0..3}
    assert len(np.unique(tokens)) > 400
    assert np.all(mask == 1)
    assert np.all(segments == 0)


def test_the_declared_length_shapes_the_model_input_probe():
    fn = graph.as_functional(_text_model(sequence_length=12))
    assert all(a.shape == (16, 12) for a in inputs.probe_arrays(fn, None, 16, seed=0))


def test_a_long_declared_length_is_capped():
    fn = graph.as_functional(_text_model(sequence_length=4096))
    assert declared.probe_length(fn) == declared.MAX_PROBE_LENGTH


def test_fallback_probe_draws_token_ids_over_the_vocabulary():
    TokenTable.seen.clear()
    inp = keras.Input((None,), dtype="int32")
    model = keras.Model(inp, L.Dense(4)(TokenTable(300, 8)(inp)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autoinit_tf.wrap(model, seed=0)
    assert TokenTable.seen and max(TokenTable.seen) >= 250


def test_probe_batch_keeps_the_largest_activation_within_the_bound(monkeypatch):
    inp = keras.Input((64,))
    model = keras.Model(inp, L.Dense(8)(L.Dense(4096)(inp)))
    fn = graph.as_functional(model)
    assert declared.largest_activation(fn, declared.probe_length(fn)) == 4096
    unbounded = inputs.auto_batch(fn)
    monkeypatch.setattr(declared, "ACTIVATION_BYTES", 1 << 20)
    bounded = inputs.auto_batch(fn)
    assert bounded * 4096 * 4 <= 1 << 20 < unbounded * 4096 * 4


def test_sequence_probe_batch_counts_the_substituted_length():
    """An unknown length used to count as 1 entry, so a (batch, None) token input got 1024 examples of
    length 1024 (Llama: out of memory)."""
    inp = keras.Input((None,), dtype="int32")
    model = keras.Model(inp, L.Dense(4)(L.Embedding(100, 8)(inp)))
    fn = graph.as_functional(model)
    n = inputs.auto_batch(fn)
    assert n * declared.probe_length(fn) <= max(1 << 17, 8 * declared.probe_length(fn))


def _preprocessed_cnn(front):
    inp = keras.Input((10, 10, 3))
    h = front(inp)
    h = L.Conv2D(12, 3, padding="same", name="conv")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D()(L.Activation("relu")(h))
    return keras.Model(inp, L.Dense(4, name="head")(h))


IMAGENET_MEAN, IMAGENET_VAR = [123.675, 116.28, 103.53], [3409.98, 3262.69, 3291.89]


def test_a_normalization_at_the_input_declares_the_data_its_statistics_came_from():
    """ConvNeXt's front: a Normalization holding ImageNet's pixel statistics. A N(0, 1) probe normalizes to
    -2.1 +- 0.02 (every image the same constant): the BatchNormalization statistics `wrap` left were those
    of that regime, 2.1-3.9x the per-channel batch variance of real-scale inputs here. The declared inputs
    are the data the statistics describe, so inference right after `wrap` behaves like training mode on them.
    Per channel too: the Normalization's output is known channel by channel (each channel's own statistics
    removed), so the conv's drawn kernel gives each channel its own variance (0.70-1.24 here) and the moving
    variances match it (0.99-1.02x); taken as pooled, every moving variance was the pooled 1.0 (0.72-1.43x)."""
    norm = lambda x: L.Normalization(mean=IMAGENET_MEAN, variance=IMAGENET_VAR, name="norm")(x)  # noqa: E731
    model = _preprocessed_cnn(norm)
    fn = graph.as_functional(model)
    (mean, var, why), = declared.input_moments(fn)
    np.testing.assert_allclose(mean, IMAGENET_MEAN, rtol=1e-5)
    np.testing.assert_allclose(var, IMAGENET_VAR, rtol=1e-4)
    assert "'norm'" in why
    probe = inputs.probe_arrays(fn, None, 512, seed=0)[0].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(probe.mean(0), IMAGENET_MEAN, rtol=0.01)
    np.testing.assert_allclose(probe.var(0), IMAGENET_VAR, rtol=0.03)
    autoinit_tf.wrap(model, seed=0)
    rng = np.random.default_rng(7)  # "real" inputs: the statistics the Normalization holds
    x = (rng.standard_normal((256, 10, 10, 3)) * np.sqrt(IMAGENET_VAR) + IMAGENET_MEAN).astype("float32")
    bn = model.get_layer("bn")
    conv = np.asarray(keras.Model(model.inputs, bn.input)(x), np.float64).reshape(-1, 12)
    ratio = np.asarray(bn.moving_variance) / conv.var(0)
    assert np.all((ratio > 0.93) & (ratio < 1.07)), ratio
    assert conv.var() == pytest.approx(1.0, rel=0.2)
    train = np.asarray(model(x, training=True), np.float64)
    infer = np.asarray(model.predict(x, verbose=0), np.float64)
    assert 0.8 < infer.var() / train.var() < 1.25


@pytest.mark.parametrize("scale, offset, declared_pixels", [(1 / 255, 0.0, True), (1 / 127.5, -1.0, True),
                                                            (2.0, -1.0, False)])
def test_a_pixel_rescaling_at_the_input_declares_8_bit_pixels(scale, offset, declared_pixels):
    """EfficientNet / MobileNetV3's front: Rescaling by 1/255 or 1/127.5 takes pixel values in [0, 255]
    (probed with their uniform mean 127.5 and variance 255^2 / 12); any other rescaling declares nothing."""
    model = _preprocessed_cnn(lambda x: L.Rescaling(scale, offset=offset, name="rescale")(x))
    fn = graph.as_functional(model)
    (got,) = declared.input_moments(fn)
    if not declared_pixels:
        assert got is None
        assert inputs.resolve_input_moments(fn)[0].var == 1.0
        return
    np.testing.assert_allclose(got[0], 127.5)
    np.testing.assert_allclose(got[1], 255.0**2 / 12)
    rep = autoinit_tf.analyze(model, seed=0)
    assert rep["rescale"].inputs[0].mean == pytest.approx(127.5)
    # a given input_moments still wins
    rep = autoinit_tf.analyze(model, seed=0, input_moments=(0.0, 1.0))
    assert rep["rescale"].inputs[0].var == pytest.approx(1.0)
    # the analytic prediction of the conv on the declared inputs matches uniform pixels through the model
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    x = np.random.default_rng(3).uniform(0, 255, (512, 10, 10, 3)).astype("float32")
    conv = np.asarray(keras.Model(model.inputs, model.get_layer("conv").output)(x), np.float64)
    assert conv.var() == pytest.approx(1.0, rel=0.15)
