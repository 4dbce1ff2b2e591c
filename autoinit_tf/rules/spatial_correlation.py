"""Correlated positions: each channel's spatial autocorrelation by offset (`Moments.corr`).

The other rules treat the positions of a feature map as independent. After an overlapping pool they are
not: a 3x3 average pool with stride 1 makes neighbours share 6 of their 9 entries (correlation 2/3), a
3x3 max pool with stride 2 makes them share 3 (0.28), a depthwise kernel correlates its neighbouring
outputs through its own autocorrelation, and convolutions, activations and residual sums carry what
they receive. The next average pool then keeps far more than v / k of the variance: InceptionV3 at
96x96, each mixed block's 3x3 pool branch had variance 0.068 predicted, 0.125 measured, and the 1x1
conv after it came out 1.26x.

For a channels-last 2D map, ``corr[c, R + dy, R + dx]`` is the correlation between the fluctuations
(over examples) of channel c at positions p and p + (dy, dx), |dy|, |dx| <= R (`RADIUS`, 3); farther
offsets count as uncorrelated, and one correlation function serves all positions of a channel
(stationary: borders are not modelled). The part of the variance all positions of an example share
(`Moments.shared`, after squeeze-and-excitation gates) is left out: corr describes u = var - shared.
None means independent positions (what the other rules assume).

With u_c a channel's fluctuation variance and cov_c = corr_c u_c:

    conv, kernel W[t, c, j], stride s: cov_j(d) = sum_c (sum_t W[t, c, j]^2) cov_c(s d)
        (expected over the drawn kernel: the cross terms W_t W_t' average out over input channels)
    depthwise, taps at p_t:           cov_j(d) = sum_{t, t'} W_t W_t' cov_c(s d + p_t' - p_t)
        (one input channel: exact for the drawn kernel; its autocorrelation correlates neighbouring
        outputs even of independent inputs)
    activation f (Mehler):            cov(d) = sum_{n <= 8} a_n^2 corr(d)^n + (Var f - sum a_n^2) corr(d)^9
        (a_n: `moments.hermite_coefficients` on the channel's Gaussian)
    BatchNormalization, gates, zero padding, cropping: unchanged; add: covariances add; concatenate: stacked
    average pool k x k, stride s:     cov_out(d) = sum_e n_k(e) cov(s d + e) / k^2  (n_k(e): the pairs of
        window entries at offset e); the pooled variance itself, per window on element maps (border
        windows have fewer entries), adds sum_{e != 0} n_W(e) corr(e) mean_W(u) / |W|^2
    max pool, pooled:                 5-point Gauss-Hermite over the common part of equicorrelated entries
        (the window's average pair correlation; `correlated_max`)
    max pool, correlation:            the average pool's correlation times w + (1 - w) rho_max / rho_avg, with
        rho_max / rho_avg that of independent entries (windows sharing m of their n entries: m / n, and
        the max of the shared entries against the rest by quadrature) and w the common part's share of
        the max's variance (`max_pool`): an estimate
    global average over H x W:        Var = sum_{p, q} corr(q - p) sqrt(u_p u_q) / (HW)^2 + shared

Rules that do not know this field drop it (new `Moments`), which is the independent-positions prediction.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from autoinit_tf.moments import (Moments, centred_square_hermite, hermite_coefficients, max_order_statistic,
                                piecewise_linear_hermite)
from autoinit_tf.rules.element_maps import window_bounds, window_sums
from autoinit_tf.rules.shared_part import carry_per_example, scale_of, shared_of

RADIUS = 3
SIDE = 2 * RADIUS + 1
_ORDER = 8


def corr_of(m: Moments):
    """The per-channel correlation array of `m` (C, SIDE, SIDE), or None (independent positions)."""
    c = getattr(m, "corr", None)
    if c is None or m.ch_mean is None or c.shape != (m.channels, SIDE, SIDE):
        return None
    return c


def energy_sampling_variance(m: Moments, shape) -> float:
    """The relative variance, over an example's own entries, of its energy (the mean square of its C x P
    entries), given its scale: 2 sum_c s_c / (C P)^2 with s_c = sum_{p, q} corr_c(q - p)^2 over the map's pairs
    of positions (squares of Gaussian entries: Cov(x_p^2, x_q^2) = 2 cov^2), 2 / (C P) for independent
    positions; 0 where a dimension is unknown (`rules.shared_part.with_sampling`)."""
    dims = tuple(shape)[1:] if shape is not None else ()
    if not dims or any(d is None for d in dims):
        return 0.0
    c, spatial = int(dims[-1]), [int(d) for d in dims[:-1]]
    p = int(np.prod(spatial)) if spatial else 1
    corr = corr_of(m)
    if corr is None or len(spatial) != 2 or corr.shape[0] != c:
        return 2.0 / (c * p)
    pairs = np.einsum("ab,cab->c", _pair_counts(*spatial), np.square(corr))
    return 2.0 * float(pairs.sum()) / float(c * p) ** 2


def activation_sampling_variance(fn, kinks, mean, var, corr, spatial) -> float:
    """The relative variance, over an example's own entries, of the energy of z = fn(y) about its channel
    means (sum_c sum_p (z_cp - mu_c)^2), for Gaussian y with the channels' `mean`, `var` and correlation by
    offset `corr` (C, SIDE, SIDE) on a map of `spatial` (H, W) positions: with g_c = (fn - mu_c)^2 and a_n
    its normalised Hermite coefficients on channel c's Gaussian (Mehler: Cov(g(y_p), g(y_q)) =
    sum_n a_n^2 corr(q - p)^n),

        sum_c sum_{p, q} Cov(g_c(y_p), g_c(y_q)) / (P sum_c Var fn(y_c))^2

    which for the identity is `gaussian_sampling_variance` (a_2^2 = 2 var^2) and for a ReLU of a centred
    Gaussian 2.2x it (Var((z - mu)^2) / Var(z)^2 = 4.41 against 2): the activation's own contribution to
    the spread of the examples' energies."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    var = np.asarray(var, dtype=np.float64).reshape(-1)
    c = mean.size
    if corr is None or corr.shape != (c, SIDE, SIDE) or len(spatial) != 2:
        return 0.0
    coef, var_g, var_f = centred_square_hermite(fn, mean, var, kinks, _ORDER)
    energy = float(var_f.sum())
    if energy <= 0.0:
        return 0.0
    pairs = float(np.einsum("ab,cab->", _pair_counts(*spatial), _mehler_covariance(coef * coef, var_g, corr)))
    return max(pairs, 0.0) / (float(np.prod(spatial)) * energy) ** 2


