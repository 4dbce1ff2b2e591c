"""keras.layers.ReversibleEmbedding in both directions (keras-hub's tied LM heads; issue 15, item 2).
Was silently wrong: the reverse call h @ E^T got the embedding rule (predicted logit variance 1.0,
measured 63.8)."""

import keras
import numpy as np
import pytest

import autoinit_tf

pytestmark = pytest.mark.core
L = keras.layers


def _lm(tie_weights=True, soft_cap=None, width=64, vocab=500):
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    emb = L.ReversibleEmbedding(vocab, width, tie_weights=tie_weights, logit_soft_cap=soft_cap, name="emb")
    h = L.LayerNormalization(name="norm_in")(emb(ids))
    h = L.Dense(width, activation="gelu", name="mlp")(h)
    h = L.LayerNormalization(name="norm_out")(h)
    return keras.Model(ids, emb(h, reverse=True)), emb


def _measured_logits(model, vocab=500, seed=1):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(64, 32)).astype("int32")
    return np.asarray(keras.ops.convert_to_numpy(model(ids)), dtype=np.float64)


@pytest.mark.parametrize("tie", [True, False])
def test_the_head_logits_are_on_target_and_predicted(tie):
    model, emb = _lm(tie_weights=tie)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    head = rep["emb#1"]
    y = _measured_logits(model)
    assert y.var() == pytest.approx(1.0, rel=0.1)
    assert head.outputs[0].var == pytest.approx(y.var(), rel=0.1)
    table_var = float(np.var(emb.embeddings.numpy()))
    if tie:  # one table serves both calls: scaled for the head, 1 / (d E[h^2]) with E[h^2] = 1 after norm_out
        assert table_var == pytest.approx(1.0 / 64, rel=0.1)
        assert any("tied with the output head" in n for n in rep["emb#0"].notes)
    else:
        assert table_var == pytest.approx(1.0, rel=0.1)
        assert float(np.var(emb.reverse_embeddings.numpy())) == pytest.approx(1.0 / 64, rel=0.1)
    assert rep["emb#0"].outputs[0].var == pytest.approx(table_var, rel=0.1)


def test_soft_capped_logits_are_predicted():
    model, _ = _lm(soft_cap=0.5)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    y = _measured_logits(model)
    assert np.abs(y).max() <= 0.5
    assert rep["emb#1"].outputs[0].var == pytest.approx(y.var(), rel=0.1)
