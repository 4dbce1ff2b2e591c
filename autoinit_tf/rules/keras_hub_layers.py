"""Rules for keras-hub's own layers (keras-hub stays optional: `builtin.register_builtin_rules` installs
this table only once keras-hub has been imported, so importing autoinit-tf never imports it).

keras-hub's blocks (TransformerEncoder/Decoder, the Llama/Gemma decoders, ViT and Swin layers,
RMSNormalization, LlamaLayerNorm, RotaryEmbedding...) have no rule of their own on purpose: their calls
are traced (`autoinit_tf.tracing`) so every inner layer gets its own rule (the RMS norms' raw ops are
recognized as one normalization by `autoinit_tf.rules.rms_pattern`). The layers here need one
because their calls cannot be traced with unknown sequence lengths or hold weights a trace would read
as constants. CachedMultiHeadAttention is a MultiHeadAttention (its rule); ReversibleEmbedding is
Keras' own (`rules.linear.reversible_embedding_rule`).
"""

from __future__ import annotations

import sys

import numpy as np

from autoinit_tf.rules.linear import positions_read
from autoinit_tf.rules.registry import BuiltinTable

__all__ = ["BUILTIN", "available"]

BUILTIN = BuiltinTable(__name__)


def available() -> bool:
    """Whether keras-hub has been imported (its classes exist to register)."""
    return "keras_hub" in sys.modules


def position_embedding_rule(ctx):
    """keras-hub PositionEmbedding: the first T rows of the learned table (T the input's length, the
    probe length when unknown), the same for every example. The table is drawn like every embedding
    table (`embedding_rule`): entries with variance `signal_variance`. Per feature: mean and variance
    over the T positions; the rest is a pattern over positions (`linear.positions_read`)."""
    layer = ctx.layer
    shape = ctx.input_shapes[0]
    length = shape[-2] if len(shape) >= 2 and shape[-2] is not None else min(ctx.probe_length, layer.sequence_length)
    start = (ctx.kwargs or {}).get("start_index", 0)
    start = start if isinstance(start, (int, np.integer)) else 0
    ctx.weight_scale = ctx.signal_variance
    table = ctx.draw(layer.position_embeddings, ctx.signal_variance).astype(np.float64)
    return positions_read(table[int(start):int(start) + int(length)])


def declare_all():
    """Fill the table from keras-hub's classes (called when keras-hub is importable)."""
    if BUILTIN.entries:
        return
    import keras_hub

    BUILTIN.rule(keras_hub.layers.PositionEmbedding, position_embedding_rule)