def gaussian_sampling_variance(var, corr, spatial) -> float:
    """`activation_sampling_variance` of the identity in closed form ((y - m)^2 has a_2^2 = 2 var^2 alone):
    2 sum_c var_c^2 sum_{p, q} corr_c(q - p)^2 / (P sum_c var_c)^2; `energy_sampling_variance` weighs the
    channels alike."""
    var = np.asarray(var, dtype=np.float64).reshape(-1)
    if corr is None or corr.shape != (var.size, SIDE, SIDE) or len(spatial) != 2 or var.sum() <= 0.0:
        return 0.0
    pairs = np.einsum("ab,cab->c", _pair_counts(*spatial), corr * corr)
    return 2.0 * float((var * var) @ pairs) / (float(np.prod(spatial)) * float(var.sum())) ** 2


def _mehler_covariance(sq, var_f, corr) -> np.ndarray:
    """Per channel and offset, Cov(f(y_p), f(y_q)) = sum_{n <= 8} a_n^2 corr^n + (Var f - sum a_n^2) corr^9, with
    `sq` the squared normalised Hermite coefficients (C, 8) of f on each channel's Gaussian."""
    rest = np.maximum(var_f - sq.sum(axis=1), 0.0)
    cov = np.zeros_like(corr)
    power = np.ones_like(corr)
    for n in range(_ORDER):
        power = power * corr
        cov += sq[:, n, None, None] * power
    return cov + rest[:, None, None] * power * corr


