"""Rules for raw operations inside functional graphs (``x + y``, ``x * 2.0``, ``keras.ops.*``).

Elementwise unary ops use the op itself on the quadrature nodes (split at the kinks listed here).
Binary arithmetic accepts a tensor and a constant (scalar or array: its entries' mean and second
moment enter) or two independent tensors. Reductions over n entries treat them as independent:
mean keeps (mu, v / n), sum gives (n mu, n v), max the largest of n Gaussians. matmul over a
contracted dimension n: mean n mu_a mu_b, variance n (E[a^2] E[b^2] - mu_a^2 mu_b^2).
"""

from __future__ import annotations

import keras
import numpy as np
from keras.src.ops import core as core_ops
from keras.src.ops import math as math_ops
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as np_ops

from autoinit_tf.moments import Moments, elementwise_moments, max_of_gaussians, mix
from autoinit_tf.rules.activation import (MASKED_WEIGHTS, log_softmax_moments, log_softmax_per_class_moments,
                                         mark_wide_logits, masked_softmax_moments, numpy_function, per_class,
                                         softmax_moments, softmax_per_class_moments)
from autoinit_tf.rules.linear import linear_output, position_bias, rescale_to_target
from autoinit_tf.rules.pooling import global_average
from autoinit_tf.rules.merge import add_moments, concat_moments, multiply_signals
from autoinit_tf.rules.provenance import producer, projection_behind, softmax_behind
from autoinit_tf.rules.registry import BuiltinTable
from autoinit_tf.rules.reshape import relayout
from autoinit_tf.rules.rms_pattern import rms_normalized, rms_normalized_moments
from autoinit_tf.rules import raw_attention, windows

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

# -- elementwise unary ops ---------------------------------------------------------------------

_KINKS = {
    nn_ops.Relu: lambda op: (0.0,),
    nn_ops.Relu6: lambda op: (0.0, 6.0),
    nn_ops.LeakyRelu: lambda op: (0.0,),
    nn_ops.HardSigmoid: lambda op: (-3.0, 3.0),
    nn_ops.HardSilu: lambda op: (-3.0, 3.0),
    nn_ops.Elu: lambda op: (0.0,),
    nn_ops.Selu: lambda op: (0.0,),
    nn_ops.Celu: lambda op: (0.0,),
    nn_ops.HardTanh: lambda op: (-1.0, 1.0),
    nn_ops.SoftShrink: lambda op: (-float(op.threshold), float(op.threshold)),
    nn_ops.HardShrink: lambda op: (-float(op.threshold), float(op.threshold)),
    nn_ops.SparsePlus: lambda op: (-1.0, 1.0),
    nn_ops.SparseSigmoid: lambda op: (-1.0, 1.0),
    nn_ops.Threshold: lambda op: (float(op.threshold),),
    nn_ops.Softsign: lambda op: (0.0,),
    nn_ops.Sigmoid: lambda op: (),
    nn_ops.Softplus: lambda op: (),
    nn_ops.Silu: lambda op: (),
    nn_ops.Squareplus: lambda op: (),
    nn_ops.LogSigmoid: lambda op: (),
    nn_ops.Gelu: lambda op: (),
    nn_ops.TanhShrink: lambda op: (),
    np_ops.Tanh: lambda op: (),
    np_ops.Exp: lambda op: (),
    np_ops.Absolute: lambda op: (0.0,),
    np_ops.Square: lambda op: (),
    np_ops.Sign: lambda op: (0.0,),
    np_ops.Sin: lambda op: (),
    np_ops.Cos: lambda op: (),
}


def _unary_elementwise_rule(ctx):
    op = ctx.op
    kinks = _KINKS[next(c for c in type(op).__mro__ if c in _KINKS)](op)
    return elementwise_moments(numpy_function(op), ctx.input, kinks)


for _cls in _KINKS:
    BUILTIN.rule(_cls, _unary_elementwise_rule)


@BUILTIN.rule(np_ops.Clip)
def clip_rule(ctx):
    op = ctx.op
    args, kwargs = list(ctx.args), ctx.kwargs or {}
    if hasattr(op, "x_min"):  # Keras >= 3.x: Clip(x_min, x_max) holds its bounds, the node has x alone
        lo, hi = op.x_min, op.x_max
    else:  # the bounds as call arguments, positional or by keyword
        lo = args[1] if len(args) > 1 else kwargs.get("x_min")
        hi = args[2] if len(args) > 2 else kwargs.get("x_max")
    if isinstance(lo, Moments) or isinstance(hi, Moments):
        return ctx.probe()
    lo, hi = float(np.asarray(lo)), float(np.asarray(hi))
    return elementwise_moments(lambda x: np.clip(x, lo, hi), ctx.input, (lo, hi)) if op else None


