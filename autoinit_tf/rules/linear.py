"""Rules for weighted linear layers: Dense, EinsumDense, Conv*, Conv*Transpose, DepthwiseConv*,
SeparableConv*, Embedding, SpectralNormalization.

Every kernel is viewed as W[t, c, j]: tap t of the receptive field, input channel c, output unit j.
With input entries of mean mu and variance v, and p_t the fraction of output positions where tap t
falls inside the (unpadded) input, the output of unit j has, averaged over positions,

    m_j = mu * sum_t p_t sum_c W[t,c,j] + b_j,          v_j = v * sum_t p_t sum_c W[t,c,j]^2,

and the layer output (all units and positions) has mean avg_j m_j and variance avg_j v_j + var_j m_j.
The effective fan-in is fan_eff = C_in * sum_t p_t (exact for 'same' padding borders, strides and
transposed convolutions), and the kernel is drawn with

    Var(W) = signal_variance / (fan_eff * E[x^2]),

so that the pre-activation second moment is `signal_variance` (AutoInit). A fused activation is then
applied by the activation rule. Existing biases are kept and enter m_j.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from autoinit_tf.moments import Moments
from autoinit_tf.rules.activation import axis_size, function_moments
from autoinit_tf.rules.registry import register_rule


def linear_output(m: Moments, w3, tap_frac, bias=None):
    """Output moments of a linear map with kernel w3[t, c, j] (see the module docstring).

    Returns (Moments, within, between): the total moments, the average within-unit variance and the
    variance of unit means.
    """
    w3 = np.asarray(w3, dtype=np.float64)
    p = np.asarray(tap_frac, dtype=np.float64).reshape(-1, 1, 1)
    colsum = np.sum(w3 * p, axis=(0, 1))
    colsq = np.sum(w3 * w3 * p, axis=(0, 1))
    means = m.mean * colsum
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        means = means + (b if b.size == means.size else float(b.mean()))
    within = float(m.var * colsq.mean())
    between = float(means.var())
    return Moments(float(means.mean()), within + between), within, between


def fused_activation(layer, pre: Moments, out_shape):
    act = getattr(layer, "activation", None)
    if act is None:
        return pre
    return function_moments(act, pre, size=axis_size(out_shape, -1))


# -- receptive-field geometry --------------------------------------------------------------------


def _conv_tap_counts(n, k, stride, dilation, padding):
    """Fraction of output positions where each of the k taps reads a real (not padded) input."""
    if n is None:
        return np.ones(k)
    eff = (k - 1) * dilation + 1
    if padding == "valid":
        return np.ones(k)
    if padding == "causal":
        out = int(math.ceil(n / stride))
        pad_left = eff - 1
    else:  # same
        out = int(math.ceil(n / stride))
        pad_total = max((out - 1) * stride + eff - n, 0)
        pad_left = pad_total // 2
    o = np.arange(out)[:, None]
    t = np.arange(k)[None, :]
    i = o * stride + t * dilation - pad_left
    valid = (i >= 0) & (i < n)
    return valid.mean(axis=0)


def _transpose_tap_counts(n, k, stride, dilation, padding, out_len):
    """Fraction of output positions of a transposed convolution that each tap writes to."""
    if n is None or out_len is None:
        return np.full(k, 1.0 / stride)
    full = (n - 1) * stride + (k - 1) * dilation + 1
    crop = max(full - out_len, 0) // 2 if padding == "same" else 0
    i = np.arange(n)[:, None]
    t = np.arange(k)[None, :]
    pos = i * stride + t * dilation - crop
    hits = ((pos >= 0) & (pos < out_len)).sum(axis=0)
    return hits / float(out_len)


def _spatial(shape, data_format, rank):
    if shape is None:
        return [None] * rank
    if data_format == "channels_first":
        return list(shape[2 : 2 + rank])
    return list(shape[1 : 1 + rank])


def _conv_tap_fraction(layer, in_shape, rank):
    dims = _spatial(in_shape, getattr(layer, "data_format", "channels_last"), rank)
    per_dim = [
        _conv_tap_counts(n, k, s, d, layer.padding)
        for n, k, s, d in zip(dims, layer.kernel_size, layer.strides, layer.dilation_rate)
    ]
    frac = per_dim[0]
    for pd in per_dim[1:]:
        frac = np.multiply.outer(frac, pd)
    return np.asarray(frac).reshape(-1)


def _transpose_tap_fraction(layer, in_shape, out_shape, rank):
    fmt = getattr(layer, "data_format", "channels_last")
    dims = _spatial(in_shape, fmt, rank)
    outs = _spatial(out_shape, fmt, rank)
    per_dim = [
        _transpose_tap_counts(n, k, s, d, layer.padding, o)
        for n, k, s, d, o in zip(dims, layer.kernel_size, layer.strides, layer.dilation_rate, outs)
    ]
    frac = per_dim[0]
    for pd in per_dim[1:]:
        frac = np.multiply.outer(frac, pd)
    return np.asarray(frac).reshape(-1)


# -- the rules ----------------------------------------------------------------------------------


def _draw_kernel(ctx, variable, fan_eff, target=None):
    s = ctx.fit_input.second
    target = ctx.signal_variance if target is None else target
    var = target / (fan_eff * s) if fan_eff > 0 and s > 0 else target
    ctx.weight_scale = var
    return ctx.draw(variable, var).astype(np.float64)


def _bias(ctx, layer):
    b = getattr(layer, "bias", None)
    return None if b is None else ctx.value(b)


def _dense_pre(ctx):
    layer = ctx.layer
    fan_in = int(layer.kernel.shape[0])
    w = _draw_kernel(ctx, layer.kernel, fan_in)
    pre, _, _ = linear_output(ctx.input, w.reshape(1, fan_in, -1), [1.0], _bias(ctx, layer))
    return pre


def _conv_pre(ctx):
    layer = ctx.layer
    rank = layer.rank
    k = layer.kernel
    kshape = tuple(k.shape)
    frac = _conv_tap_fraction(layer, ctx.input_shapes[0], rank)
    cin = kshape[-2]
    fan_eff = cin * float(frac.sum())
    w = _draw_kernel(ctx, k, fan_eff)
    pre, _, _ = linear_output(ctx.input, w.reshape(-1, cin, kshape[-1]), frac, _bias(ctx, layer))
    return pre


def _conv_transpose_pre(ctx):
    layer = ctx.layer
    rank = layer.rank
    k = layer.kernel
    kshape = tuple(k.shape)  # (*kernel_size, filters, in_channels)
    frac = _transpose_tap_fraction(layer, ctx.input_shapes[0], ctx.output_shapes[0], rank)
    cin = kshape[-1]
    fan_eff = cin * float(frac.sum())
    w = _draw_kernel(ctx, k, fan_eff)
    w3 = np.swapaxes(w.reshape(-1, kshape[-2], cin), 1, 2)
    pre, _, _ = linear_output(ctx.input, w3, frac, _bias(ctx, layer))
    return pre


def _depthwise_pre(ctx, layer, kernel, m, target=None):
    """Depthwise stage: each output channel sees the taps of ONE input channel (fan-in = taps)."""
    kshape = tuple(kernel.shape)  # (*kernel_size, in_channels, depth_multiplier)
    frac = _conv_tap_fraction(layer, ctx.input_shapes[0], layer.rank)
    fan_eff = float(frac.sum())
    w = _draw_kernel(ctx, kernel, fan_eff, target)
    taps = int(np.prod(kshape[:-2]))
    w3 = w.reshape(taps, 1, kshape[-2] * kshape[-1])
    return w3, frac


def _depthwise_conv_pre(ctx):
    layer = ctx.layer
    w3, frac = _depthwise_pre(ctx, layer, layer.kernel, ctx.input)
    pre, _, _ = linear_output(ctx.input, w3, frac, _bias(ctx, layer))
    return pre


def _separable_pre(ctx):
    """Depthwise kernel to keep the second moment at `signal_variance`, then the pointwise kernel."""
    layer = ctx.layer
    w3, frac = _depthwise_pre(ctx, layer, layer.depthwise_kernel, ctx.input)
    mid, _, _ = linear_output(ctx.input, w3, frac)
    pk = layer.pointwise_kernel
    cmid = int(pk.shape[-2])
    var = ctx.signal_variance / (cmid * mid.second)
    w = ctx.draw(pk, var).astype(np.float64)
    ctx.weight_scale = var
    pre, _, _ = linear_output(mid, w.reshape(1, cmid, -1), [1.0], _bias(ctx, layer))
    return pre


def _einsum_parts(equation):
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    return inp, ker, out


def _einsum_dense_pre(ctx):
    """Fan-in is the product of the kernel axes contracted with the input (absent from the output)."""
    layer = ctx.layer
    inp, ker, out = _einsum_parts(layer.equation.replace(" ", ""))
    kernel = layer.kernel
    kshape = tuple(kernel.shape)
    if "." in ker:
        ker = ker.replace("...", "")
    contracted = [i for i, ch in enumerate(ker) if ch in inp and ch not in out]
    kept = [i for i in range(len(ker)) if i not in contracted]
    fan_in = int(np.prod([kshape[i] for i in contracted])) if contracted else 1
    w = _draw_kernel(ctx, kernel, fan_in)
    w2 = np.transpose(w, contracted + kept).reshape(fan_in, -1)
    pre, _, _ = linear_output(ctx.input, w2[None], [1.0], _bias(ctx, layer))
    return pre


# Pre-activation rules by layer class; the registered rule adds the fused activation.
PREACTIVATION_RULES = {
    keras.layers.Dense: _dense_pre,
    keras.layers.EinsumDense: _einsum_dense_pre,
    keras.layers.Conv1D: _conv_pre,
    keras.layers.Conv2D: _conv_pre,
    keras.layers.Conv3D: _conv_pre,
    keras.layers.Conv1DTranspose: _conv_transpose_pre,
    keras.layers.Conv2DTranspose: _conv_transpose_pre,
    keras.layers.Conv3DTranspose: _conv_transpose_pre,
    keras.layers.DepthwiseConv1D: _depthwise_conv_pre,
    keras.layers.DepthwiseConv2D: _depthwise_conv_pre,
    keras.layers.SeparableConv1D: _separable_pre,
    keras.layers.SeparableConv2D: _separable_pre,
}


def preactivation_rule_for(layer):
    for cls in type(layer).__mro__:
        if cls in PREACTIVATION_RULES:
            return PREACTIVATION_RULES[cls]
    return None


def weighted_linear_rule(ctx):
    """Draw the kernel(s) for the target pre-activation variance, then apply the fused activation."""
    pre = preactivation_rule_for(ctx.layer)(ctx)
    return fused_activation(ctx.layer, pre, ctx.output_shapes[0])


for _cls in PREACTIVATION_RULES:
    register_rule(_cls, weighted_linear_rule)


@register_rule(keras.layers.Embedding)
def embedding_rule(ctx):
    """The output entries are table entries: drawn with variance `signal_variance`, mean 0."""
    layer = ctx.layer
    table = layer.embeddings
    ctx.weight_scale = ctx.signal_variance
    w = ctx.draw(table, ctx.signal_variance).astype(np.float64)
    return Moments(float(w.mean()), float(w.var()))


@register_rule(keras.layers.SpectralNormalization)
def spectral_normalization_rule(ctx):
    """The wrapped kernel is divided by its largest singular value in training mode.

    The wrapped layer's pre-activation rule draws the kernel; the output is that of W / sigma_max(W).
    """
    from autoinit_tf.rules.registry import RuleContext

    inner = ctx.layer.layer
    pre_rule = preactivation_rule_for(inner)
    if pre_rule is None:
        return ctx.probe()
    sub = RuleContext(inner, ctx.node, ctx.inputs, ctx.args, ctx.kwargs, ctx.fit_inputs, ctx._engine)
    pre_rule(sub)
    w = ctx.value(inner.kernel).astype(np.float64)
    sigma = float(np.linalg.norm(w.reshape(-1, w.shape[-1]), 2))
    ctx.weight_scale = sub.weight_scale
    ctx.note(f"kernel divided by sigma_max = {sigma:.4g} in training")
    if isinstance(inner, keras.layers.Dense):
        taps, w3 = [1.0], (w / sigma)[None]
    else:
        taps = _conv_tap_fraction(inner, ctx.input_shapes[0], inner.rank)
        w3 = (w / sigma).reshape(-1, w.shape[-2], w.shape[-1])
    pre, _, _ = linear_output(ctx.input, w3, taps, _bias(ctx, inner))
    return fused_activation(inner, pre, ctx.output_shapes[0])