def independent(channels: int) -> np.ndarray:
    out = np.zeros((channels, SIDE, SIDE))
    out[:, RADIUS, RADIUS] = 1.0
    return out


def fluctuation(m: Moments) -> np.ndarray:
    """Per channel, the variance over examples of one position's value, less the shared part."""
    c = m.channels
    u = m.el_var.reshape(-1, c).mean(axis=0) if m.el_mean is not None else m.ch_var
    s = shared_of(m)
    return np.maximum(u - (0.0 if s is None else s), 0.0)


def _normalised(cov):
    centre = cov[:, RADIUS, RADIUS].copy()
    ok = centre > 0
    out = np.where(ok[:, None, None], cov / np.where(ok, centre, 1.0)[:, None, None], 0.0)
    out[~ok] = independent(1)[0]
    return np.clip(out, -1.0, 1.0)


def _with(out: Moments, corr) -> Moments:
    if corr is not None and out.ch_mean is not None and corr.shape == (out.channels, SIDE, SIDE):
        out.corr = corr
    return out


def _channelled(m: Moments, shape):
    """`m` with per-channel numbers (pooled moments without a between-channel part stand for every channel
    of `shape` alike), or None."""
    if m.ch_mean is not None or m.between != 0.0 or shape is None or shape[-1] is None:
        return m if m.ch_mean is not None else None
    c = int(shape[-1])
    out = Moments.from_channels(np.full(c, m.mean), np.full(c, m.var))
    out.pre, out.sum_of, out.matched = m.pre, m.sum_of, m.matched
    return out


def _is_map(shape) -> bool:
    return shape is not None and len(shape) == 4


def _strided(cov, strides, reach=0):
    """cov at offsets s d + e for |e| <= reach: an array (C, SIDE + 2 reach', SIDE + 2 reach') indexed from
    -R s - reach, zero where the offset is beyond R (`_sample` reads it)."""
    pad = RADIUS * max(strides) + reach
    big = np.zeros((cov.shape[0], 2 * pad + 1, 2 * pad + 1))
    big[:, pad - RADIUS:pad + RADIUS + 1, pad - RADIUS:pad + RADIUS + 1] = cov
    return big, pad


def _sample(big, pad, strides, ey=0, ex=0):
    """(C, SIDE, SIDE): big at offsets (s_y d_y + ey, s_x d_x + ex) for d in [-R, R]^2."""
    d = np.arange(-RADIUS, RADIUS + 1)
    rows = pad + strides[0] * d + ey
    cols = pad + strides[1] * d + ex
    return big[:, rows[:, None], cols[None, :]]


# -- linear layers --------------------------------------------------------------------------------------


def through_conv(out: Moments, m_in: Moments, kernel, strides, in_shape) -> Moments:
    """`out` of a Conv2D (kernel (kh, kw, cin, cout)) or a position-wise Dense (kernel (cin, cout)) with the
    correlation of its input carried (expected over the kernel's signs)."""
    corr = corr_of(m_in)
    if corr is None or not _is_map(in_shape) or out.ch_mean is None:
        return out
    w = np.asarray(kernel)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32)
    w3 = w.reshape(-1, w.shape[-2], w.shape[-1])
    if w3.shape[1:] != (m_in.channels, out.channels):
        return out
    # (cin, cout): sum over taps of W^2, in the kernel's own precision (relative error ~1e-7 in float32),
    # without a kernel-size temporary (20x faster than squaring each tap in float64); the product with
    # the input's sampled covariance in that precision too (no float64 copy of a (cin, cout) matrix)
    w2 = np.einsum("tio,tio->io", w3, w3)
    cov = corr * fluctuation(m_in)[:, None, None]
    big, pad = _strided(cov, strides)
    sampled = _sample(big, pad, strides).reshape(m_in.channels, -1).astype(w2.dtype)  # (cin, SIDE^2)
    return _with(out, _normalised((sampled.T @ w2).T.astype(np.float64).reshape(-1, SIDE, SIDE)))


