"""Known attention masks: a causal mask (given as ``use_causal_mask``, or built inside the model from the
probe's all-ones padding mask, folded as a constant) reaches the attention rules as the exact matrix."""

import math

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf.moments import Moments
from autoinit_tf.rules.activation import masked_softmax_moments, softmax_moments

pytestmark = pytest.mark.core
L = keras.layers
T, D = 64, 128


def _causal_model(how):
    x = keras.Input((T, D), name="x")
    mha = L.MultiHeadAttention(num_heads=4, key_dim=32, name="mha")
    if how == "flag":
        return keras.Model(x, mha(x, x, use_causal_mask=True))
    pm = keras.Input((T,), dtype="int32", name="padding_mask")
    causal = np.tril(np.ones((T, T), dtype="float32"))[None]
    mask = keras.ops.minimum(keras.ops.expand_dims(keras.ops.cast(pm, "float32"), 1), causal)
    return keras.Model({"x": x, "padding_mask": pm}, mha(x, x, attention_mask=mask))


@pytest.mark.parametrize("how", ["flag", "built_from_padding_mask"])
def test_causal_attention_output_on_target_after_the_analytic_wrap(how):
    """Query i averages its own i + 1 keys: the attended variance is W H_T / T, 4.7x the W / T of every
    query seeing every key at T = 64 (the output projection was drawn 4.7x too large)."""
    model = _causal_model(how)
    _, report = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert not report.auto_calibrated  # the mask is known: the default wrap has nothing to calibrate
    x = np.random.default_rng(3).standard_normal((256, T, D)).astype("float32")
    feed = x if how == "flag" else {"x": x, "padding_mask": np.ones((256, T), dtype="int32")}
    y = np.asarray(keras.ops.convert_to_numpy(model(feed)), dtype=np.float64)
    assert np.mean(y * y) == pytest.approx(1.0, rel=0.1)


def test_an_unknown_mask_is_still_marked_for_calibration():
    x = keras.Input((T, D))
    m = keras.Input((T, T), name="attention_bias")  # a float input: not a padding mask, not known
    out = L.MultiHeadAttention(num_heads=4, key_dim=32, name="mha")(x, x, attention_mask=m)
    _, report = autoinit_tf.wrap(keras.Model([x, m], out), seed=0, return_report=True)
    assert "mha" in report.auto_calibrated


def test_masked_softmax_moments_against_sampling():
    rng = np.random.default_rng(0)
    logits = Moments(0.2, 1.5)
    rows = np.tril(np.ones((T, T), dtype=bool))
    z = rng.normal(logits.mean, math.sqrt(logits.var), size=(4000, T, T))
    z = np.where(rows, z, -np.inf)
    a = np.exp(z - z.max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)
    pred = masked_softmax_moments(logits, rows)
    assert pred.mean == pytest.approx(a.mean(), rel=1e-6)
    # the softmax of Gaussian logits by Fenton-Wilkinson (`softmax_moments`): a few percent
    assert pred.second == pytest.approx(np.mean(a * a), rel=0.06)
    assert pred.second > 2.5 * softmax_moments(logits, T).second  # every row seeing all 64: far less


def test_where_on_a_known_condition_passes_the_chosen_branch():
    x = keras.Input((T, D), name="x")
    pm = keras.Input((T,), dtype="int32", name="padding_mask")
    keep = keras.ops.expand_dims(keras.ops.equal(pm, 1), -1)
    y = keras.ops.where(keep, x, keras.ops.zeros_like(x))
    out = L.Dense(8, name="head")(y)
    model = keras.Model({"x": x, "padding_mask": pm}, out)
    _, report = autoinit_tf.wrap(model, seed=0, return_report=True)
    rows = {r.name: r for r in report.rows}
    where = [r for r in report.rows if r.type == "Where"][0]
    assert where.rule == "where_op_rule"  # not measured on the probe
    assert where.outputs[0].var == pytest.approx(1.0)
    assert not report.auto_calibrated
    assert rows["head"].outputs[0].var == pytest.approx(1.0, rel=1e-6)


def test_additive_mask_on_raw_op_attention():
    """Swin's shifted windows add -100 to the logits of keys in another window: taken as logit variance
    (thousands), the softmax looked one-hot and the output projection came out 0.011x the target. Now the
    mask's rows reach the softmax (`Moments.visible`), and weights @ values passes the values' shared part
    whole (each row of weights sums to 1)."""
    n, d = 36, 64
    x = keras.Input((n, d))
    q = L.Dense(d, use_bias=False)(x)
    k = L.Dense(d, use_bias=False)(x)
    v = L.Dense(d, use_bias=False)(x)
    groups = np.repeat(np.arange(4), n // 4)
    mask = np.where(groups[:, None] == groups[None, :], 0.0, -100.0).astype("float32")  # 4 windows of 9
    logits = keras.ops.matmul(q, keras.ops.transpose(k, (0, 2, 1))) / math.sqrt(d) + mask
    a = keras.ops.softmax(logits, axis=-1)
    out = L.Dense(d, use_bias=False, name="proj")(keras.ops.matmul(a, v))
    model = keras.Model(x, out)
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    xs = np.random.default_rng(4).standard_normal((512, n, d)).astype("float32")
    y = np.asarray(keras.ops.convert_to_numpy(model(xs)), dtype=np.float64)
    assert np.mean(y * y) == pytest.approx(1.0, rel=0.1)
