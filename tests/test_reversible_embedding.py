"""keras.layers.ReversibleEmbedding in both directions (keras-hub's tied LM heads; issue 15, item 2).
Was silently wrong: the reverse call h @ E^T got the embedding rule (predicted logit variance 1.0,
measured 63.8)."""

import keras
import numpy as np
import pytest

import autoinit_tf

pytestmark = pytest.mark.core
L = keras.layers


def _lm(tie_weights=True, soft_cap=None, width=64, vocab=500, out_norm=None, gain=None):
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    emb = L.ReversibleEmbedding(vocab, width, tie_weights=tie_weights, logit_soft_cap=soft_cap, name="emb")
    x = emb(ids)
    if gain is not None:  # Gemma: the embeddings times sqrt(d)
        x = keras.ops.multiply(x, keras.ops.convert_to_tensor(gain, dtype=x.dtype))
    h = L.LayerNormalization(name="norm_in")(x)
    h = L.Dense(width, activation="gelu", name="mlp")(h)
    h = (out_norm or L.LayerNormalization(name="norm_out"))(h)
    return keras.Model(ids, emb(h, reverse=True)), emb


def _measured_logits(model, vocab=500, seed=1):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(64, 32)).astype("int32")
    return np.asarray(keras.ops.convert_to_numpy(model(ids)), dtype=np.float64)


def _gamma(model):
    return keras.ops.convert_to_numpy(model.get_layer("norm_out").gamma).astype(np.float64)


@pytest.mark.parametrize("tie", [True, False])
def test_the_head_logits_are_on_target_and_predicted(tie):
    model, emb = _lm(tie_weights=tie)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    head = rep["emb#1"]
    y = _measured_logits(model)
    assert y.var() == pytest.approx(1.0, rel=0.1)
    assert head.outputs[0].var == pytest.approx(y.var(), rel=0.1)
    table_var = float(np.var(emb.embeddings.numpy()))
    assert table_var == pytest.approx(1.0, rel=0.1)  # the embedding's own output on target
    assert rep["emb#0"].outputs[0].var == pytest.approx(table_var, rel=0.1)
    if tie:  # one table serves both calls: the final norm's scale takes 1 / sqrt(d E[h^2]) for the head
        np.testing.assert_allclose(_gamma(model), 1.0 / 8, rtol=0.1)
        assert any("'norm_out' scales its input" in n for n in head.notes)
        assert any("scale x" in n for n in rep["norm_out"].notes)
    else:
        np.testing.assert_array_equal(_gamma(model), 1.0)
        assert float(np.var(emb.reverse_embeddings.numpy())) == pytest.approx(1.0 / 64, rel=0.1)


def test_wrapping_a_tied_model_twice_keeps_the_head_scale():
    model, _ = _lm()
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    first = _gamma(model)
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    np.testing.assert_allclose(_gamma(model), first, rtol=1e-5)
    assert _measured_logits(model).var() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("case", ["beta", "frozen", "gemma_gain"])
def test_tied_table_scaled_for_the_head_where_its_norm_cannot_take_the_scale(case):
    """A norm with a beta (its output is not proportional to its scale) or a frozen one keeps its scale: the
    table is drawn for the head, 1 / (d E[h^2]). Gemma multiplies its embeddings by sqrt(d): the table drawn
    for that use is the same 1 / d, and the norm's scale stays 1."""
    norm = L.LayerNormalization(name="norm_out", beta_initializer="ones") if case == "beta" else None
    model, emb = _lm(out_norm=norm, gain=8.0 if case == "gemma_gain" else None)
    if case == "frozen":
        model.get_layer("norm_out").trainable = False
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    y = _measured_logits(model)
    assert rep["emb#1"].outputs[0].var == pytest.approx(y.var(), rel=0.1)
    if case == "gemma_gain":  # the norm's scale only evens out the realized table's deviation from 1 / d
        np.testing.assert_allclose(_gamma(model), 1.0, rtol=0.01)
    else:
        np.testing.assert_array_equal(_gamma(model), 1.0)
    second = 2.0 if case == "beta" else 1.0  # beta = 1: E[h^2] = 1 + 1
    assert float(np.var(emb.embeddings.numpy())) == pytest.approx(1.0 / (64 * second), rel=0.15)
    assert y.var() == pytest.approx(1.0, rel=0.1)


def test_soft_capped_logits_are_predicted():
    model, _ = _lm(soft_cap=0.5)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    y = _measured_logits(model)
    assert np.abs(y).max() <= 0.5
    assert rep["emb#1"].outputs[0].var == pytest.approx(y.var(), rel=0.1)


def test_a_shared_head_norm_keeps_its_scale():
    """The norm before the head also normalizes the embeddings (called twice): scaling it for the head would
    scale the other call too, so the table is drawn for the head instead."""
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    emb = L.ReversibleEmbedding(500, 64, name="emb")
    norm = L.LayerNormalization(name="norm_out")
    h = L.Dense(64, activation="gelu", name="mlp")(norm(emb(ids)))
    model = keras.Model(ids, emb(norm(h), reverse=True))
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    np.testing.assert_array_equal(_gamma(model), 1.0)
    assert float(np.var(emb.embeddings.numpy())) == pytest.approx(1.0 / 64, rel=0.15)
    assert _measured_logits(model).var() == pytest.approx(1.0, rel=0.1)
