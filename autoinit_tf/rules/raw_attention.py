"""Self-attention written with raw ops (keras-hub's Swin and MiT, a user's own block): the projections behind
the attention weights and the values, so the attended values get the coupling of each key's logit with its own
value (`rules.attention.value_logit_coupling`) that a MultiHeadAttention layer's rule gives.

The pattern, walked back from ``weights @ values`` (`rules.ops.attended_values`):

- the weights come from a softmax of logits ``q @ k^T`` (through additive biases or masks, reshapes and
  multiplications by constants: the logit scale);
- q, k and v each come from a Dense layer's output through layout ops only (reshapes, transposes, indexing,
  unstacking: Swin's one ``qkv`` Dense split into three, MiT's ``kv`` Dense split into two) and
  multiplications by constants;
- k and v read the same tokens (one Dense, or two on the same tensor).

Which kernel column feeds which head and unit of q, k and v is found by replaying the layout ops in NumPy on
the Dense output's column indices. Anything else (rotary position embeddings, a projection other than
Dense, positions mixed) is not this pattern, and the attended values stay as `attended_values` gives them.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras.src.ops import core as core_ops
from keras.src.ops import numpy as np_ops

from autoinit_tf.moments import Moments
from autoinit_tf.rules.attention import (SHARED_LIMIT, normalized_width, value_logit_coupling, value_means,
                                         with_coupling)
from autoinit_tf.rules.provenance import producer, softmax_behind

__all__ = ["coupled_attended", "projections_read"]

_LAYOUT = (np_ops.Reshape, np_ops.Transpose, np_ops.GetItem, core_ops.Unstack, np_ops.Squeeze, np_ops.ExpandDims,
           core_ops.Cast)
_SCALE = (np_ops.Multiply, np_ops.Divide, np_ops.TrueDivide)
_DEPTH = 12


def _constant_factor(node):
    """The factor of a multiplication or division of one traced tensor by a number, or None."""
    op = node.operation
    if not isinstance(op, _SCALE) or len(node.input_tensors) != 1:
        return None
    args = list(node.arguments.args)
    if len(args) != 2:
        return None
    first, second = args
    traced = node.input_tensors[0]
    number = second if first is traced else first if second is traced else None
    if number is not None and not isinstance(number, (numbers.Real, keras.KerasTensor)) and hasattr(number, "shape"):
        number = np.asarray(keras.ops.convert_to_numpy(number))  # a backend scalar (Swin's q * scale)
    if isinstance(number, np.ndarray) and number.size == 1:
        number = float(number.reshape(-1)[0])
    if not isinstance(number, numbers.Real) or number == 0:
        return None
    if isinstance(op, np_ops.Multiply):
        return float(number)
    return 1.0 / float(number) if first is traced else None


def _projection(tensor):
    """(Dense layer, its node, the layout nodes from its output to `tensor` in order, scale) when `tensor` is a
    Dense output moved by layout ops and multiplied by constants; None otherwise."""
    chain, scale = [], 1.0
    for _ in range(_DEPTH):
        op, node = producer(tensor)
        if op is None:
            return None
        if type(op) is keras.layers.Dense:
            return op, node, chain[::-1], scale
        factor = _constant_factor(node)
        if factor is not None:
            scale *= factor
        elif not isinstance(op, _LAYOUT) or not node.input_tensors:
            return None
        else:
            chain.append((node, tensor))
        tensor = node.input_tensors[0]
    return None


def _replay(chain, columns):
    """The column index array pushed through the layout nodes of `chain` in NumPy (None when one is not known)."""
    x = columns
    for node, out in chain:
        op = node.operation
        if isinstance(op, np_ops.Reshape):
            x = x.reshape([-1 if d is None else int(d) for d in op.newshape])
        elif isinstance(op, np_ops.Transpose):
            x = np.transpose(x, op.axes)
        elif isinstance(op, np_ops.GetItem):
            key = node.arguments.args[1] if len(node.arguments.args) > 1 else None
            if not isinstance(key, (int, tuple, slice)):
                return None
            x = x[key]
        elif isinstance(op, core_ops.Unstack):
            index = next((i for i, t in enumerate(node.outputs) if t is out), None)
            if index is None:
                return None
            x = np.take(x, index, axis=op.axis)
        elif isinstance(op, np_ops.Squeeze):
            x = np.squeeze(x, axis=op.axis)
        elif isinstance(op, np_ops.ExpandDims):
            x = np.expand_dims(x, axis=op.axis)
        # Cast: the same entries
    return x


def _head_columns(found, positions_axis, units_axis):
    """(heads, units) kernel columns of a projection seen through its layout chain; None when a column varies
    along the positions."""
    dense, node, chain, _ = found
    shape = tuple(node.outputs[0].shape)
    if any(not isinstance(d, int) for d in shape[1:]):
        return None
    batch = shape[0] if isinstance(shape[0], int) else 1
    columns = np.broadcast_to(np.arange(shape[-1]), (batch,) + shape[1:]).copy()
    try:
        x = _replay(chain, columns)
    except (ValueError, IndexError, TypeError):
        return None
    if x is None or x.ndim < 3:
        return None
    x = np.moveaxis(x, (positions_axis, units_axis), (-2, -1))
    if np.any(x != x[..., :1, :]):
        return None
    first = x.reshape((-1,) + x.shape[-2:])[:, 0, :]  # (batch * heads, units)
    heads = first.shape[0] // batch
    cols = first[:heads]
    return cols if np.all(first.reshape(batch, heads, -1) == cols[None]) else None


def _logits_matmul(logits_tensor):
    """(matmul node, scale) for logits that are ``q @ k^T`` through additive terms, reshapes, casts and constant
    factors; None otherwise."""
    tensor, scale = logits_tensor, 1.0
    for _ in range(_DEPTH):
        op, node = producer(tensor)
        if op is None:
            return None
        if isinstance(op, np_ops.Matmul) and len(node.input_tensors) == 2:
            return node, scale
        factor = _constant_factor(node)
        if factor is not None:
            scale *= factor
            tensor = node.input_tensors[0]
        elif isinstance(op, (np_ops.Reshape, core_ops.Cast)):
            tensor = node.input_tensors[0]
        elif isinstance(op, (np_ops.Add, keras.layers.Add)):
            # the branch that leads to the product; a bias or a mask is the other one
            branches = [t for t in node.input_tensors if _leads_to_matmul(t)]
            if len(branches) != 1:
                return None
            tensor = branches[0]
        else:
            return None
    return None


def _leads_to_matmul(tensor, depth=8):
    """Whether `tensor` is a product of two traced tensors through the ops `_logits_matmul` passes."""
    if depth <= 0:
        return False
    op, node = producer(tensor)
    if op is None or not node.input_tensors:
        return False
    if isinstance(op, np_ops.Matmul):
        return len(node.input_tensors) == 2
    if isinstance(op, (np_ops.Add, keras.layers.Add)):
        return any(_leads_to_matmul(t, depth - 1) for t in node.input_tensors)
    if not isinstance(op, (np_ops.Reshape, core_ops.Cast) + _SCALE):
        return False
    return _leads_to_matmul(node.input_tensors[0], depth - 1)


def coupled_attended(ctx, weights_tensor, values_tensor, attended: Moments, a: Moments, v: Moments) -> Moments:
    """`attended` (``weights @ values``) with the value-logit coupling of self-attention written in raw ops, when
    the pattern of the module docstring is found; `attended` itself otherwise."""
    if v.between > SHARED_LIMIT * v.var:
        return attended  # values shared across positions: already an estimate (`rules.attention`), calibrated
    soft = softmax_behind(weights_tensor)
    if soft is None:
        return attended
    found = _logits_matmul(soft.input_tensors[0])
    if found is None:
        return attended
    matmul, logit_scale = found
    q_found, k_found, v_found = (_projection(t) for t in (*matmul.input_tensors, values_tensor))
    if q_found is None or k_found is None or v_found is None:
        return attended
    k_dense, k_node = k_found[0], k_found[1]
    v_dense, v_node = v_found[0], v_found[1]
    tokens = k_node.input_tensors[0]
    if v_node.input_tensors[0] is not tokens:
        return attended  # keys and values from different tokens: no coupling
    cols_q = _head_columns(q_found, -2, -1)
    cols_k = _head_columns(k_found, -1, -2)  # k^T: units on the contracted axis -2, keys on -1
    cols_v = _head_columns(v_found, -2, -1)
    if cols_q is None or cols_k is None or cols_v is None or cols_q.shape != cols_k.shape \
            or cols_v.shape[0] != cols_q.shape[0]:
        return attended
    kv_calls = ctx.inputs_of(k_dense)
    q_calls = ctx.inputs_of(q_found[0])
    logit_calls = ctx.inputs_of(soft.operation)
    if not kv_calls or not q_calls or not logit_calls:
        return attended
    kv_input, q_input, logits = kv_calls[-1][0], q_calls[-1][0], logit_calls[-1][0]
    if not all(isinstance(m, Moments) for m in (kv_input, q_input, logits)):
        return attended
    wk_all = np.asarray(ctx.value(k_dense.kernel), dtype=np.float64)
    wv_all = np.asarray(ctx.value(v_dense.kernel), dtype=np.float64)
    wq_all = np.asarray(ctx.value(q_found[0].kernel), dtype=np.float64)
    wk, wv, wq = wk_all[:, cols_k], wv_all[:, cols_v], wq_all[:, cols_q]  # (C, heads, units)
    bias = getattr(q_found[0], "bias", None)
    bq = None if bias is None else np.asarray(ctx.value(bias), dtype=np.float64)[cols_q]
    bv_var = getattr(v_dense, "bias", None)
    bv = None if bv_var is None else np.asarray(ctx.value(bv_var), dtype=np.float64)[cols_v]
    value_mean = value_means(kv_input, wv, bv) * v_found[3]
    scale = logit_scale * q_found[3] * k_found[3]
    keys = values_tensor.shape[-2]
    if not isinstance(keys, int):
        return attended
    sum_a2 = keys * float(a.second)
    d1, d2 = value_logit_coupling(wk, wv * v_found[3], wq, bq, kv_input, q_input, value_mean, scale, logits, sum_a2)
    out = with_coupling(attended, d1, d2, sum_a2, v.within, logits, normalized_width(tokens))
    if out is not attended:
        out.window = attended.window
    return out


def projections_read(op):
    """The Dense layers whose drawn kernels `coupled_attended` reads when the walk reaches `op` (a matmul or einsum
    of attention weights and values), after those layers' own calls: a pass that drops each drawn array once its
    layer's last call is visited (`analyze`) keeps these."""
    if not isinstance(op, (np_ops.Matmul, np_ops.Einsum)):
        return []
    found = []
    for node in getattr(op, "_inbound_nodes", []):
        tensors = list(node.input_tensors)
        if len(tensors) != 2:
            continue
        for weights, values in (tensors, tensors[::-1]):
            soft = softmax_behind(weights)
            logits = _logits_matmul(soft.input_tensors[0]) if soft is not None else None
            if logits is None:
                continue
            for tensor in (*logits[0].input_tensors, values):
                projection = _projection(tensor)
                if projection is not None:
                    found.append(projection[0])
    return found
