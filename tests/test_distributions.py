"""Weight drawing: variance targets, truncation, determinism (calls, thread counts, chunk boundaries)."""

import numpy as np
import pytest

from autoinit_tf import distributions as D

CHUNK = D.CHUNK
TRUNC_BOUND = 2.0 / D._TRUNC_STD  # |x| <= 2 std of the underlying normal, in units of the target std


@pytest.mark.parametrize("distribution", D.DISTRIBUTIONS)
@pytest.mark.parametrize("shape", [(256, 512), (CHUNK + 12345,)])
def test_variance_target(distribution, shape):
    var = 0.037
    w = D.sample(shape, var, distribution, D.rng_for(0, "v"))
    assert w.shape == shape and w.dtype == np.float32
    n = w.size
    if distribution == "orthogonal" and len(shape) >= 2:
        assert np.mean(w.astype(np.float64) ** 2) == pytest.approx(var, rel=1e-5)  # exact by construction
    else:
        # standard error of the sample variance is below 2 var / sqrt(n) for all three (kurtosis <= 3)
        assert np.var(w.astype(np.float64)) == pytest.approx(var, rel=8.0 / np.sqrt(n))
        assert abs(float(np.mean(w))) < 6.0 * np.sqrt(var / n)


def test_orthogonal_is_orthogonal():
    w = D.sample((64, 128), 1.0 / 64, "orthogonal", D.rng_for(1, "o")).astype(np.float64)
    g = w @ w.T
    np.testing.assert_allclose(g, np.eye(64) * g[0, 0], atol=1e-5)


@pytest.mark.parametrize("n", [1000, CHUNK + 1, 3 * CHUNK])
def test_truncation_bound(n):
    std = 0.3
    w = D.sample((n,), std**2, "truncated_normal", D.rng_for(2, "t"))
    assert np.max(np.abs(w)) <= np.float32(TRUNC_BOUND * std) * (1 + 1e-6)
    # the bound is reached (the tail is not cut short): a few percent of entries lie beyond 1.8 std
    assert np.mean(np.abs(w) > 1.8 / D._TRUNC_STD * std) > 0.005


def test_uniform_bound():
    w = D.sample((CHUNK + 7,), 4.0, "uniform", D.rng_for(3, "u"))
    assert np.max(np.abs(w)) <= np.float32(2.0 * np.sqrt(3.0)) * (1 + 1e-6)


