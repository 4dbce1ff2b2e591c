"""Drawing weight tensors with an exact target variance.

Every distribution here yields i.i.d. entries (or, for ``orthogonal``, an orthogonal matrix rescaled)
whose empirical variance targets ``var``:

- ``truncated_normal``: N(0, (std / 0.87962566)^2) truncated at two of its standard deviations, which
  has variance exactly std^2 (the constant is the std of a standard normal truncated at +-2, as in
  Keras' VarianceScaling); the entries beyond the bound are redrawn.
- ``untruncated_normal``: N(0, var).
- ``uniform``: U(-sqrt(3 var), sqrt(3 var)).
- ``orthogonal``: a (fan_in, fan_out) orthogonal matrix from the QR decomposition of a Gaussian matrix
  (sign-corrected), scaled so that the mean squared entry is var.

Tensors drawn in chunks (more than `CHUNK` entries) take their standard normals from the Box-Muller
transform of float32 uniforms (`standard_normal`): for U, V uniform on (0, 1], R = sqrt(-2 ln U) and
T = 2 pi V, R cos T and R sin T are independent N(0, 1). In float32 with numpy's vectorized log, sqrt, cos
and sin that is about 2x faster than numpy's float32 ziggurat on this project's CI-class CPUs (4.1 against
8.0 ns per value, `benchmarks/draw_speed.py`), and drawing is what bounds the analytic wrap of large models
(VGG16: 50 M weights). U takes the values k 2^-24, so |R| <= sqrt(48 ln 2) = 5.77: those normals lack the
tail beyond 5.77 standard deviations (probability 8e-9). Smaller tensors, where the draw costs little, keep
numpy's float32 ziggurat. (`CHUNK` was 2^20 until 2026-12-07: a tensor of 2^18 to 2^20 entries drew other
values for the same seed before; within one version the same seed always gives the same weights.)
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform", "orthogonal")
_TRUNC_STD = 0.87962566103423978
_BOUND = np.float32(2.0)  # truncation bound, in standard deviations of the untruncated normal


def check_distribution(name: str) -> str:
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown distribution {name!r}. Choose one of: {', '.join(DISTRIBUTIONS)}."
        )
    return name


def rng_for(seed, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key); seed None draws fresh entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])


#: Tensors with more entries than this are drawn in chunks of exactly this many entries (the last one
#: shorter), each from its own child generator, filled in parallel by a thread pool (numpy generators
#: release the GIL while filling). The chunking depends only on the size, never on the core count, so
#: the values depend only on the generator's state. 2^18 (256k) entries: a 728 x 728 or 3 x 3 x 256 x 256
#: kernel in parallel too (Xception's, ResNet's: 6.5 -> 2.3-3.2 ms each on 2 cores; 2^20 before).
CHUNK = 1 << 18

#: Byte alignment of the arrays `sample` returns (Eigen's widest vector alignment), so that
#: `variable_assign` can hand them to TensorFlow as the variables' own buffers without a copy.
ALIGNMENT = 64


def aligned_empty(n: int, dtype=np.float32) -> np.ndarray:
    """An uninitialized 1-D array of `n` entries whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + n * dtype.itemsize].view(dtype)


