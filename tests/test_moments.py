"""Moment maths against closed forms and scipy quadrature."""

import math

import keras
import numpy as np
import pytest
from scipy import integrate, stats

from autoinit_tf.moments import (
    Moments,
    elementwise_moments,
    max_expectations,
    max_of_gaussians,
    max_order_expectations,
    mix,
    standard_normal_quantiles,
)
from autoinit_tf.rules.activation import (
    ACTIVATION_KINKS,
    VECTOR_ACTIVATIONS,
    function_moments,
    numpy_function,
    softmax_moments,
)

pytestmark = pytest.mark.core

# float64 evaluation on TensorFlow/torch; JAX runs float32 by default, which limits the precision.
TOL = 1e-6 if keras.backend.backend() != "jax" else 2e-5


def tabulated(fn, lo=-40.0, hi=40.0, n=2_000_001, kinks=()):
    """The real Keras function tabulated once in float64 on a dense grid (kinks on grid points)."""
    grid = np.unique(np.concatenate([np.linspace(lo, hi, n), np.asarray(kinks, dtype=np.float64)]))
    values = numpy_function(fn)(grid)
    return lambda x: float(np.interp(x, grid, values))


def quad_moments(f, mean, var, kinks=()):
    s = math.sqrt(var)
    pts = sorted({mean - 12 * s, *[k for k in kinks if mean - 12 * s < k < mean + 12 * s], mean + 12 * s})
    e1 = e2 = 0.0
    for a, b in zip(pts[:-1], pts[1:]):
        e1 += integrate.quad(lambda x: f(x) * stats.norm.pdf(x, mean, s), a, b, epsabs=1e-13, epsrel=1e-12,
                             limit=200)[0]
        e2 += integrate.quad(lambda x: f(x) ** 2 * stats.norm.pdf(x, mean, s), a, b, epsabs=1e-13,
                             epsrel=1e-12, limit=200)[0]
    return e1, e2 - e1 * e1


def test_relu_standard_normal():
    m = function_moments("relu", Moments(0, 1))
    assert m.mean == pytest.approx(0.398942, abs=1e-6)
    assert m.var == pytest.approx(0.340845, abs=1e-6)


def test_elu_standard_normal_and_n02():
    m = function_moments("elu", Moments(0, 1))
    assert m.mean == pytest.approx(0.160521, abs=1e-6)
    assert m.var == pytest.approx(0.619179, abs=1e-6)
    m2 = function_moments("elu", Moments(0, 2))
    assert m2.mean == pytest.approx(0.277981, abs=1e-6)
    assert m2.var == pytest.approx(1.122841, abs=1e-6)


def _elementwise_activation_names():
    names = []
    for name in dir(keras.activations):
        fn = getattr(keras.activations, name)
        if name.startswith("_") or not callable(fn) or name in ("get", "serialize", "deserialize"):
            continue
        if name in VECTOR_ACTIVATIONS or name in ("linear", "threshold"):
            continue
        try:
            y = np.asarray(keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(np.linspace(-3, 3, 8)))))
        except Exception:  # noqa: BLE001 - needs extra arguments
            continue
        if y.shape == (8,):
            names.append(name)
    return sorted(set(names))


ACTIVATIONS = _elementwise_activation_names()


def test_at_least_twenty_activations_found():
    assert len(ACTIVATIONS) >= 20, ACTIVATIONS


_TABLES = {}


def _table(name, kinks):
    if name not in _TABLES:
        _TABLES[name] = tabulated(keras.activations.get(name), kinks=kinks)
    return _TABLES[name]


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("mean,var", [(0.0, 1.0), (0.5, 0.3), (-1.2, 2.5)])
def test_activation_against_scipy_quad(name, mean, var):
    fn = keras.activations.get(name)
    kinks = ACTIVATION_KINKS.get(name, ())
    ref_mean, ref_var = quad_moments(_table(name, kinks), mean, var, kinks)
    got = function_moments(fn, Moments(mean, var))
    assert got.mean == pytest.approx(ref_mean, rel=TOL, abs=TOL * 1e-2)
    assert got.var == pytest.approx(ref_var, rel=TOL, abs=TOL * 1e-2)


def test_user_activation_without_kinks_is_still_accurate():
    def cube_tanh(x):
        return keras.ops.tanh(x) ** 3

    got = function_moments(cube_tanh, Moments(0.3, 0.8))
    ref = quad_moments(lambda x: math.tanh(x) ** 3, 0.3, 0.8)
    assert got.mean == pytest.approx(ref[0], rel=1e-5)
    assert got.var == pytest.approx(ref[1], rel=1e-5)


@pytest.mark.parametrize("k", [2, 4, 9, 25])
@pytest.mark.backend_free
def test_max_of_gaussians_against_quadrature(k):
    m = Moments(0.7, 2.0)
    s = math.sqrt(2.0)
    dens = lambda z: k * stats.norm.pdf(z) * stats.norm.cdf(z) ** (k - 1)  # noqa: E731
    e1 = integrate.quad(lambda z: (0.7 + s * z) * dens(z), -12, 12, epsabs=1e-12)[0]
    e2 = integrate.quad(lambda z: (0.7 + s * z) ** 2 * dens(z), -12, 12, epsabs=1e-12)[0]
    got = max_of_gaussians(k, m)
    assert got.mean == pytest.approx(e1, rel=1e-8)
    assert got.var == pytest.approx(e2 - e1 * e1, rel=1e-7)


