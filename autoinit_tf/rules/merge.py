"""Merge rules; inputs are treated as independent.

Add: (sum mu_i, sum v_i). Subtract: (mu_1 - mu_2, v_1 + v_2). Average: (sum mu_i / N, sum v_i / N^2).
Multiply: mean prod mu_i, E[y^2] = prod E[x_i^2]. Concatenate: the size-weighted mixture.
Maximum / Minimum of two Gaussians (Clark 1961), with a = sqrt(v_1 + v_2), alpha = (mu_1 - mu_2)/a:

    E[max] = mu_1 Phi(alpha) + mu_2 Phi(-alpha) + a phi(alpha)
    E[max^2] = (mu_1^2 + v_1) Phi(alpha) + (mu_2^2 + v_2) Phi(-alpha) + (mu_1 + mu_2) a phi(alpha),

applied pairwise for more inputs. Dot over n entries: mean n mu_a mu_b,
var n (E[a^2] E[b^2] - mu_a^2 mu_b^2); with normalize=True (cosine) E[y^2] ~ 1/n.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np

from autoinit_tf.moments import Moments, mix
from autoinit_tf.rules import shared_part, spatial_correlation
from autoinit_tf.rules.activation import acts_alike
from autoinit_tf.rules.element_maps import same_shape
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

L = keras.layers


def same_channels(ms):
    """True when every input tracks the same number of channels."""
    sizes = {m.channels for m in ms}
    return len(sizes) == 1 and None not in sizes


def add_moments(ms):
    # patterns over positions (position tables) add, as the independent parts do
    patterns = [m.pattern for m in ms if m.pattern is not None]
    pattern = sum(patterns) if patterns else None
    if same_shape(ms):
        out = Moments.from_elements(sum(m.el_mean for m in ms), sum(m.el_var for m in ms))
    elif same_channels(ms):
        out = Moments.from_channels(sum(m.ch_mean for m in ms), sum(m.ch_var for m in ms))
    else:
        return Moments(sum(m.mean for m in ms), sum(m.var for m in ms), sum(m.between for m in ms)).set_pattern(pattern)
    out.set_pattern(pattern)
    activated = [m for m in ms if m.pre is not None]
    if len(ms) > 1 and len(activated) == 1:
        # f(P) + R, remembered for an activation after the sum where f(P) dominates it (Inception-ResNet's
        # x + 0.1 r): there the sum is far from Gaussian. Where R is as large (ResNet's x + BN(conv)), the
        # Gaussian rule is close already and the exact integral is not worth its cost (2 of 3.5 s of
        # ResNet50's pass).
        rest = add_moments([m for m in ms if m is not activated[0]])
        if rest.var < activated[0].var:
            out.sum_of = (activated[0], rest)
    return out


def _broadcast_elements(ms):
    """Each input's (mean, second) as arrays that broadcast to one element shape, when at least one input
    carries element maps and every other one has element maps of a broadcastable shape, per-channel
    moments of the same channels (a (batch, 1, 1, C) gate) or one constant per element; else None."""
    shapes = [m.el_mean.shape for m in ms if m.el_mean is not None]
    if not shapes:
        return None
    try:
        shape = np.broadcast_shapes(*shapes)
    except ValueError:
        return None
    parts = []
    for m in ms:
        if m.el_mean is not None:
            parts.append((m.el_mean, m.el_second))
        elif m.ch_mean is not None and m.channels == shape[-1]:
            parts.append((m.ch_mean, m.ch_second))
        elif m.ch_mean is None and m.between == 0.0:
            parts.append((np.float64(m.mean), np.float64(m.second)))
        else:
            return None
    return shape, parts


def multiply_moments(ms):
    """Product of independent inputs: E[prod x] = prod E[x] and E[(prod x)^2] = prod E[x^2], per element
    where element maps are known (a squeeze-and-excitation gate of shape (batch, 1, 1, C) broadcasts over
    the map's positions, which keep their own moments), else per channel, else pooled."""
    elements = _broadcast_elements(ms)
    if elements is not None:
        shape, parts = elements
        mean = np.broadcast_to(functools.reduce(np.multiply, [p[0] for p in parts]), shape)
        second = np.broadcast_to(functools.reduce(np.multiply, [p[1] for p in parts]), shape)
        return Moments.from_elements(mean, second - mean**2)
    if same_channels(ms):
        mean = np.prod([m.ch_mean for m in ms], axis=0)
        return Moments.from_channel_second(mean, np.prod([m.ch_second for m in ms], axis=0))
    mean = float(np.prod([m.mean for m in ms]))
    second = float(np.prod([m.second for m in ms]))
    between = float(np.prod([m.between + m.mean**2 for m in ms])) - mean * mean
    return Moments.from_second(mean, second, between)


def max2(a: Moments, b: Moments) -> Moments:
    s = math.sqrt(a.var + b.var)
    if s == 0.0:
        return Moments(max(a.mean, b.mean), 0.0)
    alpha = (a.mean - b.mean) / s
    cdf = 0.5 * math.erfc(-alpha / math.sqrt(2.0))
    cdf_neg = 1.0 - cdf
    pdf = math.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
    e1 = a.mean * cdf + b.mean * cdf_neg + s * pdf
    e2 = a.second * cdf + b.second * cdf_neg + (a.mean + b.mean) * s * pdf
    return Moments.from_second(e1, e2)


def maximum_moments(ms):
    out = ms[0]
    for m in ms[1:]:
        out = max2(out, m)
    return out


def minimum_moments(ms):
    neg = [Moments(-m.mean, m.var) for m in ms]
    r = maximum_moments(neg)
    return Moments(-r.mean, r.var)


def _side_by_side(ms):
    """Last-axis concatenation of the detail every input carries (element maps of one spatial shape, or
    channels), or None."""
    if all(m.el_mean is not None for m in ms) and len({m.el_mean.shape[:-1] for m in ms}) == 1:
        return Moments.from_elements(np.concatenate([m.el_mean for m in ms], axis=-1),
                                     np.concatenate([m.el_var for m in ms], axis=-1))
    if all(m.ch_mean is not None for m in ms):
        return Moments.from_channels(np.concatenate([m.ch_mean for m in ms]), np.concatenate([m.ch_var for m in ms]))
    return None


def concatenated_pre(ms):
    """The pre-activation memo (`Moments.pre`) of a last-axis concatenation of f(P_1), ..., f(P_k) with one
    activation f: f of the concatenated P_i. Inception-ResNet's mixed blocks concatenate ReLU branches, and
    the residual sum after them is relu(that + 0.17 r): without the memo the ReLU of the sum took it as
    Gaussian (block35_1 of InceptionResNetV2 predicted variance 0.237, measured 0.333, an error every later
    block carried). None when an input has no memo or the activations differ."""
    if not ms or any(m.pre is None for m in ms):
        return None
    fn, kinks = ms[0].pre[1], tuple(ms[0].pre[2])
    if any(tuple(m.pre[2]) != kinks or not acts_alike(m.pre[1], fn) for m in ms[1:]):
        return None
    pres = [m.pre[0] for m in ms]
    out = _side_by_side(pres)
    if out is None:
        return None
    out = spatial_correlation.concatenated(pres, out)
    out.matched = any(getattr(p, "matched", False) for p in pres)
    return out, fn, kinks


def concat_moments(ms, sizes, last_axis=False):
    """Concatenation: channels side by side on the last axis, else a size-weighted mixture. On the last
    axis the branches' common activation memo is kept (`concatenated_pre`)."""
    out = _side_by_side(ms) if last_axis else None
    if out is not None:
        pre = concatenated_pre(ms)
        if pre is not None and (pre[0].el_mean is None) == (out.el_mean is None):
            out.pre = pre
        return spatial_correlation.concatenated(ms, out)
    if any(s is None for s in sizes):
        sizes = [1] * len(ms)
    return mix(list(zip(sizes, ms)))


def _is_last(axis, ndim):
    return axis == -1 or axis == ndim - 1


@BUILTIN.rule(L.Add)
def add_rule(ctx):
    return spatial_correlation.added(ctx.inputs, shared_part.added(ctx.inputs, add_moments(ctx.inputs)))


@BUILTIN.rule(L.Subtract)
def subtract_rule(ctx):
    a, b = ctx.inputs
    if same_shape([a, b]):
        return Moments.from_elements(a.el_mean - b.el_mean, a.el_var + b.el_var)
    if same_channels([a, b]):
        return Moments.from_channels(a.ch_mean - b.ch_mean, a.ch_var + b.ch_var)
    return Moments(a.mean - b.mean, a.var + b.var, a.between + b.between)


@BUILTIN.rule(L.Average)
def average_rule(ctx):
    n = len(ctx.inputs)
    if same_channels(ctx.inputs):
        return add_moments(ctx.inputs).scaled(1.0 / n)
    return Moments(sum(m.mean for m in ctx.inputs) / n, sum(m.var for m in ctx.inputs) / n**2,
                   sum(m.between for m in ctx.inputs) / n**2)


def _constant_over_positions(shapes):
    """Per input, whether it is constant over positions (every axis between batch and channels is 1),
    when a Multiply scales a feature map by such a tensor (squeeze-and-excitation: (batch, 1, 1, C) times
    (batch, H, W, C)); else None."""
    shapes = [tuple(s) for s in shapes]
    if len(shapes) < 2 or len({len(s) for s in shapes}) != 1 or len(shapes[0]) < 3:
        return None
    pooled = [all(d == 1 for d in s[1:-1]) for s in shapes]
    return pooled if any(pooled) and not all(pooled) else None


@BUILTIN.rule(L.Multiply)
def multiply_rule(ctx):
    return multiply_signals(ctx, ctx.inputs, ctx.input_shapes)


def multiply_signals(ctx, inputs, shapes):
    """The product of signals (a Multiply layer, or ``x * gate`` as a raw op: keras-hub's MobileNetV3
    squeeze-and-excitation); a factor constant over positions is a per-example gate (see `multiply_rule`)."""
    out = multiply_moments(inputs)
    pooled = _constant_over_positions(shapes)
    if pooled is not None:
        ctx.inexact("a per-example gate (squeeze-and-excitation) scales each example's channels: the signal after "
                    "it is a scale mixture, whose spread the pass estimates (one latent log-scale)", persistent=True)
        if len(inputs) == 2:
            g, x = inputs if pooled[0] else inputs[::-1]
            out = spatial_correlation.unchanged(shared_part.gate(x, g, out), x)
    return out


@BUILTIN.rule(L.Maximum)
def maximum_rule(ctx):
    return maximum_moments(ctx.inputs)


@BUILTIN.rule(L.Minimum)
def minimum_rule(ctx):
    return minimum_moments(ctx.inputs)


@BUILTIN.rule(L.Concatenate)
def concatenate_rule(ctx):
    axis = ctx.layer.axis
    sizes = [s[axis] for s in ctx.input_shapes]
    return concat_moments(ctx.inputs, sizes, _is_last(axis, len(ctx.input_shapes[0])))


@BUILTIN.rule(L.Dot)
def dot_rule(ctx):
    layer = ctx.layer
    a, b = ctx.inputs
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else (layer.axes, layer.axes)
    n = ctx.input_shapes[0][axes[0]]
    if n is None:
        return ctx.probe()
    n = int(n)
    if layer.normalize:
        return Moments.from_second(a.mean * b.mean / math.sqrt(a.second * b.second), 1.0 / n)
    mean = n * a.mean * b.mean
    var = n * (a.second * b.second - a.mean**2 * b.mean**2)
    return Moments(mean, var)