def sample(shape, var: float, distribution: str, rng: np.random.Generator, *,
           workers: int | None = None) -> np.ndarray:
    """A float32 array of `shape` whose entries have variance `var` under `distribution`.

    Deterministic given the state of `rng`, whatever `workers` (threads used for tensors larger than
    `CHUNK`; default: the machine's core count).
    """
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape)) if shape else 1
    if distribution == "orthogonal":
        return _orthogonal(shape, var, rng)
    check_distribution(distribution)
    std = float(np.sqrt(max(var, 0.0)))
    check_representable(std, np.float32)
    out = aligned_empty(n)
    if n <= CHUNK:
        _fill(out, std, distribution, rng, _ziggurat)
    else:
        # One 128-bit draw from `rng` seeds the chunks' children, so `rng` advances (a second large
        # draw from the same generator differs) and chunk i always gets spawn key i. Children use
        # SFC64, about 20 % faster than PCG64 for normal variates.
        entropy = [int(v) for v in rng.integers(0, 1 << 32, size=4, dtype=np.uint64)]
        children = np.random.SeedSequence(entropy).spawn(-(-n // CHUNK))
        jobs = [(out[i * CHUNK:(i + 1) * CHUNK], np.random.Generator(np.random.SFC64(ss)))
                for i, ss in enumerate(children)]  # each chunk by Box-Muller (module docstring)
        workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
        if workers == 1:
            for part, child in jobs:
                _fill(part, std, distribution, child, standard_normal)
        else:
            pool = _pool(workers)
            for f in [pool.submit(_fill, part, std, distribution, child, standard_normal) for part, child in jobs]:
                f.result()
    return out.reshape(shape)


_POOLS: dict = {}  # (process id, workers) -> ThreadPoolExecutor


def _pool(workers: int) -> ThreadPoolExecutor:
    """One thread pool per process and size, kept for every later draw: starting threads per kernel cost
    VGG16's wrap about 0.2 s of its 1.4 s. A forked child (whose parent's threads do not exist in it)
    makes its own."""
    key = (os.getpid(), workers)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoinit-draw")
    return pool


class UnrepresentableVarianceError(ValueError):
    """A requested weight scale is outside the range of the variable's float dtype."""


def check_representable(std: float, dtype, where: str = "") -> None:
    """Raise `UnrepresentableVarianceError` when weights of standard deviation `std` cannot be stored in
    `dtype`: non-finite, above its largest value, or (for a nonzero `std`) below its smallest normal
    number, where they would become subnormal or zero (a silently dead layer)."""
    info = np.finfo(dtype)
    where = f" for {where}" if where else ""
    if not np.isfinite(std) or std > float(info.max) / 4:
        problem = f"overflow to inf in {np.dtype(dtype).name} (largest {float(info.max):.3g})"
    elif 0 < std < float(info.tiny):
        problem = f"underflow to zero or subnormal numbers in {np.dtype(dtype).name} (smallest normal {float(info.tiny):.3g})"
    else:
        return
    raise UnrepresentableVarianceError(
        f"The weights{where} would have standard deviation {std:.3g}, which would {problem}. Check "
        "signal_variance and the input moments (input_moments / data, --signal-variance / --input-var): "
        "rescale the inputs to a moderate variance instead of compensating in the weights."
    )


_TWO_PI = np.float32(2.0 * np.pi)


def standard_normal(rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """Fill the 1-D float32 array `out` with independent N(0, 1) values (Box-Muller, module docstring) and
    return it: for n values, ceil(n / 2) uniforms U then as many V from `rng`; out[:ceil(n/2)] = R cos T,
    the rest R sin T."""
    n = out.size
    half = (n + 1) // 2
    r = rng.random(half, dtype=np.float32)
    t = rng.random(half, dtype=np.float32)
    np.subtract(np.float32(1.0), r, out=r)  # (0, 1]: no log(0)
    np.log(r, out=r)
    np.multiply(r, np.float32(-2.0), out=r)
    np.sqrt(r, out=r)
    np.multiply(t, _TWO_PI, out=t)
    head, tail = out[:half], out[half:]
    np.cos(t, out=head)
    np.multiply(head, r, out=head)
    if tail.size:
        np.sin(t[:tail.size], out=tail)
        np.multiply(tail, r[:tail.size], out=tail)
    return out


def _ziggurat(rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """numpy's float32 standard normals (ziggurat) into `out`."""
    return rng.standard_normal(dtype=np.float32, out=out)


def _fill(out: np.ndarray, std: float, distribution: str, rng: np.random.Generator, normal) -> None:
    """Fill the 1-D float32 array `out` in place; `normal(rng, out)` fills standard normals."""
    if distribution == "untruncated_normal":
        normal(rng, out)
        out *= np.float32(std)
    elif distribution == "truncated_normal":
        normal(rng, out)
        # Redraw only the rejected entries, in index order (same stream as redrawing `out[bad]` over
        # the whole array, without a full pass per round).
        # (x > 2) | (x < -2) on one-byte masks: about 1.5x faster than |x| > 2, which makes a float copy
        idx = np.flatnonzero((out > _BOUND) | (out < -_BOUND))
        while idx.size:
            new = normal(rng, np.empty(idx.size, dtype=np.float32))
            ok = (new <= _BOUND) & (new >= -_BOUND)
            out[idx[ok]] = new[ok]
            idx = idx[~ok]
        out /= np.float32(_TRUNC_STD)
        out *= np.float32(std)
    else:  # uniform
        out[:] = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), out.size)
        out *= np.float32(std)


def _orthogonal(shape, var, rng):
    if len(shape) < 2:
        return sample(shape, var, "truncated_normal", rng)
    rows = int(np.prod(shape[:-1]))
    cols = shape[-1]
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    q = q[:rows, :cols]
    q *= np.sqrt(var * q.size / max(float(np.sum(q * q)), 1e-30))
    return q.reshape(shape).astype(np.float32)
