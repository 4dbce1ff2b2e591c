"""Pooling rules (1D/2D/3D, local, global and adaptive), treating window entries as independent.

Average over a window of k entries: mean mu, variance v / k. With 'same' padding border windows
hold fewer real entries (padding is excluded from the average), so the variance is v * E_o[1/k_o]
over output positions o. Max over k entries: the moments of the largest of k i.i.d. Gaussians
(`max_of_gaussians`), mixed over the window sizes that occur; for element maps, the exact maximum of
each window's independent non-identical Gaussians (`max_expectations`), when that costs at most
`element_maps.MAX_POOL_EVALUATIONS` evaluations (else per-channel order statistics). After a monotone non-decreasing
activation f, max f(x_i) = f(max x_i): the pre-activations are pooled and E[f(M)], E[f(M)^2] integrated
over the distribution of the maximum M.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from autoinit_tf.moments import (Moments, elementwise_moments, max_of_gaussians, max_order_expectations,
                                 max_order_statistic, mix)
from autoinit_tf.rules import element_maps, shared_part, spatial_correlation
from autoinit_tf.rules.activation import is_relu, relu_matched_pre
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules


def _window_counts(n, k, stride, padding):
    """Number of real entries in each output window along one dimension."""
    if n is None:
        return np.array([k])
    if padding == "valid":
        out = (n - k) // stride + 1
        return np.full(max(out, 1), min(k, n))
    out = int(math.ceil(n / stride))
    pad_total = max((out - 1) * stride + k - n, 0)
    left = pad_total // 2
    starts = np.arange(out) * stride - left
    return np.minimum(starts + k, n) - np.maximum(starts, 0)


def _adaptive_counts(n, out):
    i = np.arange(out)
    start = np.floor(i * n / out).astype(int)
    end = np.ceil((i + 1) * n / out).astype(int)
    return end - start


def _size_distribution(per_dim):
    """{window size: fraction of output positions} from per-dimension window counts."""
    sizes = {1: 1.0}
    for counts in per_dim:
        vals, freq = np.unique(counts, return_counts=True)
        freq = freq / freq.sum()
        nxt = {}
        for s, p in sizes.items():
            for v, q in zip(vals, freq):
                nxt[s * int(v)] = nxt.get(s * int(v), 0.0) + p * q
        sizes = nxt
    return sizes


def _spatial_dims(shape, data_format, rank):
    if data_format == "channels_first":
        return list(shape[2 : 2 + rank])
    return list(shape[1 : 1 + rank])


def _average(m, sizes):
    """Averaging shrinks only the element-to-element part; channel offsets survive."""
    inv_k = sum(p / k for k, p in sizes.items())
    if m.ch_mean is not None:
        return Moments.from_channels(m.ch_mean, m.ch_var * inv_k)
    return Moments(m.mean, m.between + m.within * inv_k, m.between)


def _maximum(m, sizes, fn=None, kinks=()):
    """Max of k entries sharing their channel's offset: the order statistic of the within part.

    With `fn`, the moments of fn(max) per channel (`max_order_expectations`); None without channels.
    """
    if m.ch_mean is not None and fn is not None:
        mean = second = 0.0
        for k, p in sizes.items():
            e1, e2 = max_order_expectations(fn, m.ch_mean, m.ch_var, k, kinks)
            mean, second = mean + p * e1, second + p * e2
        return Moments.from_channel_second(mean, second)
    if fn is not None:
        return None
    if m.ch_mean is not None:
        s = np.sqrt(m.ch_var)
        mean = np.zeros_like(m.ch_mean)
        second = np.zeros_like(m.ch_mean)
        for k, p in sizes.items():
            e1, e2 = max_order_statistic(k)
            mk = m.ch_mean + s * e1
            mean += p * mk
            second += p * (mk * mk + s * s * (e2 - e1 * e1))
        return Moments.from_channel_second(mean, second)
    within = Moments(0.0, m.within)
    parts = [(p, max_of_gaussians(k, within)) for k, p in sizes.items()]
    mx = mix(parts)
    return Moments(m.mean + mx.mean, m.between + mx.var, m.between)


def _local_sizes(ctx):
    layer = ctx.layer
    rank = len(layer.pool_size)
    dims = _spatial_dims(ctx.input_shapes[0], getattr(layer, "data_format", "channels_last"), rank)
    per_dim = [_window_counts(n, k, s, layer.padding) for n, k, s in zip(dims, layer.pool_size, layer.strides)]
    return _size_distribution(per_dim)


def _global_sizes(ctx, rank):
    dims = _spatial_dims(ctx.input_shapes[0], getattr(ctx.layer, "data_format", "channels_last"), rank)
    k = int(np.prod([d for d in dims if d is not None])) if dims else 1
    return {max(k, 1): 1.0}


def _adaptive_sizes(ctx, rank):
    layer = ctx.layer
    dims = _spatial_dims(ctx.input_shapes[0], getattr(layer, "data_format", "channels_last"), rank)
    out = layer.output_size
    out = tuple(out) if isinstance(out, (list, tuple)) else (out,) * rank
    return _size_distribution([_adaptive_counts(n, o) for n, o in zip(dims, out)])


def _local_maps(ctx, kind):
    layer = ctx.layer
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    return element_maps.pool_maps(ctx.input, ctx.input_shapes[0], tuple(layer.pool_size), tuple(layer.strides),
                                  layer.padding, kind)


def average_pooling_rule(ctx):
    layer = ctx.layer
    exact = _local_maps(ctx, "average")
    out = exact if exact is not None else _average(ctx.input, _local_sizes(ctx))
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return out
    return spatial_correlation.average_pool(out, ctx.input, tuple(layer.pool_size), tuple(layer.strides),
                                            layer.padding, ctx.input_shapes[0])


def _max_of(m, pool, ctx=None):
    """Max pooling `pool(moments, fn=None, kinks=())`; when m = f(pre) with f monotone, max f = f(max).

    `pool(pre, f, kinks)` integrates f over the distribution of the max of the pre-activations; where it
    cannot (pooled moments only), f is applied to a Gaussian with the moments of the max. A pre-activation
    that only matches the moments of f's output (`Moments.matched`: the ReLU of a residual sum) gets the
    max of Gaussians with those moments, not of the real, skewed values: an estimate (InceptionResNetV2's
    max pool of the block35 stream: variance 0.255 predicted, 0.556 measured; 0.511 with its positions
    made independent), said to ``ctx.inexact`` so ``calibrate="auto"`` corrects the layers after it.
    """
    if m.pre is not None:
        pre, fn, kinks = m.pre
        if getattr(pre, "matched", False) and ctx is not None:
            ctx.inexact("the max of a non-Gaussian signal (a ReLU of a residual sum), taken as the max of "
                        "Gaussians with its moments")
        pooled = pool(pre, fn, kinks)
        if pooled is not None:
            if is_relu(fn):
                # relu(M), M the max of the pre-activations: not Gaussian, but a memo whose ReLU has the
                # pooled moments lets a residual sum or concatenation after it keep the exact ReLU rules.
                matched = relu_matched_pre(pooled)
                if matched is not None:
                    pooled.pre = (matched, fn, kinks)
            return pooled
        pooled = pool(pre)
        if pooled is not None:
            return elementwise_moments(fn, pooled, kinks)
    return pool(m)


def max_pooling_rule(ctx):
    layer = ctx.layer
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"

    def pool(m, fn=None, kinks=()):
        out = independent_pool(m, fn, kinks)
        if m.ch_mean is not None and channels_last:
            rho = spatial_correlation.window_correlation(m, tuple(layer.pool_size), ctx.input_shapes[0])
            if rho is not None and rho.size == m.channels and out is not None:
                out = spatial_correlation.correlated_max(independent_pool, m, rho, out, fn, kinks)
        return out

    def independent_pool(m, fn=None, kinks=()):
        exact = None
        if m.el_mean is not None and channels_last:
            exact = element_maps.pool_maps(m, ctx.input_shapes[0], tuple(layer.pool_size), tuple(layer.strides),
                                           layer.padding, "max", fn, kinks)
        return exact if exact is not None else _maximum(m, _local_sizes(ctx), fn, kinks)

    out = _max_of(ctx.input, pool, ctx)
    if not channels_last:
        return out
    return spatial_correlation.max_pool(out, ctx.input, tuple(layer.pool_size), tuple(layer.strides),
                                        ctx.input_shapes[0])


def global_average(ctx, rank):
    """Global average pooling over the `rank` spatial axes of a channels-last map (the layer, or a raw mean
    over those axes): per channel, what the positions share passes whole (element maps, the positions'
    correlation, the per-example shared part)."""
    out = None
    if ctx.input.el_mean is not None and getattr(ctx.layer, "data_format", "channels_last") == "channels_last":
        out = element_maps.global_average_maps(ctx.input, ctx.input_shapes[0])
    if out is None:
        out = _average(ctx.input, _global_sizes(ctx, rank))
    sizes = _spatial_dims(ctx.input_shapes[0], getattr(ctx.layer, "data_format", "channels_last"), rank)
    correlated = None
    if rank == 2 and getattr(ctx.layer, "data_format", "channels_last") == "channels_last":
        correlated = spatial_correlation.global_average_variance(ctx.input, ctx.input_shapes[0])
    if correlated is not None and out.ch_mean is not None and out.channels == correlated.size:
        # correlated positions, the shared part included
        return shared_part.pooled(Moments.from_channels(out.ch_mean, correlated), ctx.input)
    gain = None if any(d is None for d in sizes) else shared_part.pooled_variance_gain(ctx.input, int(np.prod(sizes)))
    if gain is not None and out.ch_mean is not None and out.channels == gain.size:
        out = Moments.from_channels(out.ch_mean, out.ch_var + gain)  # the shared part is not averaged out
    return shared_part.pooled(out, ctx.input)


L = keras.layers
for _cls in (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D):
    BUILTIN.rule(_cls, average_pooling_rule)
for _cls in (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D):
    BUILTIN.rule(_cls, max_pooling_rule)
for _rank, _cls in ((1, L.GlobalAveragePooling1D), (2, L.GlobalAveragePooling2D), (3, L.GlobalAveragePooling3D)):
    BUILTIN.rule(_cls, lambda ctx, r=_rank: global_average(ctx, r))
for _rank, _cls in ((1, L.GlobalMaxPooling1D), (2, L.GlobalMaxPooling2D), (3, L.GlobalMaxPooling3D)):
    BUILTIN.rule(_cls, lambda ctx, r=_rank: _max_of(
        ctx.input, lambda m, fn=None, kinks=(): _maximum(m, _global_sizes(ctx, r), fn, kinks), ctx))
for _rank in (1, 2, 3):
    _avg = getattr(L, f"AdaptiveAveragePooling{_rank}D", None)
    _max = getattr(L, f"AdaptiveMaxPooling{_rank}D", None)
    if _avg is not None:
        BUILTIN.rule(_avg, lambda ctx, r=_rank: _average(ctx.input, _adaptive_sizes(ctx, r)))
    if _max is not None:
        BUILTIN.rule(_max, lambda ctx, r=_rank: _maximum(ctx.input, _adaptive_sizes(ctx, r)))
