"""Rules for keras-hub's own layers (keras-hub stays optional: `builtin.register_builtin_rules` installs
this table only once keras-hub has been imported, so importing autoinit-tf never imports it).

keras-hub's blocks (TransformerEncoder/Decoder, the Llama/Gemma decoders, ViT and Swin layers,
RMSNormalization, LlamaLayerNorm, RotaryEmbedding...) have no rule of their own on purpose: their calls
are traced (`autoinit_tf.tracing`) so every inner layer gets its own rule (the RMS norms' raw ops are
recognized as one normalization by `autoinit_tf.rules.rms_pattern`). The layers here need one
because their calls cannot be traced with unknown sequence lengths or hold weights a trace would read
as constants. CachedMultiHeadAttention is a MultiHeadAttention (its rule); ReversibleEmbedding is
Keras' own (`rules.linear.reversible_embedding_rule`). DeBERTa-v3's attention cannot be traced on
TensorFlow (its relative-position gather calls ``tf.gather`` there) and its relative embedding repeats a
table over the batch: both have rules here, on every backend alike.
"""

from __future__ import annotations

import sys

import numpy as np

from autoinit_tf.moments import Moments
from autoinit_tf.rules.attention import heads_rule, output_projection
from autoinit_tf.rules.linear import linear_output, position_bias_scale, positions_read
from autoinit_tf.rules.registry import BuiltinTable

__all__ = ["BUILTIN", "available"]

BUILTIN = BuiltinTable(__name__)


def available() -> bool:
    """Whether keras-hub has been imported (its classes exist to register)."""
    return "keras_hub" in sys.modules


def position_embedding_rule(ctx):
    """keras-hub PositionEmbedding: the first T rows of the learned table (T the input's length, the
    probe length when unknown), the same for every example. The table is drawn like every embedding
    table (`embedding_rule`): entries with variance `signal_variance`, or a per-position bias where its output
    is added to a projection's (`linear.position_bias_scale`). Per feature: mean and variance over the T
    positions; the rest is a pattern over positions (`linear.positions_read`)."""
    layer = ctx.layer
    shape = ctx.input_shapes[0]
    length = shape[-2] if len(shape) >= 2 and shape[-2] is not None else min(ctx.probe_length, layer.sequence_length)
    start = (ctx.kwargs or {}).get("start_index", 0)
    start = start if isinstance(start, (int, np.integer)) else 0
    var = ctx.signal_variance * position_bias_scale(ctx, layer.position_embeddings)
    ctx.weight_scale = var
    table = ctx.draw(layer.position_embeddings, var).astype(np.float64)
    return positions_read(table[int(start):int(start) + int(length)])


def relative_embedding_rule(ctx):
    """DeBERTa-v3's RelativeEmbedding: its table (2 x buckets, hidden), LayerNorm-ed row by row, the same for
    every example. The table is drawn like an embedding table (entries with variance `signal_variance`);
    the output is computed from the drawn rows with the layer norm's own gamma, beta and epsilon, exactly."""
    layer = ctx.layer
    ctx.weight_scale = ctx.signal_variance
    table = ctx.draw(layer.rel_embeddings, ctx.signal_variance).astype(np.float64)
    norm = layer.layer_norm
    centred = table - table.mean(axis=-1, keepdims=True)
    rows = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + float(norm.epsilon))
    if getattr(norm, "gamma", None) is not None:
        rows = rows * np.asarray(ctx.value(norm.gamma), dtype=np.float64)
    if getattr(norm, "beta", None) is not None:
        rows = rows + np.asarray(ctx.value(norm.beta), dtype=np.float64)
    return positions_read(rows)


def _argument(ctx, i, name):
    args = list(ctx.args)
    return args[i] if len(args) > i else (ctx.kwargs or {}).get(name)


def disentangled_attention_rule(ctx):
    """DeBERTa-v3's DisentangledSelfAttention: multi-head self-attention whose logits add, to the content
    term q_i.k_j, a content-to-position term q_i.pk_d and a position-to-content term k_j.pq_d (pq, pk: the
    same query and key projections of the relative embeddings r, at the bucketed offset d of i and j), all
    scaled by 1 / sqrt(3 head_dim). With the three terms uncorrelated (independent tokens and table rows),

        Var logit = (V(q, k) + V(q, pk) + V(k, pq)) / 3,  V(a, b) = E[a^2] E[b^2] - E[a]^2 E[b]^2 per unit,

    from the drawn kernels. The rest is MultiHeadAttention's rule (`rules.attention.heads_rule`); a key's
    own token enters its logit through k_j.(q_i + pq_d) / sqrt(3 head_dim), which the value-logit coupling
    takes as one query of twice the second moment (width 3 head_dim / 2): an approximation, so the layer is
    marked inexact and ``calibrate="auto"`` measures it."""
    layer = ctx.layer
    x = _argument(ctx, 0, "inputs")
    rel = _argument(ctx, 1, "rel_embeddings")
    if not isinstance(x, Moments) or not isinstance(rel, Moments):
        return ctx.probe()
    d = int(layer.attn_head_size)
    scale = float(layer.scale_factor)

    def projected(dense, m):
        w = np.asarray(ctx.value(dense.kernel), dtype=np.float64)
        b = ctx.value(dense.bias) if getattr(dense, "bias", None) is not None else None
        return linear_output(m, w.reshape(w.shape[0], -1)[None], [1.0], b)[0]

    def logits_of(q, k):
        pq, pk = projected(layer._query_dense, rel), projected(layer._key_dense, rel)
        terms = [(q, k), (q, pk), (k, pq)]
        var = sum(a.second * b.second - a.mean**2 * b.mean**2 for a, b in terms) * d * scale**2
        return Moments(d * scale * sum(a.mean * b.mean for a, b in terms), var)

    ctx.inexact("DeBERTa's relative-position logits: the coupling of a key's logit and its value is approximated")
    tensors = ctx.node.input_tensors
    shape = ctx.node.arguments.args[0].shape if ctx.node.arguments.args else tensors[0].shape
    return heads_rule(ctx, layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense, d,
                      qkv=(x, x, x, shape), tokens=tensors[0], logits_of=logits_of, coupling_dim=1.5 * d,
                      out_contracted=len(layer._output_dense.kernel.shape) - 1)


def token_projections(layer, args, kwargs):
    """What calibration scales inside a self-attention called as ``call(inputs, ...)``: the query, key and
    value projections of its ``inputs``."""
    x = args[0] if args else kwargs.get("inputs")
    return [(sub, x) for sub in (layer._query_dense, layer._key_dense, layer._value_dense)] if x is not None else []


def _deberta_classes():
    """(DisentangledSelfAttention, RelativeEmbedding) of this keras-hub, or None where it has no DeBERTa-v3."""
    try:
        from keras_hub.src.models.deberta_v3.disentangled_self_attention import DisentangledSelfAttention
        from keras_hub.src.models.deberta_v3.relative_embedding import RelativeEmbedding
    except ImportError:
        return None
    return DisentangledSelfAttention, RelativeEmbedding


def declare_all():
    """Fill the table from keras-hub's classes (called when keras-hub is importable)."""
    if BUILTIN.entries:
        return
    import keras_hub

    BUILTIN.rule(keras_hub.layers.PositionEmbedding, position_embedding_rule)
    deberta = _deberta_classes()
    if deberta is not None:
        attention, relative = deberta
        BUILTIN.rule(attention, disentangled_attention_rule, kernel=output_projection, bias_split=True,
                     inner=token_projections)
        BUILTIN.rule(relative, relative_embedding_rule)
