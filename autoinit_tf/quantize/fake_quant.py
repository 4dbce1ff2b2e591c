"""Fake quantization (MQBench's conventions), in `keras.ops` with straight-through gradients.

    q = clamp(round(x / s) + z, q_min, q_max),     x^ = (q - z) s

signed range [-2^(b-1), 2^(b-1) - 1] (symmetric with `narrow=True`: [-(2^(b-1) - 1), 2^(b-1) - 1], TensorRT's),
unsigned [0, 2^b - 1]; symmetric means z = 0. Per-channel: one (s, z) per index of `axis` (Keras kernels: the
last axis). Power-of-two scales: s <- 2^round(log2 s). `round` passes the gradient straight through (STE);
`clamp` passes it inside the range only.

LSQ (Esser et al.; MQBench's `lsq`): s is learned; its gradient is scaled by g = 1 / sqrt(n q_max) (n the
elements per scale) through s_g = s g + stop_gradient(s - s g), so that

    d x^ / d s = (round(x/s) - x/s) inside the range,  q_min - z or q_max - z outside     (times g)
"""

from __future__ import annotations

import math

from keras import ops

__all__ = ["quant_range", "round_ste", "fake_quantize", "lsq_quantize", "lsq_init_scale", "pow2_scale"]


def quant_range(bits, signed=True, narrow=False):
    """(q_min, q_max) of a `bits`-bit integer grid."""
    if signed:
        return (-(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1)
    return (0, 2 ** bits - 1)


def round_ste(x):
    """round(x) forward, identity backward."""
    return x + ops.stop_gradient(ops.round(x) - x)


def pow2_scale(s):
    """2^round(log2 s), straight-through."""
    return s + ops.stop_gradient(ops.power(2.0, ops.round(ops.log2(s))) - s)


def _broadcast(v, x, axis):
    if axis is None:
        return v
    shape = [1] * len(x.shape)
    shape[axis] = -1
    return ops.reshape(v, shape)


def fake_quantize(x, scale, zero_point=0.0, q_min=-128, q_max=127, axis=None, pow2=False):
    """x^ = (clamp(round(x/s) + z, q_min, q_max) - z) s with STE; per-channel along `axis` when given."""
    s = ops.cast(scale, x.dtype)
    z = ops.cast(zero_point, x.dtype)
    if pow2:
        s = pow2_scale(s)
    s, z = _broadcast(s, x, axis), _broadcast(z, x, axis)
    q = round_ste(x / s) + z
    # clamp with the gradient passed on the closed range [q_min, q_max] on every backend (JAX's clip halves
    # it at the bounds, where a value rounding exactly to q_max lands)
    inside = ops.logical_and(q >= q_min, q <= q_max)
    q = ops.where(inside, q, ops.stop_gradient(ops.clip(q, q_min, q_max)))
    return (q - z) * s


def lsq_quantize(x, scale, q_min, q_max, axis=None, zero_point=0.0, pow2=False):
    """LSQ: `fake_quantize` with the scale's gradient multiplied by 1 / sqrt(n q_max)."""
    n = math.prod(x.shape) if axis is None else math.prod(x.shape) // int(x.shape[axis])
    g = 1.0 / math.sqrt(n * max(q_max, 1))
    s = ops.cast(scale, x.dtype)
    s = s * g + ops.stop_gradient(s - s * g)
    return fake_quantize(x, s, zero_point, q_min, q_max, axis=axis, pow2=pow2)


def lsq_init_scale(x, q_max, axis=None):
    """LSQ's initial scale 2 mean|x| / sqrt(q_max) (per channel along `axis` when given)."""
    if axis is None:
        return 2.0 * ops.mean(ops.abs(x)) / math.sqrt(q_max)
    reduce = tuple(i for i in range(len(x.shape)) if i != axis % len(x.shape))
    return 2.0 * ops.mean(ops.abs(x), axis=reduce) / math.sqrt(q_max)