def through_depthwise(out: Moments, m_in: Moments, kernel, strides, dilation, in_shape) -> Moments:
    """`out` of a DepthwiseConv2D (kernel (kh, kw, C, dm)): each output channel's correlation, exact for the
    drawn kernel (independent input positions when the input carries none)."""
    if not _is_map(in_shape):
        return out
    out_c, m_in = _channelled(out, (None, int(np.prod(np.shape(kernel)[-2:])))), _channelled(m_in, in_shape)
    if out_c is None or m_in is None:
        return out
    out = out_c
    w = np.asarray(kernel, dtype=np.float64)
    kh, kw, c, dm = w.shape
    if c != m_in.channels or c * dm != out.channels:
        return out
    corr = corr_of(m_in)
    cov = (independent(c) if corr is None else corr) * fluctuation(m_in)[:, None, None]
    dy, dx = int(dilation[0]), int(dilation[1])
    big, pad = _strided(cov, strides, reach=max((kh - 1) * dy, (kw - 1) * dx))
    # kernel autocorrelation A(e) = sum_t W_t W_{t+e} per (c, d): one product of overlapping slices per offset
    auto = np.zeros((2 * kh - 1, 2 * kw - 1, c, dm))
    for ey in range(kh):
        for ex in range(-(kw - 1), kw):
            a0 = w[:kh - ey, max(0, -ex):kw - max(0, ex)]
            a1 = w[ey:, max(0, ex):kw + min(0, ex)]
            auto[kh - 1 + ey, kw - 1 + ex] = np.einsum("ijcd,ijcd->cd", a0, a1)
    auto[:kh - 1] = auto[kh:][::-1, ::-1]  # A(-e) = A(e)
    # cov_out(d) = sum_e A(e) cov_in(s d + dilation e): windows of the padded covariance at the strided offsets
    sy, sx = int(strides[0]), int(strides[1])
    win = np.lib.stride_tricks.sliding_window_view(big, ((2 * kh - 2) * dy + 1, (2 * kw - 2) * dx + 1), axis=(1, 2))
    start_y, start_x = pad - (kh - 1) * dy, pad - (kw - 1) * dx
    # the strided offsets s d, d in [-R, R], by slicing: a view of the padded covariance, no copy of the windows
    win = win[:, start_y - sy * RADIUS:start_y + sy * RADIUS + 1:sy,
              start_x - sx * RADIUS:start_x + sx * RADIUS + 1:sx, ::dy, ::dx]  # (C, S, S, 2kh-1, 2kw-1)
    acc = np.einsum("cyxab,abcd->cdyx", win, auto)
    return _with(out, _normalised(acc.reshape(c * dm, SIDE, SIDE)))


# -- elementwise ------------------------------------------------------------------------------------------


def _gaussian_of(m: Moments):
    c = m.channels
    if m.el_mean is not None:
        return m.el_mean.reshape(-1, c).mean(axis=0), m.el_var.reshape(-1, c).mean(axis=0)
    return m.ch_mean, m.ch_var


def through_activation(fn, kinks, m_in: Moments, out: Moments, pieces=None) -> Moments:
    """`out` = fn(m_in) with each channel's correlation mapped through fn (Mehler's formula); `pieces` (a
    piecewise-linear fn, `rules.activation.PIECEWISE_POLYNOMIAL`) gives its coefficients in closed form."""
    corr = corr_of(m_in)
    if corr is None or out.ch_mean is None or out.channels != m_in.channels:
        return out
    mean, var = _gaussian_of(m_in)
    closed = None if pieces is None else piecewise_linear_hermite(pieces, mean, var, _ORDER)
    coef, var_f = closed if closed is not None else hermite_coefficients(fn, mean, var, kinks, _ORDER)
    cov = _mehler_covariance(coef * coef, var_f, corr)
    return _with_activation_sampling(_with(out, _normalised(cov)), fn, kinks, m_in, mean, var, corr)