#: Ops defined for positive inputs only: Gaussian quadrature when the input stays positive (its mean
#: more than `POSITIVE_MARGIN` standard deviations above 0, e.g. rsqrt of a mean of squares in RMS
#: normalization), else measured on a probe.
_POSITIVE_DOMAIN = {
    math_ops.Rsqrt: lambda x: 1.0 / np.sqrt(x),
    np_ops.Sqrt: np.sqrt,
    np_ops.Log: np.log,
    np_ops.Reciprocal: lambda x: 1.0 / x,
}
POSITIVE_MARGIN = 8.0


def _positive_domain_rule(ctx):
    m = ctx.input
    if not isinstance(m, Moments) or m.mean <= POSITIVE_MARGIN * np.sqrt(max(m.var, 0.0)):
        return ctx.probe()
    f = _POSITIVE_DOMAIN[next(c for c in type(ctx.op).__mro__ if c in _POSITIVE_DOMAIN)]
    return elementwise_moments(f, m, ())


for _cls in _POSITIVE_DOMAIN:
    BUILTIN.rule(_cls, _positive_domain_rule)


def _extremum_rule(ctx):
    """min/max of a signal and a scalar constant c: the clipped Gaussian (kink at c); else a probe."""
    a, b = ctx.args[0], ctx.args[1]
    if isinstance(a, Moments) == isinstance(b, Moments):
        return ctx.probe()
    m, c = (a, b) if isinstance(a, Moments) else (b, a)
    c = _constant_array(ctx, c)
    if c.size != 1:
        return ctx.probe()
    c = float(c.reshape(()))
    f = (lambda x: np.minimum(x, c)) if isinstance(ctx.op, np_ops.Minimum) else (lambda x: np.maximum(x, c))
    return elementwise_moments(f, m, (c,))


BUILTIN.rule(np_ops.Minimum, _extremum_rule)
BUILTIN.rule(np_ops.Maximum, _extremum_rule)


@BUILTIN.rule(np_ops.Negative)
def negative_rule(ctx):
    m = ctx.input
    return Moments(-m.mean, m.var, m.between)


# -- binary arithmetic --------------------------------------------------------------------------


def _constant_array(ctx, c):
    """A constant operand as float64: a layer's variable (traced calls: ``x * self.scale``) by the value
    this pass gives it (`RuleContext.value`), anything else converted."""
    if isinstance(c, (int, float)):
        return np.asarray(c, dtype=np.float64)
    if isinstance(c, keras.Variable):
        return np.asarray(ctx.value(c), dtype=np.float64)
    return np.asarray(keras.ops.convert_to_numpy(c), dtype=np.float64)


def _constant_stats(ctx, c):
    arr = _constant_array(ctx, c)
    return float(arr.mean()), float(np.mean(arr * arr))


def _binary(ctx):
    a, b = ctx.args[0], ctx.args[1]
    return a, b, isinstance(a, Moments), isinstance(b, Moments)


#: A constant added to logits with entries at or below this is a mask (exp(-30) ~ 1e-13 of a weight).
MASK_LOGIT = -30.0


def _additive_mask(ctx, m: Moments, c):
    """The signal plus a constant mask (Swin's shifted windows: 0 where a key is visible, -100 where not):
    the moments of the visible entries (the constant's visible part added) with `Moments.visible`, the rows
    of the last axis, for the softmax after it; None when `c` is no such mask."""
    arr = _constant_array(ctx, c)
    if arr.ndim < 1 or arr.size < 2 or float(arr.min()) > MASK_LOGIT:
        return None
    out_shape = ctx.node.outputs[0].shape
    if not out_shape or out_shape[-1] != arr.shape[-1]:
        return None
    visible = arr > MASK_LOGIT / 2
    if not visible.any():
        return None
    shown = arr[visible]
    c1, c2 = float(shown.mean()), float(np.mean(shown * shown))
    cvar = max(c2 - c1 * c1, 0.0)
    out = m.scaled(1.0, c1) if cvar == 0.0 else Moments(m.mean + c1, m.var + cvar, m.between + cvar)
    out.visible = visible.reshape(-1, arr.shape[-1])
    return out


