"""Dropout and noise rules, in training mode, exact for any input mean.

Inverted dropout with keep probability k = 1 - rate (Dropout and SpatialDropout: Keras rescales
both by 1/k; a spatial mask has the same per-element marginal): mean mu, E[y^2] = E[x^2] / k.
GaussianDropout: y = x * N(1, rate / (1 - rate)), so E[y^2] = E[x^2] / (1 - rate).
GaussianNoise: var + stddev^2. AlphaDropout (Keras' SELU-preserving form):
y = a (x M + alpha' (1 - M)) + b with M ~ Bernoulli(k).
"""

from __future__ import annotations

import keras

from autoinit_tf.moments import Moments
from autoinit_tf.rules import shared_part, spatial_correlation
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

L = keras.layers


def _inverted_dropout(ctx):
    rate = float(ctx.layer.rate)
    m = ctx.input
    if rate <= 0.0:
        return m
    keep = 1.0 - rate
    per_example = _one_mask_per_example(ctx)
    if m.el_mean is not None:
        out = Moments.from_elements(m.el_mean, m.el_second / keep - m.el_mean**2)
    elif m.ch_mean is not None:
        out = Moments.from_channel_second(m.ch_mean, m.ch_second / keep)
    else:
        return _pattern_through(Moments.from_second(m.mean, m.second / keep, m.between), m, per_example)
    out = shared_part.through_dropout(out, m, keep, per_example)
    return _pattern_through(spatial_correlation.through_dropout(out, m, per_example), m, per_example)


def _pattern_through(out: Moments, m: Moments, per_example: bool) -> Moments:
    """A pattern over positions (`Moments.pattern`) through an element-wise mask: m_j d_j / k = d_j + (m_j / k - 1) d_j,
    the pattern itself and an independent part of variance (1 / k - 1) P, which the output's variance already
    holds. One mask per example keeps no such split: dropped."""
    return out if per_example else out.set_pattern(m.pattern)


def _one_mask_per_example(ctx) -> bool:
    """True when one dropout draw covers every position of an example's channel (SpatialDropout, or a
    noise_shape of 1 on every axis between batch and channels: EfficientNet's per-example drop)."""
    if "Spatial" in type(ctx.layer).__name__:
        return True
    shape = getattr(ctx.layer, "noise_shape", None)
    if shape is None or len(ctx.input_shapes[0]) < 3:
        return False
    shape = tuple(shape)
    return len(shape) == len(ctx.input_shapes[0]) and all(d == 1 for d in shape[1:-1])


for _cls in (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D):
    BUILTIN.rule(_cls, _inverted_dropout)


@BUILTIN.rule(L.GaussianDropout)
def gaussian_dropout_rule(ctx):
    rate = float(ctx.layer.rate)
    m = ctx.input
    if rate <= 0.0:
        return m
    if m.ch_mean is not None:
        return Moments.from_channel_second(m.ch_mean, m.ch_second / (1.0 - rate))
    return Moments.from_second(m.mean, m.second / (1.0 - rate), m.between)


@BUILTIN.rule(L.GaussianNoise)
def gaussian_noise_rule(ctx):
    m = ctx.input
    if m.ch_mean is not None:
        return Moments.from_channels(m.ch_mean, m.ch_var + float(ctx.layer.stddev) ** 2)
    return Moments(m.mean, m.var + float(ctx.layer.stddev) ** 2, m.between)


@BUILTIN.rule(L.AlphaDropout)
def alpha_dropout_rule(ctx):
    rate = float(ctx.layer.rate)
    m = ctx.input
    if rate <= 0.0:
        return m
    alpha_p = -1.6732632423543772848170429916717 * 1.0507009873554804934193349852946
    keep = 1.0 - rate
    a = (keep * (1.0 + rate * alpha_p**2)) ** -0.5
    b = -a * alpha_p * rate
    inner_mean = keep * m.mean + (1.0 - keep) * alpha_p
    inner_second = keep * m.second + (1.0 - keep) * alpha_p**2
    return Moments.from_second(a * inner_mean + b, a * a * inner_second + 2 * a * b * inner_mean + b * b)


@BUILTIN.rule(L.ActivityRegularization)
def identity_rule(ctx):
    return ctx.input