def _with_activation_sampling(out: Moments, fn, kinks, m_in: Moments, mean, var, corr) -> Moments:
    """`out` = fn(m_in) with the activation's own part of the spread of the examples' energies in its
    log-scale, where one is carried (`Moments.scale`, after a gate) and the map's positions are known
    (element maps): the linear layer before added the sampling variance of its Gaussian output (S_y,
    `rules.shared_part.with_sampling`), which the activation carried with its elasticity e^2 (the ratio of
    the log-scales out / in); the energy of fn(y) has `activation_sampling_variance` (S_f) instead, so

        lam_out += S_f - e^2 S_y

    (a ReLU of centred Gaussians: S_f = 2.2 S_y; hard swish 2.8 S_y: the examples' energies spread faster
    through a gated network than the Gaussian sampling alone says)."""
    lam_in, lam_out = scale_of(m_in), scale_of(out)
    if lam_in <= 0.0 or m_in.el_mean is None or m_in.el_mean.ndim != 3:
        return out
    spatial = m_in.el_mean.shape[:2]
    s_f = activation_sampling_variance(fn, kinks, mean, var, corr, spatial)
    s_y = gaussian_sampling_variance(var, corr, spatial)
    out.scale = max(lam_out + s_f - (lam_out / lam_in) * s_y, 0.0)
    return out


def unchanged(out: Moments, m_in: Moments) -> Moments:
    """A per-channel affine map, a gate, padding or cropping: the correlation of `m_in` on `out`."""
    corr = corr_of(m_in)
    return out if corr is None else _with(out, corr)


def through_dropout(out: Moments, m_in: Moments, per_example: bool) -> Moments:
    """Inverted dropout in training mode. One mask per example scales every covariance of the example
    alike (1 / keep; its mean part is the shared part): the correlation is kept. A mask per element leaves
    the covariance of two positions as it was (E[M_p M_q] = keep^2) and raises each variance: the
    correlation times u_in / u_out."""
    corr = corr_of(m_in)
    if corr is None or out.ch_mean is None or out.channels != m_in.channels:
        return out
    if per_example:
        return _with(out, corr)
    u_in, u_out = fluctuation(m_in), fluctuation(out)
    ratio = np.where(u_out > 0, u_in / np.where(u_out > 0, u_out, 1.0), 1.0)
    scaled = corr * ratio[:, None, None]
    scaled[:, RADIUS, RADIUS] = 1.0
    return _with(out, scaled)


def added(ms, out: Moments) -> Moments:
    """Sum of independent inputs: their covariances add."""
    corrs = [corr_of(m) for m in ms]
    if all(c is None for c in corrs) or out.ch_mean is None or any(m.channels != out.channels for m in ms):
        return out
    cov = sum((independent(out.channels) if c is None else c) * fluctuation(m)[:, None, None]
              for c, m in zip(corrs, ms))
    return _with(out, _normalised(cov))


def concatenated(ms, out: Moments) -> Moments:
    """Last-axis concatenation: the inputs' channels side by side."""
    corrs = [corr_of(m) for m in ms]
    if all(c is None for c in corrs) or out.ch_mean is None or any(m.ch_mean is None for m in ms):
        return out
    return _with(out, np.concatenate([independent(m.channels) if c is None else c for c, m in zip(corrs, ms)]))


# -- pooling ----------------------------------------------------------------------------------------------


def _pool_pair(out: Moments, m_in: Moments, pool_size, in_shape):
    """(out, m_in) with per-channel numbers for a 2D pool's correlation rules, or None where they do not
    apply (not a 2D map, channels unknown or different)."""
    if not _is_map(in_shape) or len(pool_size) != 2:
        return None
    out, m_in = _channelled(out, in_shape), _channelled(m_in, in_shape)
    if out is None or m_in is None or out.channels != m_in.channels:
        return None
    return out, m_in


def _axis_pairs(sizes):
    """Pairs of entries at each offset -R..R along one axis of windows of the given sizes: (k - |e|)+."""
    offsets = np.abs(np.arange(-RADIUS, RADIUS + 1))
    return np.maximum(np.asarray(sizes)[..., None] - offsets, 0).astype(np.float64)


def _pair_counts(ky, kx):
    """(SIDE, SIDE): pairs of entries of one ky x kx window at each offset."""
    return np.outer(_axis_pairs(ky), _axis_pairs(kx))