def _draw_additive_table(ctx, c, m_tensor):
    """A learned table a traced layer adds to the signal itself (DeiT's ``ops.add(embeddings,
    self.position_embedding)``), the same for every example (its batch axis, if any, of size 1): drawn like
    every embedding table (`rules.linear.embedding_rule`, keras-hub's PositionEmbedding), entries with
    variance `signal_variance`, so the sum is token plus position as in BERT and GPT-2; added to the output
    of a projection (DeiT's patch convolution, `m_tensor`: `provenance.projection_behind`), a per-position
    bias of it, with variance `provenance.POSITION_BIAS_STD`^2 times that (`linear.position_bias`)."""
    out_shape = ctx.node.outputs[0].shape
    shape = tuple(c.shape)
    if len(shape) < len(out_shape) or (len(shape) == len(out_shape) and shape[0] == 1):
        var = ctx.signal_variance
        if m_tensor is not None and projection_behind(m_tensor) is not None:
            var *= position_bias(ctx, own_output=False)
        ctx.weight_scale = var
        table = ctx.draw(c, var).astype(np.float64).reshape(-1, shape[-1])
        # As keras-hub's PositionEmbedding (`rules.keras_hub_layers.position_embedding_rule`): per channel,
        # the table's mean and its variance over positions, which averaging over positions (attention,
        # pooling) shrinks like a fluctuation, not a fixed offset of the channel.
        return Moments.from_channels(table.mean(axis=0), table.var(axis=0))
    return None


@BUILTIN.rule(np_ops.Add)
def add_op_rule(ctx):
    a, b, ma, mb = _binary(ctx)
    if ma and mb:
        return add_moments([a, b])
    m, c = (a, b) if ma else (b, a)
    if ctx.raw_table(c):
        tensors = ctx.node.input_tensors
        table = _draw_additive_table(ctx, c, tensors[0] if len(tensors) == 1 else None)
        if table is not None:
            return add_moments([m, table])
    masked = _additive_mask(ctx, m, c)
    if masked is not None:
        return masked
    c1, c2 = _constant_stats(ctx, c)
    cvar = max(c2 - c1 * c1, 0.0)
    if cvar == 0.0:
        return m.scaled(1.0, c1)
    return Moments(m.mean + c1, m.var + cvar, m.between + cvar)


def _is_own_row_max(tensor, of) -> bool:
    """Whether `tensor` is ``max(of, axis=-1, keepdims=True)`` (through stop_gradient and casts): the shift a
    softmax is stabilized by (``x - stop_gradient(max(x))``, keras-hub's GPT-OSS attention)."""
    for _ in range(4):
        op, node = producer(tensor)
        if op is None or not node.input_tensors:
            return False
        if isinstance(op, (core_ops.StopGradient, core_ops.Cast)):
            tensor = node.input_tensors[0]
            continue
        axis = getattr(op, "axis", None)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        rank = len(of.shape)
        return (isinstance(op, np_ops.Max) and bool(getattr(op, "keepdims", False)) and axis in (-1, rank - 1)
                and node.input_tensors[0] is of)
    return False


@BUILTIN.rule(np_ops.Subtract)
def subtract_op_rule(ctx):
    a, b, ma, mb = _binary(ctx)
    if ma and mb:
        tensors = ctx.node.input_tensors
        if len(tensors) == 2 and _is_own_row_max(tensors[1], tensors[0]):
            # x - max over x's own last axis: every entry of a row moves by the same amount, so the spread
            # within the row (what a softmax after it reads) is x's; not the variance of two independent terms
            out = a.scaled(1.0, -b.mean)
            if getattr(a, "visible", None) is not None:
                out.visible = a.visible
            return out
        return Moments(a.mean - b.mean, a.var + b.var)
    c1, c2 = _constant_stats(ctx, b if ma else a)
    m = a if ma else b
    cvar = max(c2 - c1 * c1, 0.0)
    return Moments(m.mean - c1, m.var + cvar) if ma else Moments(c1 - m.mean, m.var + cvar)


