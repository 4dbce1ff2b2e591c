"""Correlated positions (`autoinit_tf.rules.spatial_correlation`) against closed forms, quadrature written
for the test, sampling, and measurements of real Keras models."""

import math

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf.moments import hermite_coefficients
from autoinit_tf.rules import spatial_correlation

pytestmark = pytest.mark.core
L = keras.layers


def _bivariate_covariance(f, mean, sd, rho, nodes=80):
    """Cov(f(X), f(Y)) for (X, Y) bivariate normal (mean, sd, correlation rho): a tensor Gauss-Hermite rule
    on the Cholesky factor (independent of the Mehler series it checks)."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    ww = np.outer(w, w)
    x = mean + sd * z1
    y = mean + sd * (rho * z1 + math.sqrt(1.0 - rho * rho) * z2)
    fx, fy = f(x), f(y)
    return float(np.sum(ww * fx * fy) - np.sum(ww * fx) * np.sum(ww * fy))


def _mehler(coef, var, rho):
    n = np.arange(1, coef.size + 1)
    return float(np.sum(coef ** 2 * rho ** n) + (var - np.sum(coef ** 2)) * rho ** (coef.size + 1))


@pytest.mark.backend_free
def test_mehler_coefficients_give_the_arc_cosine_kernel_of_relu():
    coef, var = hermite_coefficients(lambda x: np.maximum(x, 0.0), [0.0], [1.0], (0.0,), 8)
    for rho in (-0.6, 0.2, 0.5, 0.9):
        closed = (math.sqrt(1 - rho * rho) + (math.pi - math.acos(rho)) * rho) / (2 * math.pi) - 1 / (2 * math.pi)
        assert _mehler(coef[0], var[0], rho) == pytest.approx(closed, abs=5e-4 if rho > 0.8 else 1e-4)


@pytest.mark.parametrize("f", [np.tanh, lambda x: x / (1 + np.exp(-x))], ids=["tanh", "swish"])
@pytest.mark.backend_free
def test_mehler_coefficients_of_smooth_activations_against_bivariate_quadrature(f):
    mean, var = 0.3, 1.7
    coef, v = hermite_coefficients(f, [mean], [var], (), 8)
    for rho in (-0.5, 0.3, 0.7):
        assert _mehler(coef[0], v[0], rho) == pytest.approx(_bivariate_covariance(f, mean, math.sqrt(var), rho),
                                                            rel=2e-3, abs=1e-6)


@pytest.mark.backend_free
def test_max_of_overlapping_windows_against_sampling():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300_000, 3, 5))
    a, b = x[:, :, :3].reshape(len(x), -1).max(axis=1), x[:, :, 2:].reshape(len(x), -1).max(axis=1)
    sampled = np.corrcoef(a, b)[0, 1]  # 3x3 windows at stride 2 share a column of 3
    assert spatial_correlation.max_overlap_correlation(9, 3) == pytest.approx(sampled, abs=0.006)
    assert spatial_correlation.max_overlap_correlation(9, 0) == 0.0
    assert spatial_correlation.max_overlap_correlation(9, 9) == 1.0


def _wrapped(model, n, shape, seed=1):
    report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)[1]
    x = np.random.default_rng(seed).standard_normal((n,) + shape).astype("float32")
    outs = model(x, training=True)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    rows = {r.name: r.outputs[0] for r in report.rows}
    return rows, [np.asarray(keras.ops.convert_to_numpy(o), dtype=np.float64) for o in outs]


def test_average_pool_branch_keeps_its_correlation_through_conv_and_relu():
    """Inception's pool branch: a 3x3 stride-1 average pool correlates neighbours (2/3 at lag 1), the 1x1
    conv, BatchNormalization and ReLU keep most of it, and the next average pool and the global average
    keep far more than v / k (independent positions predicted 0.044 and 0.0024 here)."""
    x = keras.Input((16, 16, 32))
    h = L.AveragePooling2D(3, 1, padding="same")(x)
    h = L.Conv2D(64, 1, use_bias=False)(h)
    h = L.BatchNormalization()(h)
    h = L.Activation("relu")(h)
    pooled = L.AveragePooling2D(3, 1, padding="same", name="pool2")(h)
    gap = L.GlobalAveragePooling2D(name="gap")(h)
    rows, (yp, yg) = _wrapped(keras.Model(x, [pooled, gap]), 3000, (16, 16, 32))
    # borders (windows of 4 or 6 entries, more correlated with their neighbours) are not modelled
    assert yp.var() == pytest.approx(rows["pool2"].var, rel=0.08)
    assert yg.var() == pytest.approx(rows["gap"].var, rel=0.08)


def test_depthwise_kernel_correlates_its_outputs_channel_by_channel():
    """A depthwise 3x3 kernel on independent positions: neighbouring outputs share the kernel's own
    autocorrelation, so each channel's global average has variance ~ (sum of the kernel)^2 / n, not
    sum(W^2) / n: the per-channel pooled variances follow the drawn kernels. Over six seeds: the
    prediction's per-channel log error 0.14-0.22 (rms), the independent positions' 1.1-1.5 (their
    correlation with the measurement 0.17-0.53, which depends on the draw: not what is checked)."""
    x = keras.Input((12, 12, 16))
    d = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    g = L.GlobalAveragePooling2D(name="gap")(d)
    rows, (_, yg) = _wrapped(keras.Model(x, [d, g]), 20000, (12, 12, 16))
    pred = rows["gap"].ch_var
    measured = yg.var(axis=0)
    assert measured.mean() == pytest.approx(pred.mean(), rel=0.05)
    assert np.corrcoef(pred, measured)[0, 1] > 0.95
    independent = rows["dw"].ch_var / 144  # what positions taken as independent give: sum(W^2) / n

    def rms_log_error(p):
        return float(np.sqrt(np.mean(np.log(p / measured) ** 2)))

    assert rms_log_error(pred) < 0.3
    assert rms_log_error(independent) > 3 * rms_log_error(pred)


def test_max_pool_of_correlated_maps_and_the_correlation_it_passes_on():
    """A 3x3 stride-2 max pool over a map with neighbour correlation 2/3: its entries share a common part,
    so the max is lower than that of independent entries (1.12 against 1.02 measured here) and the windows,
    sharing a column, pass on correlation 0.48 at lag 1."""
    x = keras.Input((16, 16, 32))
    h = L.AveragePooling2D(3, 1, padding="same")(x)
    h = L.Conv2D(64, 1, use_bias=False)(h)
    b = L.BatchNormalization(name="bn")(h)
    mp = L.MaxPooling2D(3, 2, name="mp")(L.Activation("relu")(b))
    mpb = L.MaxPooling2D(3, 2, name="mpb")(b)
    gap = L.GlobalAveragePooling2D(name="gap")(mp)
    rows, (ym, ymb, yg) = _wrapped(keras.Model(x, [mp, mpb, gap]), 3000, (16, 16, 32))
    assert ymb.mean() == pytest.approx(rows["mpb"].mean, rel=0.07)  # equicorrelation: an estimate
    assert ymb.var() == pytest.approx(rows["mpb"].var, rel=0.05)
    assert ym.mean() == pytest.approx(rows["mp"].mean, rel=0.07)
    assert ym.var() == pytest.approx(rows["mp"].var, rel=0.05)
    lag1 = np.corrcoef(ym[:, 1:4, 1:4, :8].ravel(), ym[:, 1:4, 2:5, :8].ravel())[0, 1]
    assert rows["mp"].corr is not None
    assert float(np.mean(rows["mp"].corr[:, 3, 4])) == pytest.approx(lag1, abs=0.03)
    assert yg.var() == pytest.approx(rows["gap"].var, rel=0.06)


def test_conv_after_an_average_pool_branch_is_on_target_after_wrap():
    """What the user sees: the 1x1 conv reading a pool branch of pool-branch outputs (two Inception blocks)
    has pre-activation variance 1 after the analytic wrap (1.26x in InceptionV3 before positions were
    correlated)."""
    x = keras.Input((10, 10, 24))
    h = x
    for i in range(2):
        p = L.AveragePooling2D(3, 1, padding="same")(h)
        p = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(p)))
        q = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(h)))
        h = L.Concatenate()([p, q])
    p = L.AveragePooling2D(3, 1, padding="same")(h)
    out = L.Conv2D(32, 1, use_bias=False, name="after")(p)
    model = keras.Model(x, out)
    _, (y,) = _wrapped(model, 3000, (10, 10, 24))
    assert float(np.mean(y * y)) == pytest.approx(1.0, rel=0.06)


@pytest.mark.parametrize("name", ["identity", "relu", "hard_swish", "tanh"])
@pytest.mark.backend_free
def test_activation_sampling_variance_against_sampled_maps(name):
    """The relative variance over examples of each example's energy about the channel means,
    sum_{c, p} (f(y_cp) - mu_c)^2, on 8x8 maps whose positions share 3x3 windows of i.i.d. noise (correlation
    (3 - |dy|)(3 - |dx|) / 9 exactly, no borders), against 30000 sampled maps (relative standard error ~1%);
    the identity also against the Gaussian closed form 2 sum_c v_c^2 sum_{p, q} corr^2 / (P sum_c v_c)^2."""
    fns = {"identity": (lambda x: x, ()), "relu": (lambda x: np.maximum(x, 0.0), (0.0,)),
           "hard_swish": (lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, (-3.0, 3.0)), "tanh": (np.tanh, ())}
    f, kinks = fns[name]
    rng = np.random.default_rng(0)
    n, h, w = 30000, 8, 8
    means, var = np.array([-0.5, 0.0, 0.5, 1.0]), np.array([1.0, 1.0, 1.0, 1.0])
    noise = rng.standard_normal((n, h + 2, w + 2, 4))
    y = sum(noise[:, a:a + h, b:b + w, :] for a in range(3) for b in range(3)) / 3.0 + means
    r = spatial_correlation.RADIUS
    d = np.arange(-r, r + 1)
    tri = np.maximum(3 - np.abs(d), 0) / 3.0
    corr = np.broadcast_to(np.outer(tri, tri), (4, 2 * r + 1, 2 * r + 1)).copy()
    z = f(y)
    energy = ((z - z.reshape(-1, 4).mean(axis=0)) ** 2).sum(axis=(1, 2, 3))
    sampled = energy.var() / energy.mean() ** 2
    got = spatial_correlation.activation_sampling_variance(f, kinks, means, var, corr, (h, w))
    assert got == pytest.approx(sampled, rel=0.05)
    if name == "identity":
        counts = np.outer(np.maximum(h - np.abs(d), 0), np.maximum(w - np.abs(d), 0))
        closed = 2.0 * float((var ** 2).sum()) * float((counts * corr[0] ** 2).sum()) / (h * w * var.sum()) ** 2
        assert got == pytest.approx(closed, rel=1e-6)
        assert spatial_correlation.gaussian_sampling_variance(var, corr, (h, w)) == pytest.approx(closed, rel=1e-12)
    if name == "relu":  # the activation's own spread: more than the Gaussian's it came from
        gaussian = spatial_correlation.activation_sampling_variance(lambda x: x, (), means, var, corr, (h, w))
        assert got > 1.3 * gaussian


@pytest.mark.parametrize("kernel,strides,dilation", [((3, 3), (1, 1), (1, 1)), ((5, 5), (2, 2), (1, 1)),
                                                     ((3, 3), (1, 1), (2, 2)), ((3, 5), (1, 2), (1, 1))])
@pytest.mark.backend_free
def test_depthwise_correlation_against_the_sum_over_tap_pairs(kernel, strides, dilation):
    """cov_out(d) = sum_{t, t'} W_t W_t' cov_in(s d + dilation (t' - t)), summed pair by pair here."""
    from autoinit_tf.moments import Moments

    rng = np.random.default_rng(0)
    kh, kw = kernel
    c, dm = 3, 2
    w = rng.normal(size=(kh, kw, c, dm))
    m = Moments.from_channels(np.zeros(c), rng.uniform(0.5, 2.0, c))
    corr = rng.uniform(-0.1, 0.4, (c, 7, 7))
    corr = (corr + corr[:, ::-1, ::-1]) / 2
    corr[:, 3, 3] = 1.0
    m.corr = corr
    got = spatial_correlation.through_depthwise(Moments.from_channels(np.zeros(c * dm), np.ones(c * dm)), m, w,
                                                strides, dilation, (None, 20, 20, c)).corr
    cov = corr * m.ch_var[:, None, None]
    ref = np.zeros((c * dm, 7, 7))
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    for ch in range(c):
        for d in range(dm):
            for y in range(-3, 4):
                for x in range(-3, 4):
                    total = 0.0
                    for (i1, j1) in taps:
                        for (i2, j2) in taps:
                            oy = strides[0] * y + dilation[0] * (i2 - i1)
                            ox = strides[1] * x + dilation[1] * (j2 - j1)
                            if abs(oy) <= 3 and abs(ox) <= 3:
                                total += w[i1, j1, ch, d] * w[i2, j2, ch, d] * cov[ch, 3 + oy, 3 + ox]
                    ref[ch * dm + d, 3 + y, 3 + x] = total
    ref = np.clip(ref / ref[:, 3:4, 3:4], -1.0, 1.0)
    np.testing.assert_allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "relu6", "leaky_relu", "hard_sigmoid", "hard_shrink"])
@pytest.mark.backend_free
def test_closed_form_hermite_coefficients_of_piecewise_linear_activations(name):
    from autoinit_tf.moments import hermite_coefficients_exact, piecewise_linear_hermite
    from autoinit_tf.rules.activation import PIECEWISE_POLYNOMIAL

    pieces = PIECEWISE_POLYNOMIAL[name]

    def f(x):
        y = np.zeros_like(x)
        for lo, hi, c in pieces:
            y = np.where((x > lo) & (x <= hi), sum(ci * x ** i for i, ci in enumerate(c)) if c else 0.0, y)
        return y

    means, variances = np.array([0.0, 0.4, -1.0, 5.5]), np.array([1.0, 2.0, 0.3, 1.0])
    closed, var = piecewise_linear_hermite(pieces, means, variances, 8)
    quad, var_q = hermite_coefficients_exact(f, means, variances, tuple(p[1] for p in pieces[:-1]), 8)
    np.testing.assert_allclose(closed, quad, atol=1e-8)
    np.testing.assert_allclose(var, var_q, atol=1e-9)