def _window_cov(corr, k, strides):
    """Correlation of k-window averages at output offsets d (interior windows): (C, SIDE, SIDE)."""
    ky, kx = k
    big, pad = _strided(corr, strides, reach=max(ky, kx) - 1)
    acc = np.zeros_like(corr)
    for ey in range(-(ky - 1), ky):
        for ex in range(-(kx - 1), kx):
            acc += (ky - abs(ey)) * (kx - abs(ex)) * _sample(big, pad, strides, ey, ex)
    return acc


def average_pool(out: Moments, m_in: Moments, pool_size, strides, padding, in_shape) -> Moments:
    """`out` of a 2D average pool (the independent-positions prediction) with the window's correlated pairs
    added to its variance and the output's correlation set."""
    pair = _pool_pair(out, m_in, pool_size, in_shape)
    if pair is None:
        return out
    out, m_in = pair
    corr = corr_of(m_in)
    ky, kx = int(pool_size[0]), int(pool_size[1])
    if corr is None:
        corr_in = independent(m_in.channels)
        if ky <= strides[0] and kx <= strides[1]:
            return out  # disjoint windows of independent entries: independent outputs
    else:
        corr_in = corr
    out_corr = _normalised(_window_cov(corr_in, (ky, kx), tuple(strides)))
    if corr is not None:
        out = _correlated_average(out, m_in, corr, (ky, kx), tuple(strides), padding)
    return _with(out, out_corr)


def _correlated_average(out, m_in, corr, k, strides, padding):
    """The variance of each window average with its correlated pairs: per window on element maps (its own
    size, padding excluded; each pair's sqrt(u_p u_q) taken as the window's mean u), else the interior
    factor per channel."""
    if m_in.el_mean is not None and out.el_mean is not None and m_in.el_mean.ndim == 3:
        h, w, c = m_in.el_mean.shape
        rows, cols = window_bounds(h, k[0], strides[0], padding), window_bounds(w, k[1], strides[1], padding)
        if (len(rows), len(cols)) != out.el_mean.shape[:2]:
            return out
        s = shared_of(m_in)
        u = np.maximum(m_in.el_var - (0.0 if s is None else s), 0.0)
        off_centre = corr.copy()
        off_centre[:, RADIUS, RADIUS] = 0.0  # the window's own entries are in out.el_var already
        heights = np.array([r1 - r0 for r0, r1 in rows])
        widths = np.array([c1 - c0 for c0, c1 in cols])
        counts = np.outer(heights, widths).astype(np.float64)[..., None]
        # pairs at offset e in an h x w window: (h - |e_y|)+ (w - |e_x|)+, each pair sqrt(u_p u_q) taken as the
        # window's mean u (exact where u is uniform over the window)
        pairs = np.einsum("ia,jb,cab->ijc", _axis_pairs(heights), _axis_pairs(widths), off_centre)
        extra = pairs * (window_sums(u, rows, cols) / counts) / (counts ** 2)
        result = Moments.from_elements(out.el_mean, out.el_var + extra)
        carry_per_example(result, out)
        result.pre = None
        return result
    # 1 for independent entries
    factor = np.tensordot(corr, _pair_counts(k[0], k[1]), axes=([1, 2], [0, 1])) / (k[0] * k[1])
    u = fluctuation(m_in)
    extra = u * (factor - 1.0) / (k[0] * k[1])
    result = Moments.from_channels(out.ch_mean, out.ch_var + extra)
    return carry_per_example(result, out)


@functools.lru_cache(maxsize=None)
def max_overlap_correlation(n: int, shared: int) -> float:
    """Correlation of the maxima of two sets of n independent standard normals sharing `shared` of them.

    With S the max of the shared entries and a, b the maxima of each set's own n - m, max(S, a) and
    max(S, b) are independent given S, so E[M_A M_B] = E_S[g(S)^2], g(s) = E[max(s, a)]; integrated on a
    fine grid (the result does not depend on the entries' mean and variance)."""
    if shared <= 0:
        return 0.0
    if shared >= n:
        return 1.0
    from scipy.special import ndtr

    z = np.linspace(-12.0, 12.0, 24001)
    dz = z[1] - z[0]
    phi = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf = ndtr(z)
    own = n - shared
    f_own = own * phi * cdf ** (own - 1)  # density of a
    # g(s) = s P(a <= s) + E[a; a > s]
    tail = np.cumsum((z * f_own)[::-1])[::-1] * dz
    g = z * cdf ** own + tail
    f_s = shared * phi * cdf ** (shared - 1)
    f_n = n * phi * cdf ** (n - 1)
    mean_n = np.sum(z * f_n) * dz
    var_n = np.sum(z * z * f_n) * dz - mean_n ** 2
    return float((np.sum(g * g * f_s) * dz - mean_n ** 2) / var_n)