@BUILTIN.rule(np_ops.Multiply)
def multiply_op_rule(ctx):
    a, b, ma, mb = _binary(ctx)
    if ma and mb:
        hit = rms_normalized(ctx.node)  # x * rsqrt(mean(x^2) + eps): one normalization, not two factors
        if hit is not None:
            return rms_normalized_moments(ctx.args[hit[0]], hit[1])
        return multiply_signals(ctx, [a, b], ctx.input_shapes)
    m, c = (a, b) if ma else (b, a)
    c1, c2 = _constant_stats(ctx, c)
    if c2 - c1 * c1 <= 1e-15 * max(c2, 1.0):
        return m.scaled(c1)
    return Moments.from_second(m.mean * c1, m.second * c2, m.between * c2 + m.mean**2 * max(c2 - c1 * c1, 0.0))


def _divide_rule(ctx):
    a, b, ma, mb = _binary(ctx)
    if ma and mb:
        hit = rms_normalized(ctx.node)  # x / sqrt(mean(x^2) + eps)
        if hit is not None:
            return rms_normalized_moments(a, hit[1])
    if ma and not mb:
        arr = _constant_array(ctx, b)
        inv = 1.0 / arr
        return Moments.from_second(a.mean * float(inv.mean()), a.second * float(np.mean(inv * inv)))
    return ctx.probe()


BUILTIN.rule(np_ops.Divide, _divide_rule)
BUILTIN.rule(np_ops.TrueDivide, _divide_rule)


@BUILTIN.rule(np_ops.Power)
def power_rule(ctx):
    a, b, ma, mb = _binary(ctx)
    if ma and not mb and isinstance(b, (int, float)):
        p = float(b)
        if p == int(p) and p >= 0:
            return elementwise_moments(lambda x: np.power(x, p), a, ())
    return ctx.probe()


def _from_softmax(tensor) -> bool:
    """Whether a traced tensor is a softmax's output (through dropout and casts): attention weights."""
    return softmax_behind(tensor) is not None


@BUILTIN.rule(np_ops.Matmul)
def matmul_rule(ctx):
    """Two signals: n independent products (mean n mu_a mu_b, variance n (E[a^2] E[b^2] - mu_a^2 mu_b^2)).
    Attention weights (a softmax's output) times values are not independent terms: the weights of a row sum
    to 1, so the values' shared part passes whole (`attended_values`, as for the einsum of Llama; MiT's
    attention output was 2.9x the independent-terms prediction); values shared across positions mark it an
    estimate there."""
    a, b, ma, mb = _binary(ctx)
    if ma and mb:
        n = ctx.node.input_tensors[0].shape[-1]
        if _from_softmax(ctx.node.input_tensors[0]) and not _from_softmax(ctx.node.input_tensors[1]):
            return attended_values(ctx, a, b, n, *ctx.node.input_tensors)  # weights @ values: rows sum to 1
        if n is None:
            return ctx.probe()
        if _from_softmax(ctx.node.input_tensors[1]):
            ctx.inexact("values times attention weights (values assumed independent across positions)")
        n = int(n)
        return Moments(n * a.mean * b.mean, n * (a.second * b.second - a.mean**2 * b.mean**2))
    if ma:
        w = _constant_array(ctx, b)
        if w.ndim == 2:
            return linear_output(a, w[None], [1.0])[0]
    return ctx.probe()


# -- reductions -----------------------------------------------------------------------------------


def _reduced_count(ctx, axis):
    shape = ctx.input_shapes[0]
    axes = range(len(shape)) if axis is None else (axis if isinstance(axis, (list, tuple)) else (axis,))
    axes = [a for a in axes if not (axis is None and a == 0)]
    dims = [shape[a] for a in axes]
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims)) if dims else 1


def _spatial_mean_rank(ctx, axis):
    """The number of spatial axes when `axis` is exactly the spatial axes of a channels-last feature map
    (``ops.mean(x, axis=(1, 2), keepdims=True)``: keras-hub's squeeze-and-excitation), else None."""
    shape = ctx.input_shapes[0]
    if axis is None or len(shape) < 3:
        return None
    axes = sorted(a % len(shape) for a in (axis if isinstance(axis, (list, tuple)) else (axis,)))
    rank = len(shape) - 2
    return rank if rank <= 3 and axes == list(range(1, rank + 1)) else None


@BUILTIN.rule(np_ops.Mean)
def mean_op_rule(ctx):
    """A mean over a feature map's spatial axes is a global average pooling (`pooling.global_average`:
    per channel, the positions' correlation and the per-example shared part); any other mean of n entries
    shrinks the within part by n."""
    rank = _spatial_mean_rank(ctx, ctx.op.axis)
    if rank is not None and ctx.input.ch_mean is not None:
        return global_average(ctx, rank)
    n = _reduced_count(ctx, ctx.op.axis)
    if n is None:
        return ctx.probe()
    m = ctx.input
    return Moments(m.mean, m.between + m.within / n, m.between)