@pytest.mark.parametrize("distribution", D.DISTRIBUTIONS)
@pytest.mark.parametrize("n", [37, CHUNK, 2 * CHUNK + 5])
def test_deterministic_across_calls(distribution, n):
    shape = (n // 8, 8) if n % 8 == 0 else (n,)
    a = D.sample(shape, 0.5, distribution, D.rng_for(7, "layer/kernel"))
    b = D.sample(shape, 0.5, distribution, D.rng_for(7, "layer/kernel"))
    assert np.array_equal(a, b)
    c = D.sample(shape, 0.5, distribution, D.rng_for(8, "layer/kernel"))
    d = D.sample(shape, 0.5, distribution, D.rng_for(7, "layer/bias"))
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


@pytest.mark.parametrize("distribution", ["truncated_normal", "untruncated_normal", "uniform"])
def test_independent_of_thread_count(distribution):
    n = 5 * CHUNK + 333
    ref = D.sample((n,), 1.0, distribution, D.rng_for(0, "k"), workers=1)
    for workers in (2, 3, 8, None):
        got = D.sample((n,), 1.0, distribution, D.rng_for(0, "k"), workers=workers)
        assert np.array_equal(ref, got), workers


def test_chunk_boundaries():
    # chunks hold different streams (no repeated block), and each chunk is a full, well-scaled draw
    n = 3 * CHUNK + 10
    w = D.sample((n,), 1.0, "truncated_normal", D.rng_for(0, "chunks"), workers=2)
    blocks = [w[i * CHUNK:(i + 1) * CHUNK] for i in range(3)] + [w[3 * CHUNK:]]
    assert len(blocks[-1]) == 10
    for i in range(3):
        assert not np.array_equal(blocks[i], blocks[i + 1][: len(blocks[i])])
        assert np.var(blocks[i].astype(np.float64)) == pytest.approx(1.0, rel=0.01)
    # every entry written, the tail chunk included (float32 normals give an exact 0 only rarely)
    assert np.all(np.isfinite(w)) and np.count_nonzero(w == 0.0) < 20
    assert np.max(np.abs(blocks[-1])) <= TRUNC_BOUND * (1 + 1e-6)
    # entries just either side of each boundary are not correlated copies
    for b in (CHUNK, 2 * CHUNK, 3 * CHUNK):
        assert w[b - 1] != w[b]
    # sizes at and just past a chunk boundary (one stream, one full chunk + a 1-value chunk, two
    # full chunks) are well formed and do not depend on the thread count
    for size in (CHUNK, CHUNK + 1, 2 * CHUNK):
        v = D.sample((size,), 1.0, "truncated_normal", D.rng_for(0, "edge"))
        assert v.shape == (size,) and np.all(np.isfinite(v)) and np.max(np.abs(v)) <= TRUNC_BOUND * (1 + 1e-6)
        assert np.array_equal(v, D.sample((size,), 1.0, "truncated_normal", D.rng_for(0, "edge"), workers=1))


def test_large_draws_advance_the_generator():
    rng = D.rng_for(0, "shared")
    a = D.sample((2 * CHUNK,), 1.0, "truncated_normal", rng)
    b = D.sample((2 * CHUNK,), 1.0, "truncated_normal", rng)
    assert not np.array_equal(a, b)


def test_small_draws_match_a_single_stream():
    # tensors of at most CHUNK entries come from the key's generator directly: redrawing the rejected
    # entries in index order gives the same values as the plain per-round rejection loop
    rng = D.rng_for(5, "small")
    w = D.sample((4096,), 1.0, "truncated_normal", rng)
    ref_rng = D.rng_for(5, "small")
    ref = ref_rng.standard_normal(4096, dtype=np.float32)
    bad = np.abs(ref) > 2.0
    while bad.any():
        ref[bad] = ref_rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(ref) > 2.0
    ref /= np.float32(D._TRUNC_STD)
    assert np.array_equal(w, ref)


def test_large_draws_are_box_muller_chunks():
    # above CHUNK entries, chunk i holds Box-Muller normals from child generator i (SFC64 seeded from the
    # parent's 128-bit draw), whatever the thread count
    n = 2 * CHUNK + 5
    w = D.sample((n,), 1.0, "untruncated_normal", D.rng_for(6, "large"), workers=2)
    rng = D.rng_for(6, "large")
    entropy = [int(v) for v in rng.integers(0, 1 << 32, size=4, dtype=np.uint64)]
    children = np.random.SeedSequence(entropy).spawn(3)
    for i, ss in enumerate(children):
        part = w[i * CHUNK:(i + 1) * CHUNK]
        ref = _box_muller(np.random.Generator(np.random.SFC64(ss)), part.size)
        np.testing.assert_allclose(part, ref, rtol=2e-6, atol=2e-6)


def _box_muller(rng, n):
    """A reference written for the test: float32 uniforms u, v (u's first), then r cos(2 pi v) for the
    first ceil(n / 2) values and r sin(2 pi v) after, r = sqrt(-2 ln(1 - u))."""
    half = (n + 1) // 2
    u = rng.random(half, dtype=np.float32)
    v = rng.random(half, dtype=np.float32)
    r = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u))
    t = v * np.float32(2.0 * np.pi)
    return np.concatenate([r * np.cos(t), (r * np.sin(t))[: n - half]]).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 7, 4096, CHUNK + 3])
def test_standard_normal_matches_its_reference(n):
    got = D.standard_normal(D.rng_for(4, "bm"), np.empty(n, dtype=np.float32))
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, _box_muller(D.rng_for(4, "bm"), n), rtol=2e-6, atol=2e-6)


def test_standard_normal_is_standard_normal():
    from scipy import stats

    n = 2_000_001  # odd: the last value is a cosine without its sine
    z = D.standard_normal(D.rng_for(9, "dist"), np.empty(n, dtype=np.float32)).astype(np.float64)
    assert np.all(np.isfinite(z))
    # Kolmogorov-Smirnov against scipy's normal CDF: the statistic's 1e-6 quantile on 2e6 values is ~0.0019
    assert stats.kstest(z, "norm").statistic < 0.002
    se = 1.0 / np.sqrt(n)
    assert abs(z.mean()) < 6 * se
    assert abs(z.var() - 1.0) < 6 * np.sqrt(2.0) * se
    assert abs(np.mean(z**4) - 3.0) < 6 * np.sqrt(96.0) * se  # Var(z^4) = 105 - 9
    # the cosine and sine halves of the same pairs are uncorrelated, and so are their squares
    half = (n + 1) // 2
    a, b = z[: n - half], z[half:]
    assert abs(np.mean(a * b)) < 6 * se * np.sqrt(2)
    assert abs(np.corrcoef(a * a, b * b)[0, 1]) < 6 * se * np.sqrt(2)
    # the tail is there up to the float32 uniforms' limit sqrt(48 ln 2) = 5.77
    assert np.mean(np.abs(z) > 3.0) == pytest.approx(2 * stats.norm.sf(3.0), rel=0.1)
    assert np.max(np.abs(z)) <= np.sqrt(48 * np.log(2.0)) + 1e-5


def test_unknown_distribution():
    with pytest.raises(ValueError, match="Unknown distribution"):
        D.sample((3,), 1.0, "cauchy", D.rng_for(0, "x"))


def test_scalar_and_zero_variance():
    assert D.sample((), 1.0, "truncated_normal", D.rng_for(0, "s")).shape == ()
    assert not np.any(D.sample((10, 10), 0.0, "uniform", D.rng_for(0, "z")))
