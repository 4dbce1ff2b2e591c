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

_EPS = 1e-8  # the smallest scale

__all__ = ["quant_range", "round_ste", "fake_quantize", "lsq_quantize", "lsq_init_scale", "pow2_scale", "minmax_params",
           "minmax_grid", "range_grid",
           "pact_quantize", "dorefa_weights", "dorefa_activation"]


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
    """x^ = (clamp(round(x/s) + z, q_min, q_max) - z) s with STE; per-channel along `axis` when given.

    Computed as c = clip(x/s + z, q_min, q_max), q = c + stop_gradient(round(c) - c) (the same values, as
    the bounds are integers; fewer element-wise passes than rounding first): the gradient to x is 1 inside
    the range and 0 outside, to s the LSQ form (module docstring)."""
    s = ops.cast(scale, x.dtype)
    if pow2:
        s = pow2_scale(s)
    s = _broadcast(s, x, axis)
    symmetric = isinstance(zero_point, (int, float)) and zero_point == 0
    v = x / s
    if not symmetric:
        z = _broadcast(ops.cast(zero_point, x.dtype), x, axis)
        v = v + z
    c = ops.clip(v, q_min, q_max)
    q = c + ops.stop_gradient(ops.round(c) - c)
    if not symmetric:
        q = q - z
    return q * s


def lsq_quantize(x, scale, q_min, q_max, axis=None, zero_point=0.0, pow2=False):
    """LSQ: `fake_quantize` with the scale's gradient multiplied by 1 / sqrt(n q_max)."""
    if all(d is not None for d in x.shape):
        n = math.prod(x.shape) if axis is None else math.prod(x.shape) // int(x.shape[axis])
        g = 1.0 / math.sqrt(n * max(q_max, 1))
    else:  # an unknown (batch) dimension: the element count of this call
        n = ops.cast(ops.size(x), x.dtype)
        if axis is not None:
            n = n / float(x.shape[axis])
        g = ops.rsqrt(n * float(max(q_max, 1)))
    s = ops.cast(scale, x.dtype)
    s = s * g + ops.stop_gradient(s - s * g)
    return fake_quantize(x, s, zero_point, q_min, q_max, axis=axis, pow2=pow2)


def lsq_init_scale(x, q_max, axis=None):
    """LSQ's initial scale 2 mean|x| / sqrt(q_max) (per channel along `axis` when given)."""
    if axis is None:
        return 2.0 * ops.mean(ops.abs(x)) / math.sqrt(q_max)
    reduce = tuple(i for i in range(len(x.shape)) if i != axis % len(x.shape))
    return 2.0 * ops.mean(ops.abs(x), axis=reduce) / math.sqrt(q_max)


def minmax_params(lo, hi, q_min, q_max, symmetric):
    """(scale, zero_point) of the range [lo, hi] (widened to hold 0), MQBench's / PyTorch's observers:

        symmetric, signed:   s = max(|lo|, |hi|) / ((q_max - q_min) / 2),  z = 0
        symmetric, unsigned: s = hi / q_max,                                z = 0
        asymmetric:          s = (hi - lo) / (q_max - q_min),               z = clamp(q_min - round(lo / s))
    """
    lo = ops.minimum(lo, 0.0)
    hi = ops.maximum(hi, 0.0)
    if symmetric:
        if q_min < 0:
            s = ops.maximum(-lo, hi) / ((q_max - q_min) / 2.0)
        else:
            s = hi / float(q_max)
        s = ops.maximum(s, _EPS)
        return s, ops.zeros_like(s)
    s = ops.maximum((hi - lo) / float(q_max - q_min), _EPS)
    z = ops.clip(q_min - ops.round(lo / s), q_min, q_max)
    return s, z



def minmax_grid(lo, hi, q_min, q_max, symmetric, pow2=False):
    """`minmax_params`, with the scale rounded to a power of two when `pow2` (the zero point then follows
    the rounded scale)."""
    s, z = minmax_params(lo, hi, q_min, q_max, symmetric)
    if pow2:
        s = pow2_scale(s)
        if not symmetric:
            z = ops.clip(q_min - ops.round(ops.minimum(lo, 0.0) / s), q_min, q_max)
    return s, z


def range_grid(lower, upper, q_min, q_max):
    """(scale, zero point) of a clip range [lower, upper] spread over the integer grid [q_min, q_max]."""
    s = ops.maximum((upper - lower) / float(q_max - q_min), _EPS)
    return s, ops.clip(q_min - ops.round(lower / s), q_min, q_max)


def pact_quantize(x, alpha, q_min, q_max, lower=None):
    """PACT (Choi et al.; MQBench's `pact`): clip to [lower, alpha] with learnable alpha (and lower), then
    quantize uniformly on that range with no gradient inside it:

        y = min(max(x, lower), alpha),   x^ = y + stop_gradient(Q(y) - y)

    so d x^/d alpha = 1 where x > alpha (and d x^/d lower = 1 where x < lower), 0 inside. `lower` defaults
    to 0 for an unsigned grid (q_min = 0) and -alpha for a signed one."""
    alpha = ops.cast(alpha, x.dtype)
    if lower is None:
        lower = ops.zeros_like(alpha) if q_min == 0 else -alpha
    lower = ops.cast(lower, x.dtype)
    y = ops.minimum(ops.maximum(x, lower), alpha)
    s, z = (ops.stop_gradient(v) for v in range_grid(lower, alpha, q_min, q_max))
    return y + ops.stop_gradient(fake_quantize(y, s, z, q_min, q_max) - y)


def dorefa_weights(w, q_min, q_max, axis=None):
    """DoReFa's weights (Zhou et al.; MQBench's `dorefa`): w~ = tanh(w) / max|tanh(w)| in [-1, 1] (max per
    tensor, or per channel along `axis`), then uniform quantization with s = 2 / (q_max - q_min), z = 0."""
    t = ops.tanh(w)
    if axis is None:
        m = ops.max(ops.abs(t))
    else:
        reduce = tuple(i for i in range(len(w.shape)) if i != axis % len(w.shape))
        m = _broadcast(ops.max(ops.abs(t), axis=reduce), w, axis)
    return fake_quantize(t / ops.maximum(m, _EPS), 2.0 / (q_max - q_min), 0.0, q_min, q_max)


def dorefa_activation(x, q_min, q_max):
    """DoReFa's activations: clip to [0, 1] (unsigned grid) or [-1, 1] (signed, the hardware settings) and
    quantize on that range; the gradient is 1 inside the clip, 0 outside."""
    return pact_quantize(x, ops.convert_to_tensor(1.0, x.dtype), q_min, q_max)