@BUILTIN.rule(np_ops.Sum)
def sum_op_rule(ctx):
    n = _reduced_count(ctx, ctx.op.axis)
    if n is None:
        return ctx.probe()
    m = ctx.input
    return Moments(n * m.mean, n * n * m.between + n * m.within, n * n * m.between)


@BUILTIN.rule(np_ops.Max)
def max_op_rule(ctx):
    n = _reduced_count(ctx, ctx.op.axis)
    if n is None:
        return ctx.probe()
    return max_of_gaussians(n, ctx.input)


@BUILTIN.rule(nn_ops.Softmax)
def softmax_op_rule(ctx):
    """Softmax of i.i.d. logits; logits with a known additive mask (`Moments.visible`) over each row's
    visible entries (`masked_softmax_moments`); logits with per-class means over the last axis class by class
    (`softmax_per_class_moments`)."""
    n = _reduced_count(ctx, ctx.op.axis)
    axis = ctx.op.axis
    last = axis in (-1, len(ctx.node.input_tensors[0].shape) - 1)
    classwise = last and per_class(ctx.input, n)
    mark_wide_logits(ctx, ctx.input, classwise)
    if classwise:
        return softmax_per_class_moments(ctx.input)
    visible = getattr(ctx.input, "visible", None)
    if n and visible is not None and last and visible.shape[-1] == n:
        ctx.inexact(MASKED_WEIGHTS)
        return masked_softmax_moments(ctx.input, visible)
    return softmax_moments(ctx.input, n) if n else ctx.probe()


@BUILTIN.rule(nn_ops.LogSoftmax)
def log_softmax_op_rule(ctx):
    n = _reduced_count(ctx, ctx.op.axis)
    if ctx.op.axis in (-1, len(ctx.node.input_tensors[0].shape) - 1) and per_class(ctx.input, n):
        return log_softmax_per_class_moments(ctx.input)
    return log_softmax_moments(ctx.input, n) if n else ctx.probe()


# -- structure ------------------------------------------------------------------------------------


def _same_for_every_output(ctx):
    n = len(ctx.node.outputs)
    return ctx.input if n == 1 else [ctx.input] * n


def _pooled_for_every_output(ctx):
    """Value-copying ops that may move the last axis: only the pooled moments carry over."""
    n = len(ctx.node.outputs)
    m = ctx.input.pooled()
    return m if n == 1 else [m] * n


def _row_major_reshape(ctx):
    out = relayout(ctx.input, tuple(ctx.node.input_tensors[0].shape), tuple(ctx.node.outputs[0].shape))
    return windows.at_reshape(ctx, out) if isinstance(ctx.op, np_ops.Reshape) else out


for _cls in (np_ops.Real, core_ops.Cast, core_ops.StopGradient, core_ops.ConvertToTensor):
    BUILTIN.rule(_cls, _same_for_every_output)


@BUILTIN.rule(np_ops.Roll)
def roll_rule(ctx):
    """Entries moved cyclically: the same moments; window-local parts move with the map (`rules.windows`)."""
    return windows.at_roll(ctx, ctx.input)


for _cls in (np_ops.Transpose, np_ops.GetItem, np_ops.Moveaxis, np_ops.Swapaxes, np_ops.Repeat,
             np_ops.BroadcastTo, core_ops.Unstack, core_ops.Slice):
    BUILTIN.rule(_cls, _pooled_for_every_output)
for _cls in (np_ops.Reshape, np_ops.ExpandDims, np_ops.Squeeze, np_ops.Ravel, np_ops.Tile):
    BUILTIN.rule(_cls, _row_major_reshape)


