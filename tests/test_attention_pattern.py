"""A pattern over positions that is the same for every example (a position table) and attention's weights:
weights summing to one average a zero-sum pattern away where they are uniform, so the attended values keep
P (T A2 - 1) / (T - 1) of it, not the P A2 an independent part keeps (`Moments.pattern`,
`rules.attention._attended`). Checked against sampled softmax weights and against the real layers."""

import warnings

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf.moments import Moments
from autoinit_tf.rules.attention import _attended
from over_seeds import assert_over_seeds

pytestmark = pytest.mark.core
L = keras.layers
keras_hub = pytest.importorskip("keras_hub")


@pytest.mark.parametrize("keys, logit_sd", [(8, 0.5), (37, 1.0), (64, 1.5)])
def test_zero_sum_pattern_against_sampled_softmax_weights(keys, logit_sd):
    # Sampled: 200000 sets of softmax weights over `keys` i.i.d. Gaussian logits, one fixed zero-sum pattern
    # d (what every example's keys carry at their positions) and an independent part e.
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, logit_sd, size=(200000, keys))
    a = np.exp(logits - logits.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    d = rng.standard_normal(keys)
    d -= d.mean()
    e = rng.standard_normal((200000, keys))
    sampled_pattern = np.mean((a @ d) ** 2)
    sampled_free = np.mean(np.sum(a * e, axis=1) ** 2)
    a2 = float(np.mean(np.sum(a * a, axis=1)))
    p = float(np.mean(d * d))
    pred = _attended(Moments(0.0, p + 1.0), p + 1.0, 0.0, a2, keys, 0.0, pattern=p)
    assert pred.var == pytest.approx(sampled_pattern + sampled_free, rel=0.02)
    # the pattern's own share, and what treating it as independent would give
    assert p * (keys * a2 - 1.0) / (keys - 1.0) == pytest.approx(sampled_pattern, rel=0.03)
    assert p * a2 > 1.15 * sampled_pattern  # 1.2x at the widest logits here, 1.7x at sd 1 over 37 keys


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_layer_norm_and_attention_over_a_position_table_on_target(dropout):
    """x + PositionEmbedding(x), LayerNormalization, MultiHeadAttention over 37 tokens: half of the tokens'
    variance is the table, fixed per position. Taken as independent, the attention output measured
    0.77-0.87 of its target (the output projection drawn for too much attended variance); with the table's
    pattern carried, 0.90-1.02 over three seeds. With a dropout between the normalization and the attention
    (BERT's embeddings), measured in training mode: the mask keeps the pattern and adds an independent part."""
    ratios = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((37, 64))
        x = L.Add()([inp, keras_hub.layers.PositionEmbedding(37)(inp)])
        h = L.LayerNormalization(epsilon=1e-6)(x)
        if dropout:
            h = L.Dropout(dropout)(h)
        model = keras.Model(inp, L.MultiHeadAttention(2, 32, name="mha")(h, h))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = autoinit_tf.wrap(model, seed=seed, calibrate=None, return_report=True)[1]
        xin = np.random.default_rng(seed + 9).standard_normal((512, 37, 64)).astype("float32")
        y = np.asarray(keras.ops.convert_to_numpy(model(xin, training=True)), dtype=np.float64)
        ratios.append(y.var() / report["mha"].outputs[0].var)
    assert_over_seeds(ratios, mean=0.06, each=0.12, what="attention output over a position table")
