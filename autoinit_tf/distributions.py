"""Drawing weight tensors with an exact target variance.

Every distribution here yields i.i.d. entries (or, for ``orthogonal``, an orthogonal matrix rescaled)
whose empirical variance targets ``var``:

- ``truncated_normal``: N(0, (std / 0.87962566)^2) truncated at two of its standard deviations, which
  has variance exactly std^2 (the constant is the std of a standard normal truncated at +-2, as in
  Keras' VarianceScaling).
- ``untruncated_normal``: N(0, var).
- ``uniform``: U(-sqrt(3 var), sqrt(3 var)).
- ``orthogonal``: a (fan_in, fan_out) orthogonal matrix from the QR decomposition of a Gaussian matrix
  (sign-corrected), scaled so that the mean squared entry is var.
"""

from __future__ import annotations

import zlib

import numpy as np

DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform", "orthogonal")
_TRUNC_STD = 0.87962566103423978


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


def sample(shape, var: float, distribution: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 array of `shape` whose entries have variance `var` under `distribution`."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape)) if shape else 1
    std = float(np.sqrt(max(var, 0.0)))
    if distribution == "untruncated_normal":
        out = rng.standard_normal(n, dtype=np.float32)
    elif distribution == "truncated_normal":
        out = rng.standard_normal(n, dtype=np.float32)
        bad = np.abs(out) > 2.0
        while bad.any():
            out[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
            bad = np.abs(out) > 2.0
        out /= np.float32(_TRUNC_STD)
    elif distribution == "uniform":
        out = rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), n).astype(np.float32)
    elif distribution == "orthogonal":
        return _orthogonal(shape, var, rng)
    else:
        check_distribution(distribution)
    out *= np.float32(std)
    return out.reshape(shape)


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