@BUILTIN.rule(np_ops.Pad)
def pad_op_rule(ctx):
    """Constant padding: a fraction f = (input entries) / (output entries) of the output is the input, the
    rest the constant c: mean f mu + (1 - f) c, second moment f E[x^2] + (1 - f) c^2 (per channel when
    the last axis is not padded). Reflect/symmetric padding copies entries: the input's moments."""
    op = ctx.op
    if getattr(op, "mode", "constant") != "constant":
        return ctx.input.pooled()
    c = (ctx.kwargs or {}).get("constant_values")
    if c is None and len(ctx.args) > 1:
        c = ctx.args[1]
    if isinstance(c, Moments):
        return ctx.probe()
    c = 0.0 if c is None else float(np.asarray(c))
    n_in = [d for d in ctx.node.input_tensors[0].shape[1:]]
    n_out = [d for d in ctx.node.outputs[0].shape[1:]]
    if any(d is None for d in n_in + n_out):
        widths = np.asarray(op.pad_width, dtype=np.int64).reshape(-1, 2)[1:]
        n_in = [ctx.probe_length if d is None else d for d in n_in]
        n_out = [a + int(w.sum()) for a, w in zip(n_in, widths)] if len(widths) == len(n_in) else None
        if n_out is None:
            return ctx.probe()
    f = float(np.prod(n_in)) / float(np.prod(n_out))
    m = ctx.input
    if f == 1.0:
        return m  # nothing padded (Swin's patch merging pads only odd maps): the input, offsets and all
    if m.ch_mean is not None and n_in[-1] == n_out[-1]:
        return Moments.from_channel_second(f * m.ch_mean + (1 - f) * c, f * (m.ch_var + m.ch_mean**2) + (1 - f) * c * c)
    # the channel offsets (`between`) fill a fraction f of the entries: their per-channel means f d_c vary by f^2 B
    return Moments.from_second(f * m.mean + (1 - f) * c, f * m.second + (1 - f) * c * c, f * f * m.between)


