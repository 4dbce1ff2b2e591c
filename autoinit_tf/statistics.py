"""Statistics of real tensors for measurement and calibration, reduced on the backend.

Only scalars are copied out: float32 tensors are reduced in float32, E[y^2] in batch slices (no full-size
temporary); small tensors are reduced in numpy (fewer eager dispatches). Besides the moments of a tensor
(`tensor_stats`, with the Signal Propagation Plot quantities of Brock et al. 2021 per channel), the
precision of a variance estimate: for per-example energies q the relative standard error of the
variance is ``std(q) / (mean(q) sqrt(n))`` (`example_moments`, `relative_se`).
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops
from keras import tree

from autoinit_tf.moments import Moments

__all__ = ["TensorStats", "as_float", "tensor_stats", "mean_square", "example_moments", "relative_se", "var_cov",
           "first_example"]


class TensorStats:
    """Moments of one tensor plus the per-channel (last axis) SPP quantities."""

    __slots__ = ("moments", "channel_mean_sq", "channel_var")

    def __init__(self, moments, channel_mean_sq, channel_var):
        self.moments = moments
        self.channel_mean_sq = channel_mean_sq
        self.channel_var = channel_var

    def channel(self):
        return {"mean_sq": self.channel_mean_sq, "var": self.channel_var}


def as_float(y):
    y = ops.convert_to_tensor(y)
    dtype = str(y.dtype)
    if "float" not in dtype:
        y = ops.cast(y, "float32")
    return y


_NUMPY_MAX = 1 << 20  # tensors up to this many elements are reduced in numpy (fewer eager dispatches)


# var_cov (calibration) copies to the host only below this size: above it the backend's reductions need
# no float64 host copies of whole activations.
_HOST_MAX = 1 << 16


def is_small(y, limit=_NUMPY_MAX):
    n = 1
    for d in y.shape:
        n *= int(d)
    return n <= limit


def host_array(y):
    a = np.asarray(ops.convert_to_numpy(y))
    if a.dtype.kind != "f":
        a = a.astype(np.float32)
    return a


def tensor_stats(y) -> TensorStats:
    y = ops.convert_to_tensor(y)
    rank = len(y.shape)
    if rank == 0:
        v = float(ops.convert_to_numpy(y))
        return TensorStats(finite_moments(v, 0.0), v * v, 0.0)
    if is_small(y):
        a = host_array(y)
        a = a.reshape(-1, a.shape[-1]) if rank > 1 else a.reshape(-1, 1)
        if a.size == 0:
            return TensorStats(finite_moments(float("nan"), float("nan")), float("nan"), float("nan"))
        cm = a.mean(axis=0, dtype=np.float64)
        cv = a.var(axis=0, dtype=np.float64)
        mean, within, between, msq = float(cm.mean()), float(cv.mean()), float(cm.var()), float(np.mean(cm * cm))
    else:
        y = as_float(y)
        cm = ops.mean(y, axis=tuple(range(rank - 1))) if rank > 1 else ops.mean(y, keepdims=True)
        cm = np.asarray(ops.convert_to_numpy(cm), dtype=np.float64)
        mean, between, msq = float(cm.mean()), float(cm.var()), float(np.mean(cm * cm))
        # Mean within-channel variance = E[y^2] - mean of squared channel means (no full-size temporary).
        within = max(mean_square(y) - msq, 0.0)
    # Equal counts per channel: total variance = mean within-channel variance + variance of means.
    return TensorStats(finite_moments(mean, within + between), msq, within)


def mean_square(y) -> float:
    """E[y^2] over all elements, in slices along the batch axis of at most ~2**20 elements, so the only
    temporary is one slice's square (first-axis slices share the tensor's buffer)."""
    n = int(y.shape[0]) if len(y.shape) else 1
    size = 1
    for d in y.shape:
        size *= int(d)
    if size == 0:
        return float("nan")
    step = max(1, _NUMPY_MAX // max(size // max(n, 1), 1))
    if len(y.shape) == 0 or step >= n:
        return float(ops.convert_to_numpy(ops.mean(ops.square(y))))
    parts = [ops.sum(ops.square(y[i:i + step])) for i in range(0, n, step)]
    return float(np.sum(np.asarray(ops.convert_to_numpy(ops.stack(parts)), dtype=np.float64))) / size


def finite_moments(mean, var):
    if not (math.isfinite(mean) and math.isfinite(var)):
        m = Moments.__new__(Moments)
        m.mean, m.var = float(mean), float(var)
        return m
    return Moments(mean, max(var, 0.0))


def example_moments(u):
    """Per-example mean and mean square of `u` over all its non-batch axes (float64 numpy vectors), with no
    full-size temporary: small tensors in numpy, float32/64 ones by a mean and a batched dot product, others
    in batch slices of at most ~2**20 elements."""
    n = int(u.shape[0])
    per = 1
    for d in u.shape[1:]:
        per *= int(d)
    axes = tuple(range(1, len(u.shape)))
    if not axes or n * per <= _NUMPY_MAX:  # small: one host copy, reduced in numpy (fewer dispatches)
        a = host_array(u).reshape(n, -1)
        return a.mean(axis=1, dtype=np.float64), np.mean(np.square(a, dtype=np.float64), axis=1)
    if str(u.dtype) in ("float32", "float64"):
        # One reduction each, no temporary: the mean square per example is a batched dot product of each
        # example's row with itself (a batched matrix product on every backend).
        rows = ops.reshape(u, (n, per))
        both = ops.stack([ops.mean(rows, axis=1), ops.einsum("ij,ij->i", rows, rows) / per])
        both = np.asarray(ops.convert_to_numpy(both), dtype=np.float64)
        return both[0], both[1]
    step = max(1, _NUMPY_MAX // max(per, 1))  # half precision: squares in slices, reduced in their own dtype
    m1, m2 = [], []
    for i in range(0, n, step):
        part = u[i:i + step]
        m1.append(ops.mean(part, axis=axes))
        m2.append(ops.mean(ops.square(part), axis=axes))
    both = np.asarray(ops.convert_to_numpy(ops.stack([ops.concatenate(m1), ops.concatenate(m2)])),
                      dtype=np.float64)
    return both[0], both[1]


def relative_se(m1, m2):
    """Relative standard error of the pooled variance estimated from per-example moments.

    The pooled variance is the batch mean of q_e = E_e[(u - mu)^2] (mu the pooled mean), so its relative
    standard error is std(q) / (mean(q) sqrt(n)). Heavy-tailed signals (a few examples carrying most of
    the energy) have a large one: their variance is only known to that precision on this batch.
    """
    n = m1.size
    if n < 2:
        return float("inf")
    mu = float(m1.mean())
    q = m2 - 2.0 * mu * m1 + mu * mu
    mean_q = float(q.mean())
    if not (math.isfinite(mean_q) and mean_q > 0):
        return float("inf")
    return float(q.std(ddof=1)) / (mean_q * math.sqrt(n))


def var_cov(u, c=None):
    """Var(u), the relative standard error of that estimate (`relative_se`), and when `c` is given
    Cov(u, c) and Var(c), over all elements: ``(var_u, rse_u, cov, var_c)``.

    `c` has the batch size of `u` or 1 (a term that is the same for every example, broadcast over the
    batch: then Cov(u, c) = mean over positions of mean_batch(u) * (c - mean(c))).
    """
    u = ops.convert_to_tensor(u)
    if c is not None:
        c = ops.convert_to_tensor(c)
    shared = c is not None and len(u.shape) > 0 and int(c.shape[0]) == 1 and int(u.shape[0]) != 1
    if len(u.shape) == 0:
        return 0.0, float("inf"), 0.0, 0.0
    if is_small(u, _HOST_MAX):
        a = host_array(u).astype(np.float64)
        vu = float(a.var())
        flat = a.reshape(a.shape[0], -1)
        rse = relative_se(flat.mean(axis=1), np.mean(flat * flat, axis=1))
        if c is None:
            return vu, rse, 0.0, 0.0
        b = host_array(c).astype(np.float64)
        b = b - b.mean()
        cov = float(np.mean(a.mean(axis=0) * b[0])) if shared else float(np.mean(a * b))
        return vu, rse, cov, float(np.mean(b * b))
    u = as_float(u)
    m1, m2 = example_moments(u)
    mu = float(m1.mean())
    vu = max(float(m2.mean()) - mu * mu, 0.0)  # no full-size temporary (ops.var makes three)
    rse = relative_se(m1, m2)
    if c is None:
        return vu, rse, 0.0, 0.0
    c = as_float(c)
    c = c - ops.mean(c)
    cov = ops.mean(ops.mean(u, axis=0) * c[0]) if shared else ops.mean(u * c)
    vec = ops.stack([cov, ops.mean(ops.square(c))])
    cov, vc = (float(v) for v in np.asarray(ops.convert_to_numpy(vec), dtype=np.float64))
    return vu, rse, cov, vc


def first_example(args, kwargs):
    """`(args, kwargs)` with every batched tensor cut to its first example."""
    def cut(t):
        if t is not None and hasattr(t, "shape") and hasattr(t, "dtype") and len(t.shape) > 0:
            return t[:1]
        return t

    return tree.map_structure(cut, (args, kwargs))