#: Gauss-Hermite nodes over the common factor of a window's correlated entries (`correlated_max`): the
#: pooled moments are smooth in it, and 5 nodes integrate polynomials of degree 9 exactly.
_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(5)
_GH_W = _GH_W / _GH_W.sum()
#: Below this average correlation between a window's entries the max pool treats them as independent.
MIN_WINDOW_CORRELATION = 0.01


def _mean_pair_correlation(corr, ky, kx):
    """Per channel, the average correlation between two entries of one interior ky x kx window."""
    n = ky * kx
    return np.clip((np.tensordot(corr, _pair_counts(ky, kx), axes=([1, 2], [0, 1])) - n) / (n * (n - 1)), 0.0, 0.999)


def window_correlation(m: Moments, pool_size, in_shape):
    """Per channel, the average correlation between two entries of one pooling window (interior window),
    clipped to [0, 1); None when `m` carries no correlation or it is below `MIN_WINDOW_CORRELATION`."""
    corr = corr_of(m)
    if corr is None or not _is_map(in_shape) or len(pool_size) != 2:
        return None
    ky, kx = int(pool_size[0]), int(pool_size[1])
    if ky * kx < 2:
        return None
    rho = _mean_pair_correlation(corr, ky, kx)
    return rho if float(rho.max()) >= MIN_WINDOW_CORRELATION else None


def correlated_max(pool, m: Moments, rho, independent: Moments, *args):
    """Max pooling of entries with average correlation rho (per channel).

    Each entry is taken as X_i = mu_i + s_i (sqrt(rho) Z_0 + sqrt(1 - rho) Z_i), one common Z_0 per window
    (equicorrelation): per channel, the max is pooled for each of 5 Gauss-Hermite values of Z_0 (means
    shifted by sqrt(rho) s z, variances times 1 - rho) and the results mixed, exact for equicorrelated
    Gaussian windows. Positive correlation lowers the max's mean and raises its variance (InceptionV3's stem
    pool: mean 1.484 predicted for independent entries, 1.404 measured). This runs on the per-channel
    moments (order statistics: cheap), and its change against the per-channel independent max corrects
    `independent`, the rule's own (per-element) result: its means shifted, its variances scaled, per
    channel. `pool(moments, *args)` is the rule's pool; `independent` is returned where it gives None.
    """
    channel = m.per_channel()
    base = pool(channel, *args)
    if base is None or base.ch_mean is None or base.channels != m.channels:
        return independent
    mean = np.zeros(m.channels)
    second = np.zeros(m.channels)
    s = np.sqrt(channel.ch_var)
    for z, w in zip(_GH_Z, _GH_W):
        part = pool(Moments.from_channels(channel.ch_mean + np.sqrt(rho) * s * z, channel.ch_var * (1.0 - rho)), *args)
        if part is None or part.ch_mean is None:
            return independent
        mean += w * part.ch_mean
        second += w * (part.ch_var + part.ch_mean ** 2)
    var = np.maximum(second - mean ** 2, 0.0)
    shift = mean - base.ch_mean
    ratio = np.where(base.ch_var > 0, var / np.where(base.ch_var > 0, base.ch_var, 1.0), 1.0)
    if independent.el_mean is not None and independent.el_mean.shape[-1] == m.channels:
        return Moments.from_elements(independent.el_mean + shift, independent.el_var * ratio)
    if independent.ch_mean is not None and independent.channels == m.channels:
        return Moments.from_channels(independent.ch_mean + shift, independent.ch_var * ratio)
    return Moments.from_channels(mean, var)