@pytest.mark.parametrize("k,mean,var", [(2, 0.0, 1.0), (10, 0.3, 0.5), (100, 0.0, 2.0), (1000, 0.0, 1.0)])
@pytest.mark.backend_free
def test_softmax_moments_against_monte_carlo(k, mean, var):
    rng = np.random.default_rng(0)
    x = rng.normal(mean, math.sqrt(var), size=(max(200_000 // k, 400), k))
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    got = softmax_moments(Moments(mean, var), k)
    assert got.mean == pytest.approx(1.0 / k)
    se = p.var() * math.sqrt(2.0 / p.size) * 10
    assert got.var == pytest.approx(p.var(), rel=0.03, abs=se)


@pytest.mark.backend_free
def test_softmax_two_classes_is_exact_sigmoid():
    got = softmax_moments(Moments(0.2, 1.5), 2)
    ref = quad_moments(lambda d: 1.0 / (1.0 + math.exp(-d)), 0.0, 3.0)
    assert got.var == pytest.approx(ref[1], rel=1e-8)


def test_between_channel_part_matches_two_level_monte_carlo():
    rng = np.random.default_rng(0)
    offsets = (standard_normal_quantiles(4000) * math.sqrt(0.4))[None, :]
    x = 0.3 + offsets + rng.normal(0.0, math.sqrt(0.6), size=(400, 4000))
    y = np.maximum(x, 0.0)
    got = function_moments("relu", Moments(0.3, 1.0, 0.4))
    assert got.mean == pytest.approx(y.mean(), rel=0.01)
    assert got.var == pytest.approx(y.var(), rel=0.01)
    assert got.between == pytest.approx(y.mean(axis=0).var(), rel=0.05)


@pytest.mark.backend_free
def test_mix_keeps_component_offsets():
    m = mix([(1.0, Moments(0.0, 1.0)), (3.0, Moments(2.0, 1.0))])
    assert m.mean == pytest.approx(1.5)
    assert m.var == pytest.approx(0.25 * 1 + 0.75 * 5 - 1.5**2)
    assert m.between == pytest.approx(0.75)


@pytest.mark.backend_free
def test_quantiles_match_reference_values():
    q = standard_normal_quantiles(256)
    assert q.mean() == pytest.approx(0.0, abs=1e-12)
    assert q.var() == pytest.approx(0.995, abs=1e-3)


@pytest.mark.backend_free
def test_moments_rejects_negative_variance():
    with pytest.raises(ValueError):
        Moments(0.0, -1.0)


@pytest.mark.backend_free
def test_relu_channel_closed_form_matches_quadrature():
    from autoinit_tf.rules.activation import relu_channel_moments

    m = Moments.from_channels(np.array([0.3, -1.0, 0.0, 2.0, 1.0]), np.array([1.0, 0.5, 0.0, 2.0, 0.0]))
    closed = relu_channel_moments(m)
    quad = elementwise_moments(lambda x: np.maximum(x, 0.0), m, (0.0,))
    np.testing.assert_allclose(closed.ch_mean, quad.ch_mean, atol=1e-12)
    np.testing.assert_allclose(closed.ch_var, quad.ch_var, atol=1e-12)


@pytest.mark.backend_free
def test_relu_element_maps_closed_form_matches_quadrature():
    from autoinit_tf.rules.activation import relu_channel_moments

    rng = np.random.default_rng(0)
    el_mean, el_var = rng.normal(0.0, 1.0, (5, 4, 3)), rng.uniform(0.0, 2.0, (5, 4, 3))
    el_var[0, 0] = 0.0
    m = Moments.from_elements(el_mean, el_var)
    closed = relu_channel_moments(m)
    quad = elementwise_moments(lambda x: np.maximum(x, 0.0), m, (0.0,))  # per distinct element, coarse nodes
    assert closed.el_mean.shape == el_mean.shape
    np.testing.assert_allclose(closed.el_mean, quad.el_mean, atol=1e-7)
    np.testing.assert_allclose(closed.el_var, quad.el_var, atol=1e-7)
    np.testing.assert_allclose(closed.ch_var, quad.ch_var, atol=1e-7)


@pytest.mark.parametrize("case", [(0.0, 1.0, 0.0, 0.01), (0.3, 0.5, -0.2, 0.04), (-1.0, 2.0, 0.5, 1.0),
                                  (0.5, 1.0, 0.1, 0.0), (1.0, 0.0, 0.0, 0.3)])
@pytest.mark.backend_free
def test_relu_of_an_activation_plus_a_gaussian_against_scipy(case):
    from autoinit_tf.moments import relu_of_sum_expectations

    pm, pv, rm, rv = case
    ps, rs = math.sqrt(pv), math.sqrt(rv)

    def inner(k, m):  # E[relu(m + R)^k] = P(Y > 0) E[Y^k | Y > 0], Y = m + R, by scipy's truncated normal
        if rs == 0:
            return max(m + rm, 0.0) ** k
        lo = (0.0 - m - rm) / rs
        return stats.norm.sf(lo) * stats.truncnorm.moment(k, lo, np.inf, loc=m + rm, scale=rs)

    def ref(k):
        if ps == 0:
            return inner(k, max(pm, 0.0))
        return integrate.quad(lambda p: inner(k, max(p, 0.0)) * stats.norm.pdf(p, pm, ps), pm - 12 * ps,
                              pm + 12 * ps, points=[0.0], limit=200, epsabs=1e-11)[0]

    e1, e2 = relu_of_sum_expectations(lambda v: np.maximum(v, 0.0), (0.0,), [pm], [pv], [rm], [rv])
    assert e1[0] == pytest.approx(ref(1), rel=1e-3)
    assert e2[0] == pytest.approx(ref(2), rel=1e-3)


@pytest.mark.backend_free
def test_bivariate_normal_cdf_against_scipy():
    """Owen's T form of Phi2 against scipy's multivariate normal CDF, zeros and signs of both arguments."""
    from autoinit_tf.moments import bivariate_normal_cdf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=60) * 2.0, rng.normal(size=60) * 2.0
    rho = rng.uniform(-0.999, 0.999, size=60)
    x[:12] = 0.0
    y[6:18] = 0.0
    got = bivariate_normal_cdf(x, y, rho)
    ref = [stats.multivariate_normal([0.0, 0.0], [[1.0, r], [r, 1.0]]).cdf([a, b]) for a, b, r in zip(x, y, rho)]
    np.testing.assert_allclose(got, ref, atol=1e-7)


@pytest.mark.parametrize("case", [(0.0, 1.0, 0.0, 1.0), (0.0, 1.0, 0.0, 0.01), (0.3, 1.44, -0.5, 0.01),
                                  (-1.0, 0.25, 2.0, 9.0), (1.5, 0.09, 0.0, 0.49), (-3.0, 1.0, -2.0, 0.04),
                                  (2.0, 1.0, -8.0, 1e-6), (0.0063, 263.4, -6.658, 1.95e-5)])
@pytest.mark.backend_free
def test_relu_of_relu_plus_a_gaussian_closed_form_against_a_double_integral(case):
    """relu(relu(P) + R) in closed form (a truncated bivariate normal) against scipy's 2-D quadrature of
    the integrand over (P, R), to 1e-8 relative: zero means (Phi2(0, 0)), narrow R (rho near 1), tails. The
    last case, R nearly constant against a wide P, is where the 4-node panels were 2% off (3.602 for 3.685)."""
    from autoinit_tf.moments import relu_of_relu_sum_expectations, relu_of_sum_expectations

    pm, pv, rm, rv = case
    ps, rs = math.sqrt(pv), math.sqrt(rv)

    def ref(k):  # R's Gaussian integrated in closed form per P would reuse the formula under test: 2-D quad
        def inner(p):
            f = lambda r: max(max(p, 0.0) + r, 0.0) ** k * stats.norm.pdf(r, rm, rs)
            lo = -max(p, 0.0)  # the kink in r
            pts = [lo] if rm - 12 * rs < lo < rm + 12 * rs else None
            return integrate.quad(f, rm - 12 * rs, rm + 12 * rs, points=pts, limit=200, epsabs=1e-14,
                                  epsrel=1e-11)[0] * stats.norm.pdf(p, pm, ps)
        return integrate.quad(inner, pm - 12 * ps, pm + 12 * ps, points=[0.0] if abs(pm) < 12 * ps else None,
                              limit=200, epsabs=1e-14, epsrel=1e-11)[0]

    e1, e2 = relu_of_relu_sum_expectations(np.array([pm]), np.array([ps]), np.array([rm]), np.array([rs]))
    assert e1[0] == pytest.approx(ref(1), rel=1e-8, abs=1e-13)
    assert e2[0] == pytest.approx(ref(2), rel=1e-8, abs=1e-13)
    # and relu_of_sum_expectations takes this path for the ReLU
    f1, f2 = relu_of_sum_expectations(lambda v: np.maximum(v, 0.0), (0.0,), [pm], [pv], [rm], [rv])
    assert (f1[0], f2[0]) == (e1[0], e2[0])


# Activations for the residual-sum and max-pool integrals: (vectorised fn, scalar fn, kinks). "floor" is
# the constant -0.5 below its kink (the closed-form part with a nonzero constant), "relu6" flat below its
# first kink with a second one above, "elu" and "leaky" never flat (the whole line is integrated).
PIECEWISE = {
    "relu": (lambda v: np.maximum(v, 0.0), lambda x: max(x, 0.0), (0.0,)),
    "relu6": (lambda v: np.clip(v, 0.0, 6.0), lambda x: min(max(x, 0.0), 6.0), (0.0, 6.0)),
    "floor": (lambda v: np.maximum(v, -0.5), lambda x: max(x, -0.5), (-0.5,)),
    "elu": (lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0.0))), lambda x: x if x > 0 else math.expm1(x), (0.0,)),
    "leaky": (lambda v: np.where(v > 0, v, 0.2 * v), lambda x: x if x > 0 else 0.2 * x, (0.0,)),
}


