"""The NumPy recurrence (`rules.recurrent_numpy`) against Keras' own layers, and the channel covariance it
hands to the Dense after it (`Moments.ch_cov`) against a NumPy product."""

import keras
import numpy as np
import pytest

from autoinit_tf.rules import recurrent_numpy
from autoinit_tf.rules.fallback import array_moments
from autoinit_tf.rules.linear import linear_output

L = keras.layers

CASES = {
    "simple_rnn_sequences": lambda: L.SimpleRNN(4, return_sequences=True),
    "lstm_last": lambda: L.LSTM(4),
    "lstm_backwards_with_states": lambda: L.LSTM(4, return_sequences=True, go_backwards=True, return_state=True),
    "lstm_relu_random_bias": lambda: L.LSTM(4, activation="relu", unit_forget_bias=False,
                                            bias_initializer="random_normal"),
    "gru_reset_after": lambda: L.GRU(4, return_sequences=True, bias_initializer="random_normal"),
    "gru_reset_before": lambda: L.GRU(4, reset_after=False, bias_initializer="random_normal"),
    "gru_no_bias_hard_sigmoid": lambda: L.GRU(3, use_bias=False, recurrent_activation="hard_sigmoid"),
    "bidirectional_concat": lambda: L.Bidirectional(L.LSTM(4, return_sequences=True)),
    "bidirectional_mul": lambda: L.Bidirectional(L.GRU(4), merge_mode="mul"),
    "bidirectional_ave": lambda: L.Bidirectional(L.SimpleRNN(4, return_sequences=True), merge_mode="ave"),
}


@pytest.mark.parametrize("make", list(CASES.values()), ids=list(CASES))
def test_numpy_recurrence_matches_the_keras_layer(make):
    layer = make()
    x = np.random.default_rng(0).standard_normal((5, 7, 6)).astype("float32")
    expected = layer(x)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    assert recurrent_numpy.unsupported(layer) is None
    ours = recurrent_numpy.run(layer, x, keras.ops.convert_to_numpy)
    assert len(ours) == len(expected)
    for a, b in zip(expected, ours):
        np.testing.assert_allclose(b, keras.ops.convert_to_numpy(a), atol=2e-6)


@pytest.mark.parametrize("make,why", [
    (lambda: L.LSTM(4, dropout=0.1), "dropout"),
    (lambda: L.GRU(4, recurrent_dropout=0.2), "dropout"),
    (lambda: L.SimpleRNN(4, activation="gelu"), "activation"),
    (lambda: L.LSTM(4, stateful=True), "stateful"),
    (lambda: L.RNN(L.StackedRNNCells([L.LSTMCell(4), L.LSTMCell(4)])), "cell"),
    (lambda: L.Bidirectional(L.LSTM(4), merge_mode=None), "merge_mode"),
], ids=["dropout", "recurrent_dropout", "activation", "stateful", "custom_cell", "merge_none"])
def test_what_the_numpy_recurrence_does_not_reproduce_is_named(make, why):
    layer = make()
    layer(np.zeros((2, 3, 5), "float32"))
    assert why in recurrent_numpy.unsupported(layer)


def test_a_dense_on_correlated_channels_uses_their_covariance():
    """w_j^T Cov w_j per unit: with the measured covariance the prediction is the variance of x @ W on the very
    sample it was measured on (an identity); with the diagonal alone it is off by the cross terms."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((8, 8))
    x = rng.standard_normal((4000, 8)) @ mix + rng.standard_normal(8)  # strongly correlated channels
    w = rng.standard_normal((8, 5))
    y = x @ w
    with_cov = array_moments(x, covariance=True)
    np.testing.assert_allclose(np.diag(with_cov.ch_cov), x.var(axis=0), rtol=1e-10)
    pred, _, _ = linear_output(with_cov, w[None], [1.0])
    assert pred.var == pytest.approx(float(y.var()), rel=1e-9)
    np.testing.assert_allclose(pred.ch_var, y.var(axis=0), rtol=1e-9)
    diagonal, _, _ = linear_output(array_moments(x), w[None], [1.0])
    assert abs(diagonal.var / y.var() - 1) > 0.05


def test_a_simulation_too_costly_for_enough_sequences_stays_an_estimate(monkeypatch):
    """The probe is bounded by the recurrence's cost (`SIMULATION_FLOPS`): a layer that affords only a few
    sequences says so, and its output stays an estimate (the Dense after it is calibrated by default), even
    on the Embedding's exact rows."""
    import warnings

    import autoinit_tf
    from autoinit_tf.rules import recurrent

    def build():
        inp = keras.Input((12,), dtype="int32")
        h = L.LSTM(16, name="lstm")(L.Embedding(50, 16, name="embedding")(inp))
        return keras.Model(inp, L.Dense(4, name="dense")(h))

    per_sequence = 12 * 4 * 16 * (16 + 16)  # time x gates x units x (features + units)
    monkeypatch.setattr(recurrent, "SIMULATION_FLOPS", 8 * per_sequence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(build(), seed=0, return_report=True)
    assert any("on 8 probe sequences" in n for n in rep["lstm"].notes)
    assert set(rep.auto_calibrated) == {"dense"}