def max_pool(out: Moments, m_in: Moments, pool_size, strides, in_shape) -> Moments:
    """`out` of a 2D max pool with its output correlation estimated (module docstring).

    A window's entries with average correlation rho share a common part (variance rho) that the max
    passes on like an average, and an own part whose max is that of independent entries (variance
    (1 - rho) V_k, V_k that of the max of k standard normals). So the average pool's correlation is
    damped by kappa = w + (1 - w) rho_max / rho_avg, w = rho / (rho + (1 - rho) V_k) the common part's
    share (the pool of a 3x3-averaged map: lag-1 correlation 0.487 predicted, 0.484 measured; with the
    independent-entries ratio alone 0.431)."""
    pair = _pool_pair(out, m_in, pool_size, in_shape)
    if pair is None:
        return out
    out, m_in = pair
    ky, kx = int(pool_size[0]), int(pool_size[1])
    sy, sx = int(strides[0]), int(strides[1])
    corr = corr_of(m_in)
    if corr is None and ky <= sy and kx <= sx:
        return out
    corr_in = independent(m_in.channels) if corr is None else corr
    linear = _normalised(_window_cov(corr_in, (ky, kx), (sy, sx)))
    n = ky * kx
    ratio = np.ones((SIDE, SIDE))
    for dy in range(-RADIUS, RADIUS + 1):
        for dx in range(-RADIUS, RADIUS + 1):
            m = max(ky - sy * abs(dy), 0) * max(kx - sx * abs(dx), 0)
            if 0 < m < n:
                ratio[RADIUS + dy, RADIUS + dx] = max_overlap_correlation(n, m) / (m / n)
    lag1 = [ratio[RADIUS + dy, RADIUS + dx] for dy, dx in ((0, 1), (1, 0)) if ratio[RADIUS + dy, RADIUS + dx] != 1.0]
    if lag1:  # offsets whose windows share nothing: the nearest overlap's damping
        ratio = np.where(ratio == 1.0, min(lag1), ratio)
    ratio[RADIUS, RADIUS] = 1.0
    e1, e2 = max_order_statistic(n)
    rho = _mean_pair_correlation(corr_in, ky, kx)
    share = rho / np.maximum(rho + (1.0 - rho) * (e2 - e1 * e1), 1e-12)
    kappa = share[:, None, None] + (1.0 - share[:, None, None]) * ratio[None]
    return _with(out, np.clip(linear * kappa, -1.0, 1.0))


def global_average_variance(m_in: Moments, in_shape):
    """Per channel, the variance of the global average of a 2D map with correlated positions, or None when
    `m_in` carries no correlation."""
    corr = corr_of(m_in)
    if corr is None or not _is_map(in_shape) or any(d is None for d in in_shape[1:3]):
        return None
    h, w = int(in_shape[1]), int(in_shape[2])
    s = shared_of(m_in)
    s = 0.0 if s is None else s
    if m_in.el_mean is not None and m_in.el_mean.shape[:2] == (h, w):
        root = np.sqrt(np.maximum(m_in.el_var - s, 0.0))
        pairs = np.zeros(m_in.channels)
        for ey in range(0, RADIUS + 1):  # corr(e) = corr(-e): each pair of offsets once
            for ex in range(-RADIUS, RADIUS + 1):
                if ey == 0 and ex < 0:
                    continue
                if ey >= h or abs(ex) >= w:
                    continue  # no pair of positions at this offset
                rho = corr[:, RADIUS + ey, RADIUS + ex]
                if not np.any(rho):
                    continue
                a = root[:h - ey, max(0, -ex):w - max(0, ex)]
                b = root[ey:, max(0, ex):w + min(0, ex)]
                both = np.einsum("ijc,ijc->c", a, b)
                pairs += (1.0 if (ey, ex) == (0, 0) else 2.0) * rho * both
        return pairs / (h * w) ** 2 + s
    return fluctuation(m_in) * np.tensordot(corr, _pair_counts(h, w), axes=([1, 2], [0, 1])) / (h * w) ** 2 + s