@BUILTIN.rule(np_ops.Split)
def split_op_rule(ctx):
    m = ctx.input
    shape = tuple(ctx.node.input_tensors[0].shape)
    axis = ctx.op.axis
    n = len(ctx.node.outputs)
    if m.ch_mean is not None and (axis == -1 or axis == len(shape) - 1):
        bounds = np.cumsum([0] + [int(kt.shape[-1]) for kt in ctx.node.outputs])
        return [Moments.from_channels(m.ch_mean[a:b], m.ch_var[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return m if n == 1 else [m] * n


@BUILTIN.rule(np_ops.Concatenate)
def concatenate_op_rule(ctx):
    axis = ctx.op.axis
    sizes = [kt.shape[axis] for kt in ctx.node.input_tensors]
    ndim = len(ctx.node.input_tensors[0].shape)
    last = axis == -1 or axis == ndim - 1
    out = concat_moments(ctx.inputs, sizes, last)
    masks = [getattr(m, "visible", None) for m in ctx.inputs]
    if last and len(ctx.inputs) == len(sizes) and sum(v is not None for v in masks) == 1 \
            and all(isinstance(n, int) for n in sizes):
        # masked logits joined by always-visible columns (GPT-OSS's attention sinks): the mask, those columns seen
        rows = next(v for v in masks if v is not None).shape[0]
        out.visible = np.concatenate([v if v is not None else np.ones((rows, n), dtype=bool)
                                      for v, n in zip(masks, sizes)], axis=1)
    return out


@BUILTIN.rule(np_ops.Stack)
def stack_op_rule(ctx):
    return concat_moments(ctx.inputs, [1] * len(ctx.inputs))


def _probe_rule(ctx):
    return ctx.probe()


BUILTIN.rule(nn_ops.DotProductAttention, _probe_rule)


def _where_mask(ctx, cond, x1, x2):
    """``where(mask, logits, -1e9)`` (or the fill first): logits masked as an additive mask masks them
    (`_additive_mask`): the signal's moments, with `Moments.visible` the rows of the last axis where the
    logits stand, for the softmax after it; None when neither branch is such a fill (keras-hub's GPT-OSS
    masks its attention scores so: taken as a mixture with the fill, its logits had variance 2.5e17)."""
    signal_first = isinstance(x1, Moments) and not isinstance(x2, Moments)
    if not signal_first and not (isinstance(x2, Moments) and not isinstance(x1, Moments)):
        return None
    m, fill = (x1, x2) if signal_first else (x2, x1)
    arr = _constant_array(ctx, fill)
    if arr.size == 0 or float(arr.max()) > MASK_LOGIT:
        return None
    out_shape = tuple(ctx.node.outputs[0].shape)
    size = out_shape[-1] if out_shape else None
    if size is None or cond.ndim < 1 or cond.shape[-1] not in (1, size):
        return None
    shown = cond if signal_first else ~cond
    shown = np.broadcast_to(shown, shown.shape[:-1] + (size,)).reshape(-1, size)
    if not shown.any():
        return None
    out = m.scaled(1.0)
    out.visible = shown
    return out


@BUILTIN.rule(np_ops.Where)
def where_op_rule(ctx):
    """``where(condition, x1, x2)`` with a known condition (`Moments.const`: Gemma zeroes the outputs of
    queries that see no key, ``where(all(mask == 0), 0, x)``): x1 where it holds, x2 elsewhere, mixed by
    the fraction of positions; otherwise measured on the probe."""
    args = list(ctx.args)
    cond = args[0] if args else None
    const = getattr(cond, "const", None) if isinstance(cond, Moments) else None
    if const is None or len(args) != 3:
        return ctx.probe()
    masked = _where_mask(ctx, np.asarray(const) != 0, args[1], args[2])
    if masked is not None:
        return masked
    frac = float(np.mean(np.asarray(const) != 0))
    parts = [a if isinstance(a, Moments) else Moments.constant(_constant_array(ctx, a)) for a in args[1:]]
    if frac == 1.0:
        return parts[0]
    if frac == 0.0:
        return parts[1]
    return mix([(frac, parts[0]), (1.0 - frac, parts[1])])


#: Share of the values' variance above which their shared part makes attended values an estimate
#: (`rules.attention.SHARED_LIMIT`).
ATTENDED_SHARED_LIMIT = 0.05


@BUILTIN.rule(np_ops.Einsum)
def einsum_op_rule(ctx):
    """Attention weights (a softmax's output, masked or not) times values, ``einsum("buqk,bkuh->bquh", a, v)``
    (Llama, Gemma): query i's output is sum_k a_ik v_k = c + sum_k a_ik e_k for values c + e_k (c the part
    shared by all positions, variance B = ``between``; e_k independent, variance W), so its mean is E[v] and
    its variance B + W T E[a^2] (T E[a^2] = E[sum_k a_ik^2], from the softmax's own moments: a causal mask
    is in them); of it B + W / T is common to all query positions (`attended_values`: an estimate for the
    default wrap; persistent where values share more than `ATTENDED_SHARED_LIMIT` of their variance, as in
    `rules.attention`). Any other einsum is measured on the probe."""
    operands = list(ctx.args[1:]) if isinstance(ctx.args[0], str) else list(ctx.args)
    args = [a for a in operands if isinstance(a, Moments)]
    tensors = ctx.node.input_tensors
    subscripts = getattr(ctx.op, "subscripts", None)
    if len(operands) == 2 and len(args) == 1 and isinstance(subscripts, str) and "..." not in subscripts:
        weight = next(o for o in operands if not isinstance(o, Moments))
        if ctx.raw_table(weight):
            out = raw_weight_einsum(ctx, subscripts, operands.index(weight), args[0], weight)
            if out is not None:
                return out
    if len(args) != 2 or len(tensors) != 2 or not isinstance(subscripts, str) or "->" not in subscripts \
            or "..." in subscripts:
        return ctx.probe()
    lhs, out = subscripts.replace(" ", "").split("->")
    sa, sb = lhs.split(",")
    weights = [_from_softmax(t) for t in tensors]
    if weights.count(True) != 1:
        return ctx.probe()
    i = weights.index(True)
    sw, sv = (sa, sb) if i == 0 else (sb, sa)
    a, v = args[i], args[1 - i]
    contracted = [c for c in sw if c in sv and c not in out]
    if len(contracted) != 1 or sw[-1] != contracted[0]:
        return ctx.probe()
    return attended_values(ctx, a, v, tensors[i].shape[-1], tensors[i], tensors[1 - i])


def raw_weight_einsum(ctx, subscripts: str, weight_index: int, x: Moments, weight):
    """An einsum of the signal with a layer's own weight that no layer rule draws (`RuleContext.raw_table`):
    a linear map, drawn as AutoInit draws a Dense kernel. Mixture-of-experts layers hold their experts' kernels
    so (keras-hub's Mixtral, Qwen-MoE, GPT-OSS: ``einsum("th,ehm->etm", x, self.gate_kernel)``). With F the
    product of the contracted axes' sizes, the weight gets variance ``signal_variance / (F E[x^2])``; the output
    unit j (the weight's other axes) then has mean sum_c mu_c w_cj and variance sum_c v_c w_cj^2 from the drawn
    weight (exact for independent input channels), and the output channel (the last output axis) mixes the
    units that share it (one per expert); the drawn weight is then rescaled so that this draw's output
    variance is the target (`linear.exact_for_draw`). Axes the signal and the weight share without contracting (the
    experts of ``einsum("eti,eih->eth", h, self.down_kernel)``) read the signal's pooled moments. None when
    the subscripts are not of that form (the caller measures the op on the probe)."""
    lhs, out = subscripts.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    sw, sx = parts[weight_index], parts[1 - weight_index]
    contracted = [c for c in sw if c in sx and c not in out]
    others = [c for c in sw if c not in contracted]
    shape = tuple(int(d) for d in weight.shape)
    if not contracted or not others or len(set(sw)) != len(sw) or len(shape) != len(sw) or out[-1] != others[-1] \
            or x.second <= 0.0:
        return None
    dims = dict(zip(sw, shape))
    fan_in = int(np.prod([dims[c] for c in contracted]))
    var = ctx.signal_variance / (fan_in * x.second)
    ctx.weight_scale = var
    w = ctx.draw(weight, var)
    w = np.transpose(w, [sw.index(c) for c in contracted + others]).reshape(fan_in, -1).astype(np.float64)
    if contracted == [sx[-1]] and x.ch_mean is not None and x.channels == fan_in:
        mu, v = np.asarray(x.ch_mean, dtype=np.float64), np.asarray(x.ch_var, dtype=np.float64)
    else:  # the contracted axes are not (only) the signal's channels: its pooled moments
        mu, v = np.full(fan_in, float(x.mean)), np.full(fan_in, float(x.var))
    unit_mean = mu @ w
    unit_second = v @ (w * w) + unit_mean**2
    channels = dims[out[-1]]
    result = Moments.from_channel_second(unit_mean.reshape(-1, channels).mean(axis=0),
                                         unit_second.reshape(-1, channels).mean(axis=0))
    # As `linear.exact_for_draw` for a Dense kernel: the output is linear in the weight
    if ctx.exact_draw and ctx.fit_inputs is ctx.inputs and ctx.drew(weight):
        result = rescale_to_target(ctx, weight, result)
    return result


def attended_values(ctx, a: Moments, v: Moments, keys, weights_tensor=None, values_tensor=None):
    """sum_k a_k v_k for softmax weights `a` (their own moments: a mask is in them) over `keys` values `v`
    (see `einsum_op_rule`). Marked an estimate either way: the moments cannot show a part of the values
    that an example's positions share (a per-example component), which passes whole as well; the default
    wrap calibrates the layers after it, as it did when this was measured on the probe. Self-attention whose
    projections are found behind the traced `weights_tensor` and `values_tensor` (`rules.raw_attention`) gets
    the coupling of each key's logit with its own value, as a MultiHeadAttention layer does."""
    keys = ctx.probe_length if keys is None else int(keys)
    if v.between > ATTENDED_SHARED_LIMIT * v.var:
        ctx.inexact(f"values share {v.between / max(v.var, 1e-300):.0%} of their variance across positions "
                    "(per-unit offsets and per-example parts are not told apart)", persistent=True)
    else:  # a part shared by an example's positions that the moments do not show passes whole too
        ctx.inexact("attention weights times values (values' parts shared across positions not all known)")
    within = v.within
    out = windows.attended(v, Moments(v.mean, v.between + within * keys * a.second, v.between + within / keys))
    if weights_tensor is not None and values_tensor is not None:
        out = raw_attention.coupled_attended(ctx, weights_tensor, values_tensor, out, a, v)
    return out

# Comparisons and logical reductions make masks (Gemma's "no attended tokens": all(equal(mask, 0))): boolean
# values that carry no signal scale; measured on the probe like `where`, which consumes them (no warning).
for _cls in (np_ops.Equal, np_ops.NotEqual, np_ops.Greater, np_ops.GreaterEqual, np_ops.Less, np_ops.LessEqual,
             np_ops.LogicalAnd, np_ops.LogicalOr, np_ops.LogicalNot, np_ops.LogicalXor, np_ops.All, np_ops.Any):
    BUILTIN.rule(_cls, _probe_rule)


@BUILTIN.rule(np_ops.ZerosLike)
def zeros_like_rule(ctx):
    return Moments(0.0, 0.0)


@BUILTIN.rule(np_ops.OnesLike)
def ones_like_rule(ctx):
    return Moments(1.0, 0.0)
