"""Normalization rules, exact in training mode and using the real gamma and beta.

BatchNormalization, LayerNormalization, GroupNormalization: each normalized slice has mean 0 and
variance v / (v + eps); with per-channel gamma_c, beta_c the output over all channels has

    mean = avg_c beta_c,   E[y^2] = avg_c (gamma_c^2 v / (v + eps) + beta_c^2).

RMSNormalization: y = x / sqrt(E[x^2] + eps) * scale, so E[y^2] = avg scale^2 * s / (s + eps)
and mean = avg(scale) * mu / sqrt(s + eps). UnitNormalization over n entries: E[y^2] = 1 / n.
Preprocessing Normalization: y = (x - m_j) / sqrt(var_j); Rescaling: y = scale * x + offset.

BatchNormalization's moving statistics are set to the predicted batch statistics of its input (per channel:
mean_c and the variance over examples and positions), so that inference right after `wrap` normalizes as
training mode does; calibration replaces them by the statistics it measures.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from autoinit_tf.moments import Moments
from autoinit_tf.rules.activation import axis_size
from autoinit_tf.rules import element_maps, shared_part, spatial_correlation
from autoinit_tf.rules.registry import BuiltinTable
from autoinit_tf.rules.rms_pattern import rms_normalized_moments

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

# Batch statistics mix the examples of a batch: DP-SGD refuses these before any probe.
_PER_EXAMPLE = "GroupNormalization (or LayerNormalization)"
BUILTIN.declare(keras.layers.BatchNormalization, mixes_examples=True, advice=_PER_EXAMPLE,
                moving_statistics=lambda layer: (layer.moving_mean, layer.moving_variance, layer.axis))
BUILTIN.declare("SyncBatchNormalization", mixes_examples=True, advice=_PER_EXAMPLE)  # tf.keras models
# Layers that set their output's scale themselves: an inexact prediction of their input does not carry
# past them (`engine`, calibrate="auto").
for _cls in (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization,
             keras.layers.UnitNormalization, getattr(keras.layers, "RMSNormalization", None)):
    if _cls is not None:
        BUILTIN.declare(_cls, normalizes=True)


#: `RuleContext.state` key: the factor a tied LM head after this normalization asked its scale to take
#: (`rules.linear.reversible_embedding_rule`), applied on the walk after the one that asked.
HEAD_SCALE = "scale for the tied head after it"


def scale_variable(layer):
    """The weight a normalization multiplies its normalized output by (LayerNormalization's gamma,
    RMSNormalization's scale), when its output is exactly proportional to it (no beta, or a zero one);
    else None."""
    if isinstance(layer, keras.layers.LayerNormalization) and not getattr(layer, "rms_scaling", False):
        beta = getattr(layer, "beta", None)
        if beta is not None and np.any(keras.ops.convert_to_numpy(beta) != 0):
            return None
        return getattr(layer, "gamma", None)
    rms = getattr(keras.layers, "RMSNormalization", None)
    if rms is not None and isinstance(layer, rms):
        return getattr(layer, "scale", None)
    return None


def apply_head_scale(ctx, layer) -> None:
    """Scale the `scale_variable` of `layer` by the factor a tied LM head asked for (`HEAD_SCALE`), if any."""
    factor = ctx.state.get(HEAD_SCALE)
    variable = None if factor is None else scale_variable(layer)
    if variable is None:
        return
    ctx.assign(variable, ctx.value(variable).astype(np.float64) * factor)
    ctx.note(f"scale x{factor:.4g} for the tied LM head after it (its table is drawn for the embedding's own "
             "output; this puts the logits on target)")


def _affine_over_normalized(ctx, gamma, beta, ratio, kept_between=0.0):
    """gamma * xhat + beta with E[xhat^2] = ratio; `kept_between` of xhat's variance is per-channel."""
    g2 = 1.0 if gamma is None else float(np.mean(np.square(ctx.value(gamma).astype(np.float64))))
    b = np.zeros(1) if beta is None else ctx.value(beta).astype(np.float64)
    mean = float(b.mean())
    second = g2 * ratio + float(np.mean(b * b))
    return Moments.from_second(mean, second, g2 * kept_between + float(b.var()))


def _vec(ctx, variable, n, default):
    if variable is None:
        return np.full(n, default)
    v = ctx.value(variable).astype(np.float64).reshape(-1)
    return v if v.size == n else np.full(n, float(v.mean()))


def _per_channel_affine(ctx, layer, m, center, scale):
    """gamma_c * ((x_c - center_c) / scale_c) + beta_c with channel stats from `m` (last axis)."""
    n = m.channels
    gamma = _vec(ctx, getattr(layer, "gamma", None), n, 1.0)
    beta = _vec(ctx, getattr(layer, "beta", None), n, 0.0)
    return Moments.from_channels(gamma * (m.ch_mean - center) / scale + beta, gamma**2 * m.ch_var / scale**2)


def _last_axis(layer, ndim):
    axis = layer.axis
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return [a % ndim for a in axes] == [ndim - 1]


def set_moving_statistics(ctx, layer, m, per_channel):
    """Record BN's moving mean and variance as the batch statistics its input has in training mode
    (per channel when known, else the pooled ones), so inference right after `wrap` normalizes as
    training does. Frozen layers keep theirs (``ctx.assign``)."""
    mean_var, var_var = getattr(layer, "moving_mean", None), getattr(layer, "moving_variance", None)
    if mean_var is None or var_var is None:
        return
    n = int(np.prod(mean_var.shape))
    if per_channel and m.channels == n:
        mean, var = m.ch_mean, m.ch_var
    else:
        mean, var = np.full(n, m.mean), np.full(n, m.var)
    ctx.assign(mean_var, np.asarray(mean, np.float64).reshape(mean_var.shape))
    ctx.assign(var_var, np.maximum(np.asarray(var, np.float64), 0.0).reshape(var_var.shape))


def set_revisited_affine(ctx, layer):
    """With ``ctx.bn_gamma`` (``wrap(bn_gamma=...)``): gamma = bn_gamma and beta = 0 (Davis & Frank 2022);
    the rule then propagates with these values."""
    if ctx.bn_gamma is None:
        return
    if getattr(layer, "gamma", None) is not None:
        ctx.assign(layer.gamma, np.full(tuple(layer.gamma.shape), ctx.bn_gamma))
    if getattr(layer, "beta", None) is not None:
        ctx.assign(layer.beta, np.zeros(tuple(layer.beta.shape)))


@BUILTIN.rule(keras.layers.BatchNormalization)
def batch_normalization_rule(ctx):
    layer = ctx.layer
    m = ctx.input
    set_revisited_affine(ctx, layer)
    per_channel = m.ch_mean is not None and _last_axis(layer, len(ctx.input_shapes[0]))
    set_moving_statistics(ctx, layer, m, per_channel)
    if per_channel:
        # Training mode: each channel is normalized by its own batch statistics (exact per channel).
        gamma = None if layer.gamma is None else ctx.value(layer.gamma)
        if m.el_mean is not None:
            beta = None if layer.beta is None else ctx.value(layer.beta)
            out = element_maps.batch_norm_maps(m, gamma, beta, layer.epsilon)
        else:
            out = _per_channel_affine(ctx, layer, m, m.ch_mean, np.sqrt(m.ch_var + layer.epsilon))
        out = shared_part.through_batch_norm(out, m, gamma, layer.epsilon)
        return spatial_correlation.unchanged(out, m)
    v = m.var
    ratio = v / (v + layer.epsilon) if v > 0 else 0.0
    return _affine_over_normalized(ctx, layer.gamma, layer.beta, ratio)


@BUILTIN.rule(keras.layers.LayerNormalization)
def layer_normalization_rule(ctx):
    layer = ctx.layer
    m = ctx.input
    apply_head_scale(ctx, layer)
    if getattr(layer, "rms_scaling", False):
        s = m.second
        g2 = float(np.mean(np.square(ctx.value(layer.gamma)))) if layer.gamma is not None else 1.0
        g = float(np.mean(ctx.value(layer.gamma))) if layer.gamma is not None else 1.0
        return Moments.from_second(g * m.mean / math.sqrt(s + layer.epsilon), g2 * s / (s + layer.epsilon))
    if m.ch_mean is not None and _last_axis(layer, len(ctx.input_shapes[0])):
        # Per example over the features: centre ~ the pooled mean, scale ~ the pooled deviation.
        out = _per_channel_affine(ctx, layer, m, m.mean, math.sqrt(m.var + layer.epsilon))
        return spatial_correlation.unchanged(_pattern_kept(out, m), m)  # each position's centre and scale: ~ constants
    ratio = m.var / (m.var + layer.epsilon) if m.var > 0 else 0.0
    # Per-example normalization over the features keeps the channel offsets (relative to the mean).
    out = _affine_over_normalized(ctx, layer.gamma, layer.beta, ratio, m.between / (m.var + layer.epsilon))
    return _pattern_kept(out, m)


def _pattern_kept(out: Moments, m: Moments) -> Moments:
    """`out` of a per-token normalization of `m`, with `m`'s pattern over positions (`Moments.pattern`) in
    the same share of the independent variance (the normalization rescales each token as a whole)."""
    return out.set_pattern(m.pattern * out.within / m.within if m.pattern is not None and m.within > 0.0 else None)


@BUILTIN.rule(keras.layers.GroupNormalization)
def group_normalization_rule(ctx):
    layer = ctx.layer
    m = ctx.input
    ndim = len(ctx.input_shapes[0])
    if m.ch_mean is not None and layer.axis % ndim == ndim - 1 and m.channels % layer.groups == 0:
        g = m.ch_mean.reshape(layer.groups, -1)
        second = m.ch_second.reshape(layer.groups, -1)
        centre = g.mean(axis=1, keepdims=True)
        var = second.mean(axis=1, keepdims=True) - centre**2
        scale = np.sqrt(np.maximum(var, 0.0) + layer.epsilon)
        return _per_channel_affine(ctx, layer, m, np.broadcast_to(centre, g.shape).reshape(-1),
                                   np.broadcast_to(scale, g.shape).reshape(-1))
    ratio = m.var / (m.var + layer.epsilon) if m.var > 0 else 0.0
    return _affine_over_normalized(ctx, layer.gamma, layer.beta, ratio, m.between / (m.var + layer.epsilon))


if hasattr(keras.layers, "RMSNormalization"):

    @BUILTIN.rule(keras.layers.RMSNormalization)
    def rms_normalization_rule(ctx):
        layer = ctx.layer
        eps = layer.epsilon if layer.epsilon is not None else 1e-6
        apply_head_scale(ctx, layer)
        scale = ctx.value(layer.scale).astype(np.float64) if getattr(layer, "scale", None) is not None else None
        return rms_normalized_moments(ctx.input, eps, scale)


@BUILTIN.rule(keras.layers.UnitNormalization)
def unit_normalization_rule(ctx):
    layer = ctx.layer
    m = ctx.input
    n = axis_size(ctx.input_shapes[0], layer.axis)
    if not n:
        return ctx.probe()
    return Moments.from_second(m.mean / math.sqrt(n * m.second), 1.0 / n)


@BUILTIN.rule(keras.layers.Normalization)
def preprocessing_normalization_rule(ctx):
    layer = ctx.layer
    m = ctx.input
    mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), dtype=np.float64).ravel()
    var = np.asarray(keras.ops.convert_to_numpy(layer.variance), dtype=np.float64).ravel()
    var = np.maximum(var, keras.backend.epsilon())
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else (layer.axis,)
    rank = len(ctx.input_shapes[0])
    if m.ch_mean is not None and mean.size == m.channels > 1 and [a % rank for a in axes] == [rank - 1]:
        # Known channels normalized each by its own statistics: exact per channel (their offsets are not
        # unknown `between` any more; a convolution after it then sees each channel's own moments)
        if getattr(layer, "invert", False):
            return Moments.from_channels(m.ch_mean * np.sqrt(var) + mean, m.ch_var * var)
        return Moments.from_channels((m.ch_mean - mean) / np.sqrt(var), m.ch_var / var)
    if getattr(layer, "invert", False):
        outs_mean = m.mean * np.sqrt(var) + mean
        outs_second = m.var * var + outs_mean**2
    else:
        outs_mean = (m.mean - mean) / np.sqrt(var)
        outs_second = m.var / var + outs_mean**2
    between = float(np.var(outs_mean)) + m.between * float(np.mean(1.0 / var))
    return Moments.from_second(float(outs_mean.mean()), float(outs_second.mean()), between)


@BUILTIN.rule(keras.layers.Rescaling)
def rescaling_rule(ctx):
    layer = ctx.layer
    scale = np.asarray(layer.scale, dtype=np.float64).ravel()
    offset = np.asarray(layer.offset, dtype=np.float64).ravel()
    m = ctx.input
    if m.ch_mean is not None and scale.size == 1 and offset.size == 1:
        return m.scaled(float(scale[0]), float(offset[0]))
    means = scale * m.mean + offset
    seconds = scale**2 * m.var + means**2
    between = float(np.mean(scale**2)) * m.between + float(np.var(means))
    return Moments.from_second(float(np.mean(means)), float(np.mean(seconds)), between)