@pytest.mark.backend_free
def test_flat_below_first_kink():
    from autoinit_tf.moments import flat_below_first_kink

    assert flat_below_first_kink(PIECEWISE["relu"][0], (0.0,)) == ((0.0, 0.0), ())
    assert flat_below_first_kink(PIECEWISE["relu6"][0], (6.0, 0.0)) == ((0.0, 0.0), (6.0,))
    assert flat_below_first_kink(PIECEWISE["floor"][0], (-0.5,)) == ((-0.5, -0.5), ())
    assert flat_below_first_kink(PIECEWISE["elu"][0], (0.0,)) == (None, (0.0,))
    assert flat_below_first_kink(PIECEWISE["leaky"][0], (0.0,)) == (None, (0.0,))
    assert flat_below_first_kink(None, (0.0,)) == (None, (0.0,))
    assert flat_below_first_kink(PIECEWISE["relu"][0], ()) == (None, ())


@pytest.mark.parametrize("name", sorted(PIECEWISE))
@pytest.mark.parametrize("case", [(0.0, 1.0, 0.0, 0.01), (0.3, 0.5, -0.2, 0.04), (-1.0, 2.0, 0.5, 1.0),
                                  (4.0, 9.0, -1.0, 0.25), (-3.0, 1.0, 0.2, 0.1)])
@pytest.mark.backend_free
def test_activation_plus_a_gaussian_then_relu_for_other_activations(name, case):
    """relu(fn(P) + R) for activations flat below their first kink (closed-form part, nonzero constant,
    second kink) and never flat (whole line), against scipy quad of the truncated-normal moments.
    Tolerance 1e-3: where R is narrow (sd 0.1 against 1), its smoothed kink falls inside a 4-node panel
    (measured 1e-4 to 3e-4 relative, as before the closed-form part)."""
    from autoinit_tf.moments import relu_of_sum_expectations

    vec, scalar, kinks = PIECEWISE[name]
    pm, pv, rm, rv = case
    ps, rs = math.sqrt(pv), math.sqrt(rv)

    def inner(k, m):
        if rs == 0:
            return max(m + rm, 0.0) ** k
        lo = (0.0 - m - rm) / rs
        return stats.norm.sf(lo) * stats.truncnorm.moment(k, lo, np.inf, loc=m + rm, scale=rs)

    def ref(k):
        pts = [p for p in kinks if pm - 12 * ps < p < pm + 12 * ps]
        return integrate.quad(lambda p: inner(k, scalar(p)) * stats.norm.pdf(p, pm, ps), pm - 12 * ps,
                              pm + 12 * ps, points=pts or None, limit=200, epsabs=1e-11)[0]

    e1, e2 = relu_of_sum_expectations(vec, kinks, [pm, pm], [pv, pv], [rm, rm], [rv, rv])
    assert e1[0] == pytest.approx(ref(1), rel=1e-3, abs=1e-9)
    assert e2[0] == pytest.approx(ref(2), rel=1e-3, abs=1e-9)
    assert e1[1] == e1[0] and e2[1] == e2[0]


@pytest.mark.parametrize("name", sorted(PIECEWISE))
@pytest.mark.parametrize("case", [5, 6, 7])
@pytest.mark.backend_free
def test_max_on_the_common_grid_for_other_activations(name, case):
    """The common-grid max (coarse windows with spreads within 2x) of g(max) for g flat below a kink
    (closed-form part v^p F_M(k)) or not, against scipy quad of the density of the max."""
    vec, scalar, kinks = PIECEWISE[name]
    mu, var = MAX_CASES[case]
    s = np.sqrt(var)
    r1, r2 = _max_density_moments(scalar, mu, s, kinks)
    e1, e2 = max_expectations(vec, np.array([mu, mu]), np.array([var, var]), kinks, coarse=True)
    assert e1[0] == pytest.approx(r1, rel=1e-5, abs=1e-7)
    assert e2[0] == pytest.approx(r2, rel=1e-5, abs=1e-7)
    assert e1[1] == e1[0]


@pytest.mark.backend_free
def test_relu_matched_pre_reproduces_the_moments():
    from autoinit_tf.rules.activation import relu_channel_moments, relu_matched_pre

    target = Moments.from_channel_second(np.array([0.05, 0.4, 1.0, 2.0, 0.0]), np.array([0.02, 0.3, 1.5, 4.5, 0.0]))
    q = relu_matched_pre(target)
    back = relu_channel_moments(q)
    np.testing.assert_allclose(back.ch_mean, target.ch_mean, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(back.ch_second, target.ch_second, rtol=1e-4, atol=1e-9)


@pytest.mark.backend_free
def test_distinct_rows_groups_rows_equal_to_float32_rounding():
    from autoinit_tf.moments import distinct_rows

    base = np.array([[1.0, 2.0], [1.0, 3.0], [1e-12, 2.0], [0.0, 2.0]])
    noisy = base * (1.0 + 3e-8)  # float32-level differences
    first, inverse = distinct_rows(np.concatenate([base, noisy]), np.ones((8, 1)))
    assert len(first) == 4  # each row and its noisy copy share a group
    np.testing.assert_array_equal(inverse[:4], inverse[4:])
    assert len(set(inverse[:4])) == 4  # 1e-12 stays distinct from 0 (a relative resolution per entry)
    np.testing.assert_array_equal(np.concatenate([base, noisy])[first][inverse[:4]], base)
    # a difference of 1e-5 relative is kept apart
    f2, _ = distinct_rows(np.array([1.0, 1.0 + 1e-5]))
    assert len(f2) == 2


def _max_density_moments(g, mu, s, points=()):
    """E[g(M)], E[g(M)^2] for M the max of independent N(mu_i, s_i^2), by scipy quad of the density
    sum_i phi_i(x) prod_{j != i} Phi_j(x)."""

    def pdf(x, m, sd):
        return math.exp(-0.5 * ((x - m) / sd) ** 2) / (sd * math.sqrt(2.0 * math.pi))

    def cdf(x, m, sd):
        return 0.5 * math.erfc(-(x - m) / (sd * math.sqrt(2.0)))

    def dens(x):
        cdfs = [cdf(x, m, sd) for m, sd in zip(mu, s)]
        total = 0.0
        for i in range(len(mu)):
            term = pdf(x, mu[i], s[i])
            for j in range(len(mu)):
                if j != i:
                    term *= cdfs[j]
            total += term
        return total

    lo, hi = min(mu) - 12 * max(s), max(mu) + 12 * max(s)
    pts = sorted(p for p in set(points) | set(mu) if lo < p < hi)
    kw = dict(points=pts, limit=500, epsabs=1e-13, epsrel=1e-12)
    return (integrate.quad(lambda x: g(x) * dens(x), lo, hi, **kw)[0],
            integrate.quad(lambda x: g(x) ** 2 * dens(x), lo, hi, **kw)[0])


# Independent scalar references for the Keras activations used below (gelu: exact erf form).
SCALAR = {
    "identity": lambda x: x,
    "relu": lambda x: max(x, 0.0),
    "tanh": math.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
}


MAX_CASES = [
    ([0.3, -0.2, 1.0, 0.5], [1.0, 0.5, 2.0, 0.3]),
    ([2.0, 2.1, 1.9, 2.05], [0.09, 0.1, 0.05, 0.2]),
    ([-1.0, 0.0, 3.0, -2.0], [1.0, 0.01, 0.04, 4.0]),
    ([0.0, 0.1], [1.0, 1e-4]),
    ([-0.4, 0.2, 0.1, -0.3, 0.0, 0.5, -1.0, 0.3, 0.2], [0.5, 1.0, 0.7, 1.2, 0.9, 0.4, 2.0, 1.0, 0.6]),
    # spreads within 2x of each other: the coarse path integrates f_M on one grid per window
    ([0.3, -0.2, 1.0, 0.5], [1.0, 0.8, 1.5, 0.6]),
    ([-3.0, 0.0, 2.0, 5.0], [1.0, 2.25, 0.64, 1.44]),
    ([0.4, 0.41, 0.39, 0.4], [0.01, 0.012, 0.009, 0.011]),
]


@pytest.mark.parametrize("fn_name", ["identity", "relu", "tanh", "gelu"])
@pytest.mark.parametrize("case", range(len(MAX_CASES)))
def test_max_of_independent_gaussians_against_scipy_quad(fn_name, case):
    """E[f(max_i X_i)] for independent non-identical Gaussians, fine and coarse nodes."""
    mu, var = MAX_CASES[case]
    s = np.sqrt(var)
    g, kinks = SCALAR[fn_name], ACTIVATION_KINKS.get(fn_name, ())
    fn = None if fn_name == "identity" else numpy_function(keras.activations.get(fn_name))
    r1, r2 = _max_density_moments(g, mu, s, kinks)
    for coarse, tol in ((False, 1e-7), (True, 1e-5)):
        e1, e2 = max_expectations(fn, np.array([mu]), np.array([var]), kinks, coarse=coarse)
        assert e1[0] == pytest.approx(r1, rel=tol, abs=tol)
        assert e2[0] == pytest.approx(r2, rel=tol, abs=tol)


CONSTANT_CASES = [  # windows with constant entries (variance 0: a zero padding's border), spreads within 2x
    ([0.0, 0.3, -0.2, 0.5], [0.0, 1.0, 0.8, 1.5]),
    ([0.0, 0.0, 0.4, 0.1], [0.0, 0.0, 0.25, 0.4]),
    ([1.5, -2.0, 0.2, 0.0], [0.0, 1.0, 0.6, 0.0]),   # a constant above the random entries' means
    ([0.0, 0.0, 0.0, -3.0], [0.0, 0.0, 1.0, 2.0]),
]


@pytest.mark.parametrize("fn_name", ["identity", "relu", "tanh"])
@pytest.mark.parametrize("case", range(len(CONSTANT_CASES)))
def test_max_with_constant_entries_against_scipy_quad(fn_name, case):
    """E[f(max)] of windows mixing constants and Gaussians: M >= C (the largest constant) with the point mass
    f(C)^p prod_j Phi_j(C) there, and the random entries' density above it (scipy). The identity and the ReLU
    stay on the coarse common grid (integrated against the CDF, the constants' steps 1 from C on); tanh takes
    the per-entry path."""
    from autoinit_tf import moments

    mu, var = CONSTANT_CASES[case]
    const = [m for m, v in zip(mu, var) if v == 0.0]
    rand = [(m, math.sqrt(v)) for m, v in zip(mu, var) if v > 0.0]
    top = max(const)
    g, kinks = SCALAR[fn_name], ACTIVATION_KINKS.get(fn_name, ())
    fn = None if fn_name == "identity" else numpy_function(keras.activations.get(fn_name))

    def dens(x):
        return sum(stats.norm.pdf(x, m, sd) * math.prod(stats.norm.cdf(x, m2, s2) for k, (m2, s2) in enumerate(rand) if k != i)
                   for i, (m, sd) in enumerate(rand))

    mass = math.prod(stats.norm.cdf(top, m, sd) for m, sd in rand)
    hi = max(m for m, _ in rand) + 12 * max(sd for _, sd in rand)
    pts = sorted(p for p in set(kinks) | {m for m, _ in rand} if top < p < hi)
    refs = [g(top) ** p * mass + integrate.quad(lambda x: g(x) ** p * dens(x), top, hi, points=pts or None,
                                                limit=500, epsabs=1e-13, epsrel=1e-12)[0] for p in (1, 2)]
    mu_a, var_a = np.array([mu]), np.array([var])
    on_grid = bool(moments._on_common_grid(np.sqrt(var_a), np.ones_like(var_a, dtype=bool), constants=True)[0])
    assert on_grid and moments._cdf_by_parts(moments._identity if fn is None else fn, kinks) == (fn_name != "tanh")
    for coarse, tol in ((False, 1e-7), (True, 1e-5)):
        e1, e2 = max_expectations(fn, mu_a, var_a, kinks, coarse=coarse)
        assert e1[0] == pytest.approx(refs[0], rel=tol, abs=tol)
        assert e2[0] == pytest.approx(refs[1], rel=tol, abs=tol)


@pytest.mark.backend_free
def test_max_of_independent_gaussians_monte_carlo_and_masks():
    rng = np.random.default_rng(0)
    mu = np.array([[0.5, -0.3, 1.2], [0.0, 0.0, 0.0]])
    var = np.array([[0.4, 1.5, 0.2], [1.0, 1.0, 1.0]])
    x = rng.normal(mu[None], np.sqrt(var)[None], size=(400_000, 2, 3))
    y = np.maximum(x.max(axis=-1), 0.0)
    e1, e2 = max_expectations(lambda v: np.maximum(v, 0.0), mu, var, (0.0,))
    np.testing.assert_allclose(e1, y.mean(axis=0), rtol=5e-3)
    np.testing.assert_allclose(e2 - e1 * e1, y.var(axis=0), rtol=1e-2)
    # identical entries: the order statistic; excluded entries are ignored
    o1, o2 = max_order_expectations(None, [0.0], [1.0], 3)
    ref = max_of_gaussians(3, Moments(0.0, 1.0))
    assert o1[0] == pytest.approx(ref.mean, abs=1e-10)
    assert o2[0] - o1[0] ** 2 == pytest.approx(ref.var, rel=1e-9)
    np.testing.assert_allclose(max_expectations(None, mu[1:], var[1:]), (o1, o2), rtol=1e-10)
    valid = np.array([[True, False, True]])
    m1, m2 = max_expectations(None, np.array([[1.0, 9.0, 0.0]]), np.array([[1.0, 0.0, 1.0]]), valid=valid)
    d = 1.0 / math.sqrt(2.0)  # E max(X, Y), X ~ N(1, 1), Y ~ N(0, 1): Phi(d) + sqrt(2) phi(d)
    assert m1[0] == pytest.approx(stats.norm.cdf(d) + math.sqrt(2.0) * stats.norm.pdf(d), rel=1e-10)
    # zero-variance entries are constants; ties between constants count once
    c1, c2 = max_expectations(None, np.array([[1.0, 1.0, -2.0]]), np.array([[0.0, 0.0, 0.0]]))
    assert (c1[0], c2[0]) == pytest.approx((1.0, 1.0), abs=1e-12)
    z1, _ = max_expectations(None, np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert z1[0] == pytest.approx(stats.norm.pdf(0.0), rel=1e-9)  # E max(X, 0) = phi(0)


@pytest.mark.parametrize("k", [1, 2, 4, 9, 64])
def test_order_statistic_expectations_against_scipy_quad(k):
    g = SCALAR["gelu"]
    mean, var = np.array([0.3, -1.0]), np.array([0.7, 2.0])
    e1, e2 = max_order_expectations(numpy_function(keras.activations.get("gelu")), mean, var, k)
    for c in range(2):
        s = math.sqrt(var[c])
        dens = lambda z: k * stats.norm.pdf(z) * stats.norm.cdf(z) ** (k - 1)  # noqa: E731
        r1 = integrate.quad(lambda z: g(mean[c] + s * z) * dens(z), -12, 12, epsabs=1e-13, limit=200)[0]
        r2 = integrate.quad(lambda z: g(mean[c] + s * z) ** 2 * dens(z), -12, 12, epsabs=1e-13, limit=200)[0]
        assert e1[c] == pytest.approx(r1, rel=1e-7, abs=1e-9)
        assert e2[c] == pytest.approx(r2, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("layer_kwargs", [dict(max_value=6.0), dict(negative_slope=0.1, threshold=0.5),
                                          dict(max_value=2.0, negative_slope=0.2, threshold=1.0), dict()])
def test_relu_layer_pieces_in_closed_form_against_scipy(layer_kwargs):
    """keras.layers.ReLU (ReLU6, leaky, thresholded) as linear pieces, closed form per entry, against scipy
    quad of the layer's own function; s = 0 entries give f(mu)."""
    from autoinit_tf.moments import piecewise_polynomial_expectations
    from autoinit_tf.rules.activation import numpy_function, relu_layer_pieces

    layer = keras.layers.ReLU(**layer_kwargs)
    f = numpy_function(layer)
    mu = np.array([[-2.0, 0.3, 1.5], [5.5, -0.7, 0.0]])
    s = np.array([[1.0, 0.5, 2.0], [1.5, 0.0, 3.0]])
    e1, e2 = piecewise_polynomial_expectations(relu_layer_pieces(layer), mu, s)
    pts = sorted({layer_kwargs.get("threshold", 0.0), layer_kwargs.get("max_value", 0.0)})
    for i, j in np.ndindex(mu.shape):
        m, sd = mu[i, j], s[i, j]
        if sd == 0:
            y = float(f(np.array([m]))[0])
            assert (e1[i, j], e2[i, j]) == pytest.approx((y, y * y))
            continue
        g = lambda x, p: float(f(np.array([x]))[0]) ** p * stats.norm.pdf(x, m, sd)  # noqa: E731
        for p, got in ((1, e1[i, j]), (2, e2[i, j])):
            ref = integrate.quad(g, m - 12 * sd, m + 12 * sd, args=(p,), points=pts, limit=200)[0]
            assert got == pytest.approx(ref, rel=2e-6, abs=1e-8)


@pytest.mark.parametrize("name", ["relu", "relu6", "leaky_relu", "hard_sigmoid", "hard_silu", "hard_tanh",
                                  "hard_shrink", "soft_shrink"])
def test_piecewise_polynomial_activations_against_scipy(name):
    """Keras' piecewise-polynomial activations (hard swish: quadratic piece, E[f^2] needs M_4) in closed
    form against scipy quad of the Keras function itself, per entry of an array."""
    from autoinit_tf.moments import piecewise_polynomial_expectations
    from autoinit_tf.rules.activation import PIECEWISE_POLYNOMIAL, numpy_function, polynomial_pieces

    fn = keras.activations.get(name)
    pieces = polynomial_pieces(fn)
    assert pieces is PIECEWISE_POLYNOMIAL[name]
    f = numpy_function(fn)
    x = np.linspace(-8, 8, 161) + 1e-3  # off the piece edges, where a strict inequality may decide
    np.testing.assert_allclose(np.polynomial.polynomial.polyval(x, [0.0]) + [
        next(np.polynomial.polynomial.polyval(v, c) if len(c) else 0.0 for lo, hi, c in pieces if lo <= v < hi)
        for v in x], f(x), atol=1e-6)  # the table is the function (float32 on backends without float64)
    mu = np.array([-3.5, -0.4, 0.2, 1.0, 4.0, 2.5])
    s = np.array([1.0, 0.3, 2.0, 0.7, 3.0, 0.0])
    e1, e2 = piecewise_polynomial_expectations(pieces, mu, s)
    pts = sorted({p for lo, hi, _ in pieces for p in (lo, hi) if math.isfinite(p)})
    for i in range(len(mu)):
        if s[i] == 0:
            y = float(f(np.array([mu[i]]))[0])
            assert (e1[i], e2[i]) == pytest.approx((y, y * y))
            continue
        for p, got in ((1, e1[i]), (2, e2[i])):
            ref = integrate.quad(lambda v: float(f(np.array([v]))[0]) ** p * stats.norm.pdf(v, mu[i], s[i]),
                                 mu[i] - 12 * s[i], mu[i] + 12 * s[i], points=pts, limit=200)[0]
            assert got == pytest.approx(ref, rel=2e-6, abs=1e-8)  # the reference evaluates Keras' own f


@pytest.mark.parametrize("name", ["swish", "gelu", "tanh", "softplus"])
def test_many_expectations_interpolates_smooth_activations(name, monkeypatch):
    """Above INTERPOLATE_ABOVE distinct pairs, a smooth activation's mean and variance come from a
    Chebyshev grid: within 1e-7 of per-pair quadrature here (the coarse quadrature it replaced: ~1e-6); where the grid cannot reach its tolerance
    (a range far wider than the activation's scale) every pair is integrated instead."""
    from autoinit_tf import moments
    from autoinit_tf.rules.activation import numpy_function

    f = numpy_function(keras.activations.get(name))
    rng = np.random.default_rng(0)
    mu = rng.uniform(-2.5, 3.0, 6000)
    var = rng.uniform(0.02, 2.0, 6000)
    calls = []
    original = moments.channel_expectations
    monkeypatch.setattr(moments, "channel_expectations", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    e1, e2 = moments.many_expectations(f, mu, var)
    assert max(calls) < 1000  # the grid and the check rows, not 6000 pairs
    r1, r2 = original(f, mu, var)
    np.testing.assert_allclose(e1, r1, atol=1e-7)
    np.testing.assert_allclose(e2 - e1 * e1, r2 - r1 * r1, atol=1e-7)
    calls.clear()
    wide = np.concatenate([mu, [-400.0, 400.0]])
    w1, _ = moments.many_expectations(f, wide, np.concatenate([var, [1.0, 1.0]]))
    assert max(calls) == wide.size  # the check failed: every pair integrated
    np.testing.assert_allclose(w1[:-2], r1, atol=1e-5)


@pytest.mark.backend_free
@pytest.mark.parametrize("coarse", [False, True])
def test_channel_expectations_match_quadrature_across_blocks(coarse):
    """`moments.channel_expectations` (the per-channel Gaussian expectations every smooth activation goes
    through, evaluated in blocks of `_EXPECTATION_BLOCK` nodes) against scipy's adaptive quadrature, on
    channels spread over several blocks (the first, one on each block edge, the last), with and without a kink
    (separate panels per channel)."""
    from autoinit_tf import moments

    rng = np.random.default_rng(11)
    n = 3000
    mu = rng.uniform(-3.0, 3.0, n)
    var = rng.uniform(0.01, 4.0, n)
    per_block = moments._EXPECTATION_BLOCK // (8 if coarse else 24) // (len(moments._PANELS) - 1)
    assert n > 2 * per_block  # several blocks
    for fn, kinks in ((lambda x: x / (1.0 + np.exp(-x)), ()), (lambda x: np.where(x > 0.5, x, 0.1 * x), (0.5,))):
        e1, e2 = moments.channel_expectations(fn, mu, var, kinks, coarse=coarse)
        for i in (0, per_block - 1, per_block, 2 * per_block, n - 1):
            s = math.sqrt(var[i])
            for p, got in ((1, e1[i]), (2, e2[i])):
                ref = integrate.quad(lambda v: float(fn(np.array([v]))[0]) ** p * stats.norm.pdf(v, mu[i], s),
                                     mu[i] - 12 * s, mu[i] + 12 * s, points=[0.5] if kinks else None, limit=200)[0]
                assert got == pytest.approx(ref, rel=2e-5 if coarse else 1e-9, abs=1e-9)


@pytest.mark.backend_free
def test_moments_from_elements_per_channel_and_pooled():
    """`Moments.from_elements`: per channel, the mean of the element means and of var + mean^2 over positions
    (negative variances clipped to 0), pooled over channels, against a direct NumPy computation."""
    rng = np.random.default_rng(4)
    mean = rng.normal(0.2, 1.0, (5, 7, 6))
    var = rng.uniform(-0.1, 2.0, (5, 7, 6))
    m = Moments.from_elements(mean, var)
    v = np.maximum(var, 0.0)
    ch_mean = mean.reshape(-1, 6).mean(axis=0)
    ch_second = (v + mean**2).reshape(-1, 6).mean(axis=0)
    np.testing.assert_allclose(m.ch_mean, ch_mean, rtol=1e-13)
    np.testing.assert_allclose(m.ch_var, ch_second - ch_mean**2, rtol=1e-12)
    assert m.mean == pytest.approx(mean.mean(), rel=1e-12)
    assert m.var == pytest.approx((v + mean**2).mean() - mean.mean() ** 2, rel=1e-12)
    np.testing.assert_array_equal(m.el_var, v)


@pytest.mark.backend_free
def test_separable_output_equals_the_composed_kernel():
    """`rules.linear.separable_output` (two products in the float32 pointwise kernel's precision, P^2 in
    column blocks) against `linear_output` of the composed kernel W[t, c, k] = D[t, c] P[c, k] in float64
    (what a separable convolution is), with two position classes and a bias; more units than one block."""
    from autoinit_tf.rules.linear import linear_output, separable_output

    rng = np.random.default_rng(8)
    cin, cout = 600, 2000  # 1 << 20 // 600 = 1747 columns per block: two blocks
    m = Moments.from_channels(rng.normal(0.3, 1.0, cin), rng.uniform(0.2, 2.0, cin))
    d = rng.normal(size=(9, cin))
    p = (rng.normal(size=(cin, cout)) * 0.04).astype(np.float32)
    taps = [(0.75, np.ones(9)), (0.25, np.r_[np.zeros(3), np.ones(6)])]
    bias = rng.normal(0.0, 0.1, cout)
    got = separable_output(m, d, p, taps, bias)
    ref, _, _ = linear_output(m, d[:, :, None] * p.astype(np.float64)[None], taps, bias)
    np.testing.assert_allclose(got.ch_mean, ref.ch_mean, rtol=0, atol=2e-6 * np.abs(ref.ch_mean).max())
    np.testing.assert_allclose(got.ch_var, ref.ch_var, rtol=2e-6)


@pytest.mark.backend_free
def test_chebyshev_interpolation_reproduces_polynomials_on_and_off_its_nodes():
    """`moments._interpolate_2d` (the grid of `many_expectations`) reproduces a polynomial of degree below its
    grid's size in each coordinate to rounding, at points off the nodes, exactly on them (the terms' division
    by zero replaced by the node's own value) and on a degenerate axis (every spread equal)."""
    from autoinit_tf import moments

    def poly(m, s):
        return 0.3 - 1.7 * m + 0.25 * m**3 - 0.01 * m**7 + s * (2.0 - 0.5 * m * m) + 0.4 * s**5

    rng = np.random.default_rng(5)
    gm = moments._chebyshev_points(-3.0, 4.0, 32)
    gs = moments._chebyshev_points(0.2, 1.8, 16)
    mm, ss = np.meshgrid(gm, gs, indexing="ij")
    table = poly(mm, ss)
    m = np.concatenate([rng.uniform(-3.0, 4.0, 3000), gm[[0, 7, 31]], [gm[4]]])
    s = np.concatenate([rng.uniform(0.2, 1.8, 3000), [0.9, gs[3], 1.1], [gs[15]]])
    got, got2 = moments._interpolate_2d(table, 2.0 * table, gm, gs, m, s)
    np.testing.assert_allclose(got, poly(m, s), rtol=0, atol=1e-10)
    np.testing.assert_allclose(got2, 2.0 * poly(m, s), rtol=0, atol=2e-10)
    flat = np.full(16, 0.7)  # a degenerate spread axis: the first node's column
    one, _ = moments._interpolate_2d(table, table, gm, flat, m[:50], np.full(50, 0.7))
    np.testing.assert_allclose(one, poly(m[:50], gs[0]), rtol=0, atol=1e-10)


@pytest.mark.backend_free
def test_swish_twin_matches_the_logistic_form():
    """The swish twin (x (1 + tanh(x / 2)) / 2, for speed) against x * scipy's expit: absolute error below
    5e-16 max(1, |x|) everywhere, relative error below 1e-12 for x > -10, and its Gaussian moments equal."""
    from scipy.special import expit

    from autoinit_tf import moments
    from autoinit_tf.rules.activation import _silu

    x = np.concatenate([np.linspace(-800.0, 800.0, 400001), np.random.default_rng(2).normal(0.0, 5.0, 100000)])
    ref = x * expit(x)
    got = _silu(x)
    assert np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(x))) < 5e-16
    near = x > -10.0
    assert np.max(np.abs(got - ref)[near] / np.maximum(np.abs(ref[near]), 1e-300)) < 1e-12
    mu, var = np.linspace(-4.0, 4.0, 41), np.linspace(0.05, 3.0, 41)
    for a, b in zip(moments.channel_expectations(_silu, mu, var), moments.channel_expectations(lambda v: v * expit(v), mu, var)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_builtin_activations_are_evaluated_by_checked_numpy_twins():
    """Keras' built-in activations are integrated through NumPy twins (no backend dispatch per quadrature
    call): every twin passes its check against the backend here, agrees with the backend's float64
    evaluation off the check grid, and a twin whose definition differs is refused (the backend is used)."""
    import keras

    from autoinit_tf.rules import activation as act

    twins = act._numpy_twins()
    assert {keras.activations.silu, keras.activations.gelu, keras.activations.relu} <= set(twins)
    x = np.random.default_rng(0).normal(0.0, 4.0, 2000)
    for fn in twins:
        assert act.numpy_function(fn) is act._verified_twin(fn) is not None, fn.__name__
        want = np.asarray(keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(x))), dtype=np.float64)
        np.testing.assert_allclose(act.numpy_function(fn)(x), want, rtol=1e-5, atol=1e-6, err_msg=fn.__name__)
    # a hard sigmoid of slope 0.2 (Keras 2's) in place of relu6(x + 3) / 6: refused
    act._verified_twin.cache_clear()
    wrong = dict(twins)
    wrong[keras.activations.hard_sigmoid] = lambda v: np.clip(0.2 * np.asarray(v) + 0.5, 0.0, 1.0)
    original = act._numpy_twins
    try:
        act._numpy_twins = lambda: wrong
        f = act.numpy_function(keras.activations.hard_sigmoid)
        assert act._verified_twin(keras.activations.hard_sigmoid) is None
        np.testing.assert_allclose(f(np.array([-3.0, 0.0, 1.5, 3.0])), [0.0, 0.5, 0.75, 1.0], atol=1e-6)
    finally:
        act._numpy_twins = original
        act._verified_twin.cache_clear()


@pytest.mark.parametrize("name", ["identity", "relu", "floor"])
@pytest.mark.backend_free
def test_max_on_the_common_grid_by_parts_with_masks_and_far_means(name):
    """The common grid integrates g(M) for g the identity or max(x, k) by parts against the CDF of M alone.
    Against the per-entry path (a different quadrature, 1e-7): windows with excluded entries, means far
    below the kink (E = g(k)^p), far above it, and spreads within 2x (so the coarse path takes the grid)."""
    vec = None if name == "identity" else PIECEWISE[name][0]
    kinks = () if name == "identity" else PIECEWISE[name][2]
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(40, 9))
    var = rng.uniform(0.5, 1.5, size=(40, 9)) ** 2
    mu[0] -= 60.0
    mu[1] += 40.0
    mu[2] *= 0.01
    valid = np.ones((40, 9), dtype=bool)
    valid[3:20, 6:] = False
    valid[20:25, 1:] = False  # one entry left
    e1, e2 = max_expectations(vec, mu, var, kinks, valid=valid, coarse=True)
    r1, r2 = max_expectations(vec, mu, var, kinks, valid=valid, coarse=False)
    np.testing.assert_allclose(e1, r1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e2, r2, rtol=1e-5, atol=1e-7)
    if name != "identity":
        k0 = kinks[0]
        assert (e1[0], e2[0]) == pytest.approx((k0, k0 * k0), abs=1e-12)
