"""The `Moments` value and the Gaussian moment maths behind every propagation rule.

A signal is summarised by the mean and variance of all its elements (over examples, positions and
channels). Rules push these two numbers through each operation.

Integrals of the form E[f(X)], E[f(X)^2] for X ~ N(mu, var) are computed with piecewise
Gauss-Legendre quadrature in the standardised variable z = (x - mu) / sqrt(var):

    E[g(X)] = integral g(mu + s z) phi(z) dz,  z in [-L, L] split at fixed panels and at the kinks of g,

with the function evaluated once on all quadrature nodes (one vectorised call). Splitting at kinks
keeps piecewise functions (ReLU, hard sigmoid, ...) exact to ~1e-12, where plain Gauss-Hermite would
only reach ~1e-3. No Monte Carlo is used anywhere in this module.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "Moments",
    "gaussian_expectations",
    "elementwise_moments",
    "max_expectations",
    "max_expectations_cost",
    "max_of_gaussians",
    "max_order_expectations",
    "relu_gaussian_expectations",
    "relu_of_sum_expectations",
    "distinct_rows",
    "hermite_coefficients",
    "centred_square_hermite",
    "piecewise_linear_hermite",
    "mix",
    "standard_normal_quantiles",
]

# Half-width of the integration range in standard deviations; exp(-L^2/2) is far below float64 eps.
_L = 12.0
_PANELS = (-_L, -8.0, -5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0, 8.0, _L)
_NODES_PER_PANEL = 24
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)


class Moments:
    """Mean and variance of a signal (a leaf for `keras.tree`, never a tuple).

    Args:
        mean: the mean of all elements.
        var: the variance of all elements (>= 0), over examples, positions and channels.
        between: the part of `var` that is the variance of the per-channel expected values (fixed
            per-channel offsets that do not average out over examples or positions); the rest,
            ``within = var - between``, fluctuates from element to element. Pooling over positions
            shrinks only the within part. Defaults to 0.
        ch_mean, ch_var: optional per-channel (last axis) means and within-channel variances. When
            present, rules that understand them propagate each channel separately (exact for the
            drawn weights rather than for their expectation); the pooled numbers above are then
            derived from them. Rules that do not, simply use the pooled numbers.
    """

    __slots__ = ("mean", "var", "between", "ch_mean", "ch_var", "el_mean", "el_var", "pre", "sum_of", "shared",
                 "matched", "corr", "const", "visible", "ch_cov", "scale", "given", "keep", "window", "pattern")

    def __init__(self, mean, var, between=0.0, ch_mean=None, ch_var=None, el_mean=None, el_var=None):
        # (pre-activation Moments, numpy fn, kinks) when this signal is a monotone non-decreasing
        # activation of a Gaussian: max pooling then commutes with the activation.
        self.pre = None
        # (activated Moments with `pre`, rest Moments) when this signal is f(P) + R with R independent and
        # Gaussian (a residual sum of an activation and a branch): a ReLU after it integrates over P.
        self.sum_of = None
        # Per channel, the variance over examples of each example's own channel mean: the part of the
        # variance that every position of one example shares (after a squeeze-and-excitation gate), which
        # global pooling does not average out (`autoinit_tf.rules.shared_part`). None: not tracked (0).
        self.shared = None
        # True for a Gaussian that only matches the first two moments of what its activation's output really
        # is (`rules.activation.relu_matched_pre`): exact where only those moments matter, an approximation
        # where the whole distribution does (the max of several).
        self.matched = False
        # Per channel, the correlation between positions at each spatial offset of a 2D feature map (an
        # array (C, 2R+1, 2R+1), `autoinit_tf.rules.spatial_correlation`). None: positions independent.
        self.corr = None
        # The tensor's value itself (a numpy array, batch axis 1 or the traced batch) when it is the same for
        # every example: masks made from the probe's all-ones padding mask and constant index arithmetic
        # (a causal mask). `Moments.constant`; None for a signal.
        self.const = None
        # Logits with a known additive mask (entries of -30 or less: Swin's shifted windows add -100): a
        # boolean array (rows, last axis), True where an entry is not masked, for the softmax after them
        # (`rules.ops`); the moments are those of the entries that are not masked. None: no mask.
        self.visible = None
        # The covariance matrix (C, C) between the channels (last axis) over examples and positions, whose
        # diagonal is `ch_var`, when the channels are known to be correlated and it was measured (a recurrent
        # layer's simulated state: its units share one recurrence). A Dense reading these channels then has
        # variance w_j^T Cov w_j per unit, not sum_c w_cj^2 v_c. None: channels taken as uncorrelated.
        self.ch_cov = None
        # The variance over examples of the log of each example's own energy factor (`rules.shared_part`:
        # after squeeze-and-excitation gates every example's map has its own scale, common to its channels).
        # None: not tracked (every example alike).
        self.scale = None
        # For a tensor with one value per example and channel (a global pool, the gate computed from it), or the
        # activation that feeds one: the channel means and variances of an example given its log-scale, at
        # the latent's quadrature nodes (`rules.shared_part.Given`). None: not tracked.
        self.given = None
        # The keep probability of the per-example mask an inverted dropout with one mask per example just
        # applied (stochastic depth's drop-connect): an example's energy is 0 or 1 / keep times the
        # average, which the sum after it mixes into the log-scale (`rules.shared_part.added`). None: no mask.
        self.keep = None
        # Inside window attention's window space, or on a feature map after it: which part of `between` only a
        # window's positions share (`rules.windows.Folded` / `Unfolded`). None: all of it is the example's.
        self.window = None
        # The part of `within` that is a pattern over positions, the same for every example and summing to
        # zero over the positions of each (a position table, less its per-channel means, which are in
        # `between`): attention's weights, summing to one, average it away where they are uniform, so the
        # attended values keep P (T A2 - 1) / (T - 1) of it, not P A2 (`rules.attention`). None: 0.
        self.pattern = None
        self.el_mean = el_mean
        self.el_var = el_var
        self.ch_mean = None if ch_mean is None else np.asarray(ch_mean, dtype=np.float64).reshape(-1)
        self.ch_var = None if ch_var is None else np.maximum(np.asarray(ch_var, dtype=np.float64).reshape(-1), 0.0)
        self.mean = float(mean)
        var = float(var)
        if var < 0.0:
            if var > -1e-12 * max(1.0, abs(self.mean) ** 2):
                var = 0.0
            else:
                raise ValueError(f"Moments variance must be >= 0, got {var}.")
        self.var = var
        self.between = min(max(float(between), 0.0), var)

    @property
    def within(self) -> float:
        """The element-to-element part of the variance, var - between."""
        return self.var - self.between

    def set_pattern(self, pattern) -> "Moments":
        """Set `pattern` (None: leave it unset), at most the independent part `within`; returns self."""
        if pattern is not None:
            self.pattern = min(max(float(pattern), 0.0), self.within)
        return self

    @property
    def second(self) -> float:
        """The second moment E[x^2] = var + mean^2."""
        return self.var + self.mean * self.mean

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @classmethod
    def from_second(cls, mean, second, between=0.0):
        return cls(mean, max(float(second) - float(mean) ** 2, 0.0), between)

    @classmethod
    def from_channels(cls, ch_mean, ch_var):
        """Pooled moments of channels with means `ch_mean` and within-channel variances `ch_var`."""
        ch_mean = np.asarray(ch_mean, dtype=np.float64).reshape(-1)
        ch_var = np.maximum(np.asarray(ch_var, dtype=np.float64).reshape(-1), 0.0)
        mean = float(ch_mean.mean())
        between = float(ch_mean.var())
        return cls(mean, between + float(ch_var.mean()), between, ch_mean, ch_var)

    @classmethod
    def constant(cls, value):
        """Moments of a tensor that is `value` for every example: its entries' mean and variance, all of it
        fixed by position (`between`), and the value itself (`const`)."""
        arr = np.asarray(value)
        flat = arr.astype(np.float64).reshape(-1) if arr.size else np.zeros(1)
        var = float(flat.var())
        out = cls(float(flat.mean()), var, var)
        out.const = arr
        return out

    @classmethod
    def from_channel_second(cls, ch_mean, ch_second):
        ch_mean = np.asarray(ch_mean, dtype=np.float64)
        return cls.from_channels(ch_mean, np.asarray(ch_second, dtype=np.float64) - ch_mean**2)

    @classmethod
    def from_elements(cls, el_mean, el_var):
        """Moments of a feature map whose every element (position, channel) has its own mean and variance.

        Elements are assumed independent across positions. The per-channel and pooled numbers are
        derived (channels = last axis).
        """
        el_mean = np.asarray(el_mean, dtype=np.float64)
        el_var = np.maximum(np.asarray(el_var, dtype=np.float64), 0.0)
        c = el_mean.shape[-1]
        flat = el_mean.reshape(-1, c)
        ch_mean = flat.mean(axis=0)
        # the mean square by a contraction, no map-sized temporaries (3.7x faster on 24 x 24 x 728)
        ch_second = el_var.reshape(-1, c).mean(axis=0) + np.einsum("pc,pc->c", flat, flat) / max(flat.shape[0], 1)
        m = cls.from_channel_second(ch_mean, ch_second)
        m.el_mean, m.el_var = el_mean, el_var
        return m

    @property
    def el_second(self):
        return None if self.el_mean is None else self.el_var + self.el_mean**2

    def per_channel(self) -> "Moments":
        """The same moments without per-element detail."""
        if self.ch_mean is None:
            return self
        out = Moments(self.mean, self.var, self.between, self.ch_mean, self.ch_var)
        out.shared = self.shared
        out.corr = self.corr
        out.scale = self.scale
        out.given = self.given
        return out

    @property
    def channels(self):
        """The number of tracked channels, or None."""
        return None if self.ch_mean is None else int(self.ch_mean.size)

    @property
    def ch_second(self):
        return None if self.ch_mean is None else self.ch_var + self.ch_mean**2

    def pooled(self) -> "Moments":
        """The same moments without per-channel detail."""
        return Moments(self.mean, self.var, self.between)

    def scaled(self, a, b=0.0) -> "Moments":
        """Moments of a * x + b."""
        if self.el_mean is not None:
            out = Moments.from_elements(a * self.el_mean + b, a * a * self.el_var)
        elif self.ch_mean is not None:
            out = Moments.from_channels(a * self.ch_mean + b, a * a * self.ch_var)
        else:
            return Moments(a * self.mean + b, a * a * self.var, a * a * self.between)
        out.shared = None if self.shared is None else a * a * self.shared
        out.corr = self.corr
        out.scale = self.scale
        out.given = None if self.given is None else self.given.affine(a, b)
        return out

    def is_finite(self) -> bool:
        return math.isfinite(self.mean) and math.isfinite(self.var)

    def __iter__(self):  # allows `mean, var = moments`
        yield self.mean
        yield self.var

    def __eq__(self, other):
        return (isinstance(other, Moments) and other.mean == self.mean and other.var == self.var
                and other.between == self.between)

    def __hash__(self):
        return hash((self.mean, self.var, self.between))

    def __repr__(self):
        extra = f", between={self.between:.6g}" if self.between else ""
        if self.ch_mean is not None:
            extra += f", channels={self.ch_mean.size}"
        return f"Moments(mean={self.mean:.6g}, var={self.var:.6g}{extra})"


def mix(parts) -> Moments:
    """Moments of a mixture: `parts` is a list of (weight, Moments); weights need not sum to 1.

    Channels coming from different parts keep their offsets: the mixture's between-channel variance
    is sum_i w_i (between_i + mean_i^2) - mean^2.
    """
    total = float(sum(w for w, _ in parts))
    if total <= 0:
        raise ValueError("mix() needs a positive total weight.")
    shapes = {None if m.el_mean is None else m.el_mean.shape for _, m in parts}
    if len(shapes) == 1 and None not in shapes:
        el_mean = sum(w * m.el_mean for w, m in parts) / total
        el_second = sum(w * m.el_second for w, m in parts) / total
        return Moments.from_elements(el_mean, el_second - el_mean**2)
    sizes = {m.channels for _, m in parts}
    if len(sizes) == 1 and None not in sizes:  # the same channels, mixed channel by channel
        ch_mean = sum(w * m.ch_mean for w, m in parts) / total
        ch_second = sum(w * m.ch_second for w, m in parts) / total
        return Moments.from_channel_second(ch_mean, ch_second)
    mean = sum(w * m.mean for w, m in parts) / total
    second = sum(w * m.second for w, m in parts) / total
    between = sum(w * (m.between + m.mean * m.mean) for w, m in parts) / total - mean * mean
    return Moments.from_second(mean, second, between)


@functools.lru_cache(maxsize=64)
def _nodes_for(kinks_z: tuple) -> tuple:
    """Gauss-Legendre nodes and weights on [-L, L] split at the panels and at `kinks_z`."""
    cuts = sorted(set(_PANELS) | {k for k in kinks_z if -_L < k < _L})
    zs, ws = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a < 1e-12:
            continue
        half = 0.5 * (b - a)
        zs.append(half * _GL_X + 0.5 * (a + b))
        ws.append(half * _GL_W)
    z = np.concatenate(zs)
    w = np.concatenate(ws) * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z, w


def gaussian_expectations(fn, mean, var, kinks=(), powers=(1, 2)):
    """E[fn(X)^p] for X ~ N(mean, var) and each p in `powers`.

    Args:
        fn: a vectorised function taking and returning a float64 numpy array.
        kinks: points (in x) where fn or its derivative is discontinuous.
    """
    mean = float(mean)
    var = float(var)
    if var <= 0.0:
        y = np.asarray(fn(np.array([mean])), dtype=np.float64)[0]
        return tuple(float(y**p) for p in powers)
    s = math.sqrt(var)
    kz = tuple(sorted(round((k - mean) / s, 12) for k in kinks if k is not None and math.isfinite(k)))
    z, w = _nodes_for(kz)
    y = np.asarray(fn(mean + s * z), dtype=np.float64).reshape(-1)
    return tuple(float(np.dot(w, y**p)) for p in powers)



#: Mantissa bits `distinct_rows` compares: entries equal to 2^-22 (~2.4e-7) relative count as equal. Far
#: below the coarse quadrature's own ~1e-6, above the float32 rounding that makes equal interior positions
#: of a convolution's element map differ in their last bits.
DISTINCT_BITS = 22

# Fixed odd multipliers of the row hash (seeded: the same rows hash alike in every run).
_HASH_MULTIPLIERS = np.random.default_rng(0x5EED).integers(1, 2**62, size=64, dtype=np.int64) * 2 + 1


def distinct_rows(*columns):
    """(first, inverse): one representative row per group of equal rows, and each row's group.

    `columns` are arrays of shape (rows,) or (rows, q). Entries are compared on their sign, exponent and
    leading `DISTINCT_BITS` mantissa bits (a relative resolution per entry, so small values stay
    distinct from zero), so positions of an element map that are equal but for float32 rounding (away
    from the borders) share one integration. Rows are grouped by a 64-bit hash of those truncated
    entries (a sort of one integer per row, not a sort of whole rows); two different rows share a hash
    with probability ~2^-64 per pair.
    """
    shift = np.int64(52 - DISTINCT_BITS)
    ints = [np.right_shift(np.ascontiguousarray(col, dtype=np.float64).reshape(len(col), -1).view(np.int64), shift)
            for col in columns]
    ints = np.concatenate(ints, axis=1)
    mult = _HASH_MULTIPLIERS
    while len(mult) < ints.shape[1]:
        mult = np.concatenate([mult, mult * 3 + 2])
    with np.errstate(over="ignore"):
        h = np.sum(ints * mult[: ints.shape[1]], axis=1)  # wraps modulo 2^64
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_W = _GH_W / _GH_W.sum()


def elementwise_moments(fn, m: Moments, kinks=()) -> Moments:
    """Moments of fn(X) for X ~ N(m.mean, m.var), fn applied elementwise.

    When part of the variance is between channels (channel offsets d ~ N(0, between), elements
    N(mean + d, within) inside a channel), the channel means g(d) = E[fn(mean + d + e)] are
    integrated over d with 24-point Gauss-Hermite, giving the output's own between-channel part.
    All evaluations of fn happen in one vectorised call.
    """
    if m.el_mean is not None:
        # Elements away from the borders share their statistics: integrate each distinct pair once.
        mean, var = m.el_mean.reshape(-1), m.el_var.reshape(-1)
        first, inverse = distinct_rows(mean, var)
        e1, e2 = many_expectations(fn, mean[first], var[first], kinks)
        return Moments.from_elements(e1[inverse].reshape(m.el_mean.shape),
                                     (e2 - e1 * e1)[inverse].reshape(m.el_mean.shape))
    if m.ch_mean is not None:
        e1, e2 = channel_expectations(fn, m.ch_mean, m.ch_var, kinks)
        return Moments.from_channels(e1, e2 - e1 * e1)
    if m.between <= 0.0 or m.within <= 0.0:
        e1, e2 = gaussian_expectations(fn, m.mean, m.var, kinks)
        return Moments.from_second(e1, e2, m.var if m.within <= 0.0 and m.var > 0 else 0.0)
    s = math.sqrt(m.within)
    centres = m.mean + math.sqrt(m.between) * _GH_Z
    zs, ws, sizes = [], [], []
    for c in centres:
        kz = tuple(sorted(round((k - c) / s, 12) for k in kinks if k is not None and math.isfinite(k)))
        z, w = _nodes_for(kz)
        zs.append(c + s * z)
        ws.append(w)
        sizes.append(len(z))
    y = np.asarray(fn(np.concatenate(zs)), dtype=np.float64).reshape(-1)
    g1 = np.empty(len(centres))
    g2 = np.empty(len(centres))
    start = 0
    for i, (w, n) in enumerate(zip(ws, sizes)):
        seg = y[start : start + n]
        g1[i] = np.dot(w, seg)
        g2[i] = np.dot(w, seg * seg)
        start += n
    mean = float(np.dot(_GH_W, g1))
    second = float(np.dot(_GH_W, g2))
    between = float(np.dot(_GH_W, g1 * g1)) - mean * mean
    return Moments.from_second(mean, second, between)


_GL_X8, _GL_W8 = np.polynomial.legendre.leggauss(8)
_GL_X4, _GL_W4 = np.polynomial.legendre.leggauss(4)


def _gl(coarse):
    return (_GL_X8, _GL_W8) if coarse else (_GL_X, _GL_W)


@functools.lru_cache(maxsize=2)
def _shared_nodes(coarse):
    """`_channel_nodes`' (z, w) of one channel without kinks, (panels, nodes), read-only."""
    z, w = _piecewise_nodes(np.asarray(_PANELS, dtype=np.float64)[None, :], *_gl(coarse))
    z, w = z[0], w[0]
    z.flags.writeable = False
    w.flags.writeable = False
    return z, w


def _channel_nodes(means, variances, kinks, coarse):
    """(means, sds, z, w): per channel, the panels' Gauss-Legendre nodes z (C, panels, nodes) in the
    standardised variable, split at that channel's kinks, and their weights times the normal density."""
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    s = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0))
    cuts = _kink_cuts(kinks, means, s)
    if not cuts.shape[1]:  # the same standardised nodes for every channel: computed once, broadcast (no copy)
        z, w = _shared_nodes(bool(coarse))
        shape = (means.size,) + z.shape
        return means, s, np.broadcast_to(z, shape), np.broadcast_to(w, shape)
    base = np.broadcast_to(np.asarray(_PANELS), (means.size, len(_PANELS)))
    z, w = _piecewise_nodes(np.sort(np.concatenate([base, cuts], axis=1), axis=1), *_gl(coarse))
    return means, s, z, w


def channel_expectations(fn, means, variances, kinks=(), coarse=False):
    """E[fn(X_c)] and E[fn(X_c)^2] for X_c ~ N(means[c], variances[c]), every channel at once.

    Each channel gets its own panels (the fixed ones plus its kinks mapped to z), all evaluated in
    one vectorised call of fn. `coarse` uses 8 instead of 24 nodes per panel (relative error
    ~1e-6 instead of ~1e-12), for per-element maps with many thousands of entries.
    """
    means, s, z, w = _channel_nodes(means, variances, kinks, coarse)
    if w.strides[0] == 0:  # shared nodes: one weight vector for every channel
        zv, wv = z[0].reshape(-1), w[0].reshape(-1)
        e1, e2 = np.empty(means.size), np.empty(means.size)
        step = max(1, _EXPECTATION_BLOCK // zv.size)
        for i in range(0, means.size, step):  # blocks that stay in cache (one large block: 30% slower)
            x = np.multiply.outer(s[i:i + step], zv)
            x += means[i:i + step, None]
            y = np.asarray(fn(x.reshape(-1)), dtype=np.float64).reshape(x.shape)
            e1[i:i + step] = y @ wv
            e2[i:i + step] = (y * y) @ wv
        return e1, np.maximum(e2, e1 * e1)
    x = means[:, None, None] + s[:, None, None] * z
    y = np.asarray(fn(x.reshape(-1)), dtype=np.float64).reshape(x.shape)
    e1 = np.sum(w * y, axis=(1, 2))
    e2 = np.sum(w * y * y, axis=(1, 2))
    return e1, np.maximum(e2, e1 * e1)


#: `channel_expectations` evaluates fn on blocks of at most this many nodes (512 KiB of float64).
_EXPECTATION_BLOCK = 1 << 16


def hermite_coefficients(fn, means, variances, kinks=(), order=8):
    """Normalised Hermite coefficients of fn on each channel's Gaussian, and fn's variance there.

    For X_c = mu_c + s_c Z, ``coef[c, n - 1] = E[fn(X_c) He_n(Z)] / sqrt(n!)`` (n = 1..order, He_n the
    probabilists' Hermite polynomials) and ``var[c] = Var fn(X_c)``. By Mehler's formula, two such
    entries whose standardised Gaussians have correlation rho have

        Cov(fn(X), fn(X')) = sum_{n >= 1} coef_n^2 rho^n,      Var fn(X) = sum_{n >= 1} coef_n^2,

    so the coefficients map a correlation before an activation to the one after it. Quadrature as in
    `channel_expectations` with its coarse panels (8 nodes each, ~1e-6); channels whose mean / sd and sd
    agree to 0.5% share one integration (a correlation needs no more: BatchNormalization makes most
    channels alike).
    """
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    s = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        key_m = np.nan_to_num(np.round(means / np.maximum(s, 1e-300) * 200.0), posinf=1e9, neginf=-1e9)
        key_s = np.round(np.log(np.maximum(s, 1e-300)) * 200.0)
    key = np.clip(key_m, -1e9, 1e9).astype(np.int64) * 4_000_037 + np.clip(key_s, -2e6, 2e6).astype(np.int64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if first.size < means.size:
        coef, var = hermite_coefficients_exact(fn, means[first], s[first] ** 2, kinks, order)
        inverse = inverse.reshape(-1)
        return coef[inverse], var[inverse]
    return hermite_coefficients_exact(fn, means, s * s, kinks, order)


def piecewise_linear_hermite(pieces, means, variances, order=8):
    """`hermite_coefficients` in closed form for a piecewise-linear fn (`pieces`: (lo, hi, (a, b)) with
    f = a + b x on (lo, hi), as `rules.activation.PIECEWISE_POLYNOMIAL`), or None for higher degrees.

    By Stein's identity E[g(Z) He_n(Z)] = E[g^(n)(Z)] for g(z) = f(mu + s z): with z_k = (x_k - mu) / s the
    kinks, J_k the jumps of the slope and D_k those of the value there,

        n = 1:   E[g'] = s sum_p b_p P(piece p) + sum_k D_k phi(z_k)
        n >= 2:  E[g^(n)] = s sum_k J_k He_{n-2}(z_k) phi(z_k) + sum_k D_k He_{n-1}(z_k) phi(z_k)

    and Var f from `piecewise_polynomial_expectations`."""
    if any(len(c) > 2 for _, _, c in pieces):
        return None
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    s = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0))
    e1, e2 = piecewise_polynomial_expectations(pieces, means, s)
    var = np.maximum(np.asarray(e2) - np.asarray(e1) ** 2, 0.0)
    safe = np.where(s > 0, s, 1.0)

    def coef(c, i):
        return float(c[i]) if len(c) > i else 0.0

    first = np.zeros_like(means)
    jumps = []  # (z_k, slope jump, value jump)
    for p, (lo, hi, c) in enumerate(pieces):
        zlo = (lo - means) / safe if math.isfinite(lo) else np.full_like(means, -np.inf)
        zhi = (hi - means) / safe if math.isfinite(hi) else np.full_like(means, np.inf)
        first += s * coef(c, 1) * (_norm_cdf(zhi) - _norm_cdf(zlo))
        if p + 1 < len(pieces):
            nxt = pieces[p + 1][2]
            value_jump = coef(nxt, 0) + coef(nxt, 1) * hi - coef(c, 0) - coef(c, 1) * hi
            jumps.append((zhi, coef(nxt, 1) - coef(c, 1), value_jump))
    out = np.zeros((means.size, order))
    out[:, 0] = first
    for z, jump_slope, jump_value in jumps:
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        out[:, 0] += jump_value * pdf
        h_prev, h = np.zeros_like(z), np.ones_like(z)  # He_{-1} (unused), He_0
        for n in range(2, order + 1):  # He_{n-2} = h; He_{n-1} = z h - (n - 2) He_{n-3}
            h_next = z * h - (n - 2) * h_prev
            out[:, n - 1] += s * jump_slope * h * pdf + jump_value * h_next * pdf
            h_prev, h = h, h_next
    factorial = np.cumprod(np.arange(1, order + 1, dtype=np.float64))
    out = np.where(s[:, None] > 0, out / np.sqrt(factorial)[None, :], 0.0)
    return out, var


def hermite_coefficients_exact(fn, means, variances, kinks=(), order=8):
    """`hermite_coefficients` integrated for every channel (no sharing)."""
    means, s, z, w = _channel_nodes(means, variances, kinks, coarse=True)
    y = np.asarray(fn((means[:, None, None] + s[:, None, None] * z).reshape(-1)), dtype=np.float64).reshape(z.shape)
    e1 = np.sum(w * y, axis=(1, 2))
    var = np.maximum(np.sum(w * y * y, axis=(1, 2)) - e1 * e1, 0.0)
    return _hermite_projections(y, z, w, order), var


def _hermite_projections(y, z, w, order):
    """(rows, order): sum over the nodes of w y He_n(z) / sqrt(n!), n = 1..order (probabilists' Hermite
    polynomials by their recurrence), for values `y` at standardised nodes `z` with weights `w` (rows, ...)."""
    coef = np.empty((y.shape[0], order))
    h_prev, h = np.ones_like(z), z
    factorial = 1.0
    for n in range(1, order + 1):
        factorial *= n
        coef[:, n - 1] = np.sum(w * y * h, axis=(1, 2)) / math.sqrt(factorial)
        h_prev, h = h, z * h - n * h_prev
    return coef


def centred_square_hermite(fn, means, variances, kinks=(), order=8):
    """(coef, var_g, var_f) for g_c = (fn(X_c) - mu_c)^2, X_c ~ N(means[c], variances[c]), mu_c = E fn(X_c):
    g's normalised Hermite coefficients (C, order) on the channel's Gaussian (as `hermite_coefficients`),
    Var g_c and Var fn(X_c), from one evaluation of fn at the coarse nodes (~1e-6); channels with the same
    (mean, variance) integrated once (BatchNormalization makes most channels alike)."""
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    variances = np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0)
    pairs, inverse = np.unique(np.stack([means, variances], axis=1), axis=0, return_inverse=True)
    m, s, z, w = _channel_nodes(pairs[:, 0], pairs[:, 1], kinks, coarse=True)
    y = np.asarray(fn((m[:, None, None] + s[:, None, None] * z).reshape(-1)), dtype=np.float64).reshape(z.shape)
    mu = np.sum(w * y, axis=(1, 2))
    g = (y - mu[:, None, None]) ** 2
    var_f = np.sum(w * g, axis=(1, 2))
    var_g = np.maximum(np.sum(w * g * g, axis=(1, 2)) - var_f * var_f, 0.0)
    coef = _hermite_projections(g, z, w, order)
    inverse = inverse.reshape(-1)
    return coef[inverse], var_g[inverse], var_f[inverse]


#: Above this many distinct (mean, variance) pairs, `many_expectations` interpolates a smooth activation's
#: Gaussian expectations from a Chebyshev grid instead of integrating every pair.
INTERPOLATE_ABOVE = 4096
_CHEB_MEANS, _CHEB_SPREADS = 32, 16
#: Largest error of the interpolant, relative to the range of the values, accepted on its check rows (the
#: quadrature's own error is ~1e-6).
INTERPOLATION_TOLERANCE = 1e-6


def many_expectations(fn, means, variances, kinks=()):
    """E[fn(X_i)] and E[fn(X_i)^2] for many X_i ~ N(means[i], variances[i]) (the distinct elements of an
    element map).

    For a smooth fn (no kinks) and more than `INTERPOLATE_ABOVE` pairs, both are smooth functions of
    (mean, sd) (Gaussian smoothing of an analytic function), so the mean and the variance of fn(X) are
    integrated (coarse panels, ~1e-6) on a 32 x 16 Chebyshev grid over the pairs' range and
    interpolated (barycentric formula, in each coordinate): 512 quadratures instead of one per pair
    (EfficientNetB0's swish maps: up to 200k pairs). The interpolant is checked against the quadrature on 16 of the pairs (the extremes and a
    spread of the rest); above `INTERPOLATION_TOLERANCE` (relative to the values' range) every pair is
    integrated instead. Otherwise `channel_expectations` with coarse panels (~1e-6)."""
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    variances = np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0)
    kinks = [k for k in kinks if k is not None and math.isfinite(k)]
    if kinks or means.size <= INTERPOLATE_ABOVE:
        return channel_expectations(fn, means, variances, kinks, coarse=True)
    sd = np.sqrt(variances)
    grid_m = _chebyshev_points(float(means.min()), float(means.max()), _CHEB_MEANS)
    grid_s = _chebyshev_points(float(sd.min()), float(sd.max()), _CHEB_SPREADS)
    gm, gs = np.meshgrid(grid_m, grid_s, indexing="ij")
    g1, g2 = channel_expectations(fn, gm.reshape(-1), gs.reshape(-1) ** 2, coarse=True)
    # Interpolate the mean and the variance (not E[f^2]: where sd is small, the variance is a small
    # difference of two large second moments).
    g1, gv = g1.reshape(gm.shape), (g2 - g1 * g1).reshape(gm.shape)
    check = np.unique(np.concatenate([[np.argmin(means), np.argmax(means), np.argmin(sd), np.argmax(sd)],
                                      np.linspace(0, means.size - 1, 12).astype(int)]))
    c1, c2 = channel_expectations(fn, means[check], variances[check], coarse=True)
    i1, iv = _interpolate_2d(g1, gv, grid_m, grid_s, means[check], sd[check])
    scale1 = max(float(np.ptp(g1)), float(np.abs(g1).max()), 1e-300)
    if (np.max(np.abs(i1 - c1)) > INTERPOLATION_TOLERANCE * scale1
            or np.max(np.abs(iv - (c2 - c1 * c1))) > INTERPOLATION_TOLERANCE * max(float(np.abs(gv).max()), 1e-300)):
        return channel_expectations(fn, means, variances, kinks, coarse=True)
    e1, ev = _interpolate_2d(g1, gv, grid_m, grid_s, means, sd)
    return e1, e1 * e1 + np.maximum(ev, 0.0)


def _chebyshev_points(lo, hi, n):
    """n Chebyshev points of the first kind on [lo, hi] (n copies of lo when lo == hi)."""
    k = np.arange(n)
    return 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.cos(np.pi * (2 * k + 1) / (2 * n))


def _barycentric_terms(nodes, x):
    """(terms, sums): the unnormalised barycentric terms w_k / (x - x_k) at Chebyshev points of the first
    kind `nodes` (w_k = (-1)^k sin((2k + 1) pi / 2n)) and their row sums; a point on a node takes that
    node's value, a degenerate interval (all nodes equal) the first node's. One (len(x), n) array, divided
    in place (a second full-size temporary cost 3x the arithmetic in page faults), the sums by a product with
    ones (BLAS)."""
    n = len(nodes)
    if np.ptp(nodes) == 0.0:
        out = np.zeros((len(x), n))
        out[:, 0] = 1.0
        return out, np.ones(len(x))
    k = np.arange(n)
    w = (-1.0) ** k * np.sin(np.pi * (2 * k + 1) / (2 * n))
    terms = np.subtract.outer(x, nodes)
    on_node = np.isin(x, nodes)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(w, terms, out=terms)
    if on_node.any():  # exactly on a node: that node's value
        terms[on_node] = (x[on_node, None] == nodes[None, :]).astype(np.float64)
    return terms, terms @ np.ones(n)


def _interpolate_2d(g1, g2, grid_m, grid_s, m, s):
    """Two tables (means x spreads) interpolated at the points (m, s), in blocks of rows: with the
    barycentric terms a (means) and b (spreads), sum_jk a_j G_jk b_k / (sum_j a_j sum_k b_k)."""
    out1 = np.empty(len(m))
    out2 = np.empty(len(m))
    both = np.concatenate([g1, g2], axis=1)  # (means, 2 spreads)
    ns = g1.shape[1]
    step = 1 << 14
    for i in range(0, len(m), step):
        am, am_sum = _barycentric_terms(grid_m, m[i:i + step])
        bs, bs_sum = _barycentric_terms(grid_s, s[i:i + step])
        rows = am @ both
        norm = am_sum * bs_sum
        out1[i:i + step] = np.einsum("ij,ij->i", rows[:, :ns], bs) / norm
        out2[i:i + step] = np.einsum("ij,ij->i", rows[:, ns:], bs) / norm
    return out1, out2


def _norm_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def max_order_statistic(k: int):
    """(E[Z_(k)], E[Z_(k)^2]) of the largest of k i.i.d. standard normals."""
    if k <= 1:
        return 0.0, 1.0
    z, w = _nodes_for(())
    dens = k * np.power(_norm_cdf(z), k - 1)
    return float(np.dot(w * dens, z)), float(np.dot(w * dens, z * z))


def max_of_gaussians(k: int, m: Moments) -> Moments:
    """Moments of the maximum of k i.i.d. N(m.mean, m.var) variables.

    The maximum M = mean + s Z_(k) with Z_(k) the largest order statistic, whose density is
    k phi(z) Phi(z)^(k-1); its first two moments are one-dimensional integrals.
    """
    k = int(k)
    if k <= 1 or m.var == 0.0:
        return Moments(m.mean, m.var)
    z, w = _nodes_for(())
    dens = k * np.power(_norm_cdf(z), k - 1)
    e1 = float(np.dot(w * dens, z))
    e2 = float(np.dot(w * dens, z * z))
    s = m.std
    return Moments(m.mean + s * e1, s * s * max(e2 - e1 * e1, 0.0))


def _identity(x):
    return x


def _piecewise_nodes(edges, gl_x, gl_w):
    """Gauss-Legendre nodes z (rows, panels, q) and weights (times the N(0,1) density) on per-row panel edges."""
    a, b = edges[:, :-1], edges[:, 1:]
    half = 0.5 * (b - a)
    z = half[..., None] * gl_x + (0.5 * (a + b))[..., None]
    w = half[..., None] * gl_w * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z, w


def _kink_cuts(kinks, means, s):
    """The kinks of a function, mapped to the standardised variable of each row, clipped to [-L, L]."""
    kinks = [k for k in kinks if k is not None and math.isfinite(k)]
    if not kinks:
        return np.empty((means.size, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        kz = (np.asarray(kinks)[None, :] - means[:, None]) / s[:, None]
    return np.clip(np.nan_to_num(kz, nan=_L, posinf=_L, neginf=-_L), -_L, _L)


def relu_gaussian_expectations(mu, s):
    """(E[relu(X)], E[relu(X)^2]) for X ~ N(mu, s^2), elementwise over broadcast arrays; with a = mu / s,

        E[relu] = mu Phi(a) + s phi(a),  E[relu^2] = (mu^2 + s^2) Phi(a) + mu s phi(a),

    and relu(mu), relu(mu)^2 where s = 0. Large arrays go in cache-sized blocks (`_BLOCK_NODES`)."""
    return _in_blocks(_relu_gaussian_block, mu, s)


def _in_blocks(block_fn, mu, s):
    """(e1, e2) of the elementwise `block_fn(mu, s)` over broadcast arrays, in cache-sized blocks of
    `_BLOCK_NODES` entries."""
    mu, s = np.broadcast_arrays(np.asarray(mu, dtype=np.float64), np.asarray(s, dtype=np.float64))
    if mu.size <= _BLOCK_NODES:
        return block_fn(mu, s)
    e1 = np.empty(mu.shape)
    e2 = np.empty(mu.shape)
    flat_mu, flat_s, f1, f2 = mu.reshape(-1), s.reshape(-1), e1.reshape(-1), e2.reshape(-1)
    for i in range(0, mu.size, _BLOCK_NODES):
        f1[i:i + _BLOCK_NODES], f2[i:i + _BLOCK_NODES] = block_fn(flat_mu[i:i + _BLOCK_NODES],
                                                                  flat_s[i:i + _BLOCK_NODES])
    return e1, e2


def _relu_gaussian_block(mu, s):
    from scipy.special import ndtr

    live = s > 0
    a = mu / np.where(live, s, 1.0)
    cdf = ndtr(a)
    pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    flat = np.maximum(mu, 0.0)
    e1 = np.where(live, mu * cdf + s * pdf, flat)
    e2 = np.where(live, (mu * mu + s * s) * cdf + mu * s * pdf, flat * flat)
    return e1, e2


#: Quadrature nodes per block of rows: the temporaries of one block (a few float64 arrays of this many
#: entries) stay in the CPU cache, about 2-3x faster than one pass over every row.
_BLOCK_NODES = 1 << 16


def piecewise_polynomial_expectations(pieces, mu, s):
    """(E[f(X)], E[f(X)^2]) for X ~ N(mu, s^2) and f a polynomial on each piece, elementwise over
    broadcast arrays. `pieces`: (lo, hi, coefficients) with f(x) = sum_k c_k x^k on [lo, hi), covering
    the line (ReLU6, leaky and thresholded ReLU, hard sigmoid, hard swish, hard tanh, shrinks). Closed form
    from the truncated moments M_k = E[X^k 1{lo <= X < hi}], with a = (lo - mu) / s, b = (hi - mu) / s:

        M_0 = Phi(b) - Phi(a),  M_1 = mu M_0 + s (phi(a) - phi(b)),
        M_k = mu M_(k-1) + (k - 1) s^2 M_(k-2) + s (lo^(k-1) phi(a) - hi^(k-1) phi(b)),

    then E[f] = sum_k c_k M_k and E[f^2] = sum_k (c * c)_k M_k (the squared polynomial); f(mu) where
    s = 0. Large arrays go in cache-sized blocks (`_BLOCK_NODES`)."""
    pieces = [(float(lo), float(hi), np.asarray(c, dtype=np.float64).reshape(-1)) for lo, hi, c in pieces]
    return _in_blocks(functools.partial(_piecewise_polynomial_block, pieces), mu, s)


def _piecewise_polynomial_block(pieces, mu, s):
    from scipy.special import ndtr

    live = s > 0
    safe = np.where(live, s, 1.0)
    e1 = np.zeros(mu.shape)
    e2 = np.zeros(mu.shape)
    at_mean1 = np.zeros(mu.shape)
    at_mean2 = np.zeros(mu.shape)
    root = math.sqrt(2.0 * math.pi)
    for lo, hi, c in pieces:
        if c.size == 0 or not np.any(c):
            continue
        c2 = np.convolve(c, c)
        ends = []
        for edge in (lo, hi):
            if math.isinf(edge):
                ends.append((1.0 if edge > 0 else 0.0, None))
            else:
                z = (edge - mu) / safe
                ends.append((ndtr(z), np.exp(-0.5 * z * z) / root))
        (cdf_a, pdf_a), (cdf_b, pdf_b) = ends
        moments = [cdf_b - cdf_a]  # M_0
        prev = np.zeros(mu.shape)
        for k in range(1, len(c2)):
            term = mu * moments[-1] + (k - 1) * s * s * prev
            if pdf_a is not None:
                term = term + s * lo ** (k - 1) * pdf_a
            if pdf_b is not None:
                term = term - s * hi ** (k - 1) * pdf_b
            prev = moments[-1]
            moments.append(term)
        e1 += sum(ck * moments[k] for k, ck in enumerate(c))
        e2 += sum(ck * moments[k] for k, ck in enumerate(c2))
        inside = (mu >= lo) & (mu < hi)
        value = np.polynomial.polynomial.polyval(mu, c)
        at_mean1 = np.where(inside, value, at_mean1)
        at_mean2 = np.where(inside, value * value, at_mean2)
    return np.where(live, e1, at_mean1), np.where(live, np.maximum(e2, e1 * e1), at_mean2)


_SUM_PANELS = (-7.0, -4.0, -2.5, -1.25, 0.0, 1.25, 2.5, 4.0, 7.0)


def bivariate_normal_cdf(x, y, rho):
    """Pr(X <= x, Y <= y) for standard normals with correlation rho in (-1, 1), elementwise, by Owen's T:

        Phi2(x, y; rho) = (Phi(x) + Phi(y)) / 2 - T(x, (y - rho x) / (x s)) - T(y, (x - rho y) / (y s)) - beta,

    s = sqrt(1 - rho^2), beta = 1/2 where x y < 0 or (x y = 0 and x + y < 0), else 0; T(0, a) =
    arctan(a) / (2 pi), so a zero x takes a = +-inf by the sign of y - rho x; and Phi2(0, 0; rho) =
    1/4 + arcsin(rho) / (2 pi) (Owen 1956, "Tables for computing bivariate normal probabilities")."""
    x, y, rho = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, rho)))
    s = np.sqrt(np.maximum(1.0 - rho * rho, 0.0))
    return _owen_bvn(x, y, rho, (y - rho * x) / np.where(s > 0, s, 1.0), (x - rho * y) / np.where(s > 0, s, 1.0))


def _owen_bvn(x, y, rho, ky, kx):
    """Owen's formula for Phi2(x, y; rho) given ky = (y - rho x) / s and kx = (x - rho y) / s (computed by the
    caller where it has a stabler form)."""
    from scipy.special import ndtr, owens_t

    with np.errstate(divide="ignore", invalid="ignore"):
        ax = np.where(x != 0, ky / x, np.copysign(np.inf, ky))
        ay = np.where(y != 0, kx / y, np.copysign(np.inf, kx))
    ax = np.where(np.isnan(ax), 0.0, ax)
    ay = np.where(np.isnan(ay), 0.0, ay)
    xy = x * y
    beta = np.where((xy < 0) | ((xy == 0) & (x + y < 0)), 0.5, 0.0)
    out = 0.5 * (ndtr(x) + ndtr(y)) - owens_t(x, ax) - owens_t(y, ay) - beta
    both = (x == 0) & (y == 0)
    if np.any(both):
        out = np.where(both, 0.25 + np.arcsin(np.clip(rho, -1.0, 1.0)) / (2.0 * math.pi), out)
    return np.clip(out, 0.0, 1.0)


def relu_of_relu_sum_expectations(pm, ps, rm, rs):
    """E[relu(relu(P) + R)^k], k = 1, 2, for P ~ N(pm, ps^2), R ~ N(rm, rs^2) independent, ps, rs > 0,
    elementwise, in closed form. Below zero P contributes Pr(P < 0) E[relu(R)^k]; above, relu(P) + R = Y with
    Y = P + R, and (Y, P) is bivariate normal with sd_Y = sqrt(ps^2 + rs^2) and correlation rho = ps / sd_Y,
    so the rest is a truncated bivariate normal moment over {Y > 0, P > 0} (Rosenbaum 1961): with
    h = -mean_Y / sd_Y, k = -pm / ps, h' = (h - rho k) / s = -rm / rs, k' = (k - rho h) / s,
    s = sqrt(1 - rho^2) = rs / sd_Y and L = Phi2(-h, -k; rho),

        E[Z 1] = phi(h) Q(k') + rho phi(k) Q(h'),
        E[Z^2 1] = L + h phi(h) Q(k') + rho^2 k phi(k) Q(h') + rho s phi(k) phi(h'),

    Z = (Y - mean_Y) / sd_Y, Q the upper tail; then E[Y^k 1] follows from Y = mean_Y + sd_Y Z."""
    from scipy.special import ndtr

    pm, ps, rm, rs = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (pm, ps, rm, rs)))
    ym = pm + rm
    ys = np.sqrt(ps * ps + rs * rs)
    rho = ps / ys
    s = rs / ys
    h, k = -ym / ys, -pm / ps
    hp = -rm / rs
    kp = (ps * ps * rm - rs * rs * pm) / (ps * rs * ys)
    root = math.sqrt(2.0 * math.pi)
    phi_h, phi_k, phi_hp = (np.exp(-0.5 * v * v) / root for v in (h, k, hp))
    q_kp, q_hp = ndtr(-kp), ndtr(-hp)
    mass = _owen_bvn(-h, -k, rho, -kp, -hp)
    ez1 = phi_h * q_kp + rho * phi_k * q_hp
    ez2 = mass + h * phi_h * q_kp + rho * rho * k * phi_k * q_hp + rho * s * phi_k * phi_hp
    e1 = ym * mass + ys * ez1
    e2 = ym * ym * mass + 2.0 * ym * ys * ez1 + ys * ys * ez2
    below = ndtr(k)  # Pr(P < 0)
    a = rm / rs
    phi_a, cdf_a = np.exp(-0.5 * a * a) / root, ndtr(a)
    e1 = e1 + below * (rm * cdf_a + rs * phi_a)
    e2 = e2 + below * ((rm * rm + rs * rs) * cdf_a + rm * rs * phi_a)
    e1 = np.maximum(e1, 0.0)  # far in the negative tail the terms cancel to ~1e-16 of the scale, either sign
    return e1, np.maximum(e2, e1 * e1)


def relu_of_sum_expectations(fn, kinks, p_mean, p_var, r_mean, r_var):
    """E[relu(Y)] and E[relu(Y)^2] for Y = fn(P) + R, P ~ N(p_mean, p_var) and R ~ N(r_mean, r_var)
    independent, every row at once (rows deduplicated by `distinct_rows`).

    Given P = x, relu(fn(x) + R) is the ReLU of a Gaussian with mean fn(x) + r_mean
    (`relu_gaussian_expectations`, closed form). That inner expectation is integrated over P in [-7, 7]
    standard deviations by piecewise Gauss-Legendre (4 nodes per panel, `_SUM_PANELS`) split at the kinks
    of fn: ~1e-6 relative where R is about as wide as P, 1e-4 to 3e-4 where R is narrow (sd 0.1 against 1:
    the smoothed kink of relu(fn(x) + R) lies inside a panel; scipy references in tests/test_moments.py).
    Where fn is constant c below its first kink k (ReLU: 0), that part is closed form,
    Pr(P < k) E[relu(c + R)^p], and only [k, 7 sd] is integrated. The residual blocks of Inception-ResNet,
    relu(relu(P) + 0.1 R): the sum is far from Gaussian (a point mass at 0 barely moved), and the Gaussian
    rule lost 10-14% of the second moment per block. When fn is the ReLU itself (those blocks, ResNet's
    relu(relu(BN) + shortcut)) and both parts have spread, the whole is closed form
    (`relu_of_relu_sum_expectations`, a truncated bivariate normal): exact, and InceptionResNetV2's analytic
    wrap 2.6-3.0 s -> 2.0 s.
    """
    p_mean, p_var, r_mean, r_var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (p_mean, p_var, r_mean, r_var))
    first, inverse = distinct_rows(p_mean, p_var, r_mean, r_var)
    pm, ps, rm = p_mean[first], np.sqrt(np.maximum(p_var[first], 0.0)), r_mean[first]
    rs = np.sqrt(np.maximum(r_var[first], 0.0))
    flat, kinks = flat_below_first_kink(fn, kinks)
    if flat == (0.0, 0.0) and _identity_above_kink(fn, flat, kinks):  # the ReLU
        e1, e2 = np.zeros(len(pm)), np.zeros(len(pm))
        live = (ps > 0) & (rs > 0)
        e1[live], e2[live] = relu_of_relu_sum_expectations(pm[live], ps[live], rm[live], rs[live])
        if not np.all(live):
            rest = ~live
            e1[rest], e2[rest] = _relu_of_sum_by_quadrature(fn, flat, kinks, pm[rest], ps[rest], rm[rest], rs[rest])
    else:
        e1, e2 = _relu_of_sum_by_quadrature(fn, flat, kinks, pm, ps, rm, rs)
    return e1[inverse], e2[inverse]


def _relu_of_sum_by_quadrature(fn, flat, kinks, pm, ps, rm, rs):
    """`relu_of_sum_expectations` on distinct rows (pm, ps, rm, rs: means and standard deviations), by
    piecewise Gauss-Legendre over P; `flat`, `kinks` from `flat_below_first_kink`."""
    from scipy.special import ndtr

    safe = np.where(ps > 0, ps, 1.0)
    e1 = np.zeros(len(pm))
    e2 = np.zeros(len(pm))
    start = np.full(len(pm), -_SUM_PANELS[-1])
    if flat is not None:
        k0, c = flat
        zk = np.where(ps > 0, np.clip((k0 - pm) / safe, -_SUM_PANELS[-1], _SUM_PANELS[-1]),
                      np.where(pm < k0, _SUM_PANELS[-1], -_SUM_PANELS[-1]))
        r1, r2 = relu_gaussian_expectations(c + rm, rs)
        below = ndtr(zk) - ndtr(-_SUM_PANELS[-1])
        e1 += below * r1
        e2 += below * r2
        start = zk
    panels = np.asarray(_SUM_PANELS)
    for rows, edges in _panels_from(start, panels, lambda r: _kink_cuts(kinks, pm[r], safe[r])):
        z, w = _piecewise_nodes(edges, _GL_X4, _GL_W4)
        x = pm[rows, None, None] + ps[rows, None, None] * z
        m = np.asarray(fn(x.reshape(-1)), dtype=np.float64).reshape(x.shape) + rm[rows, None, None]
        r1, r2 = relu_gaussian_expectations(m, rs[rows, None, None])
        e1[rows] += np.einsum("ijk,ijk->i", w, r1)
        e2[rows] += np.einsum("ijk,ijk->i", w, r2)
    return e1, np.maximum(e2, e1 * e1)


def _panels_from(start, panels, extra_cuts):
    """Per-row panel edges on [start, panels[-1]]: `start`, the fixed `panels` above it and the row's
    extra cuts (clipped to the interval), yielded as (rows, edges) blocks of rows with equally many
    edges, each small enough (`_BLOCK_NODES`) for the CPU cache. Rows whose interval starts higher get
    fewer panels instead of empty ones."""
    group = np.searchsorted(panels, start, side="right")
    for g in np.unique(group):
        same = np.flatnonzero(group == g)
        inner = panels[g:]
        step = max(1, _BLOCK_NODES // (8 * (len(inner) + 4)))
        for i in range(0, len(same), step):
            rows = same[i:i + step]
            lo = start[rows, None]
            cuts = np.clip(extra_cuts(rows), lo, panels[-1])
            edges = np.concatenate([lo, np.broadcast_to(inner, (len(rows), len(inner))), cuts], axis=1)
            yield rows, np.sort(edges, axis=1)


def flat_below_first_kink(fn, kinks):
    """((k, c), other kinks) when `fn` is the constant c below its first kink k (ReLU: (0, 0)), checked
    on points from just below k down to k - 1e6; else (None, kinks)."""
    kinks = sorted(float(k) for k in kinks if k is not None and math.isfinite(k))
    if not kinks or fn is None:
        return None, tuple(kinks)
    k0 = kinks[0]
    probe = k0 - np.array([1e-12, 1e-9, 1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6]) * max(1.0, abs(k0))
    v = np.asarray(fn(probe), dtype=np.float64).reshape(-1)
    if not (np.all(v == v[0]) and math.isfinite(v[0])):
        return None, tuple(kinks)
    return (k0, float(v[0])), tuple(kinks[1:])


def max_order_expectations(fn, means, variances, k: int, kinks=(), coarse=False):
    """E[g(M)] and E[g(M)^2] for M the largest of k i.i.d. N(means[c], variances[c]), every c at once.

    With M = mu + s Z_(k) and Z_(k) the largest of k standard normals (density k phi(z) Phi(z)^(k-1)),

        E[g(M)^p] = integral g(mu + s z)^p k Phi(z)^(k-1) phi(z) dz,

    by piecewise Gauss-Legendre on [-L, L] split at the kinks of g. `fn` None means g(x) = x.
    Monotone non-decreasing activations commute with the maximum (max f(x_i) = f(max x_i)), so this
    gives max pooling after such an activation exactly, where applying f to a Gaussian with the
    moments of M would not (M is skewed).
    """
    from scipy.special import ndtr

    g = _identity if fn is None else fn
    gl_x, gl_w = _gl(coarse)
    means = np.asarray(means, dtype=np.float64).reshape(-1)
    s = np.sqrt(np.maximum(np.asarray(variances, dtype=np.float64).reshape(-1), 0.0))
    base = np.broadcast_to(np.asarray(_PANELS), (means.size, len(_PANELS)))
    edges = np.sort(np.concatenate([base, _kink_cuts(kinks, means, s)], axis=1), axis=1)
    z, w = _piecewise_nodes(edges, gl_x, gl_w)
    k = max(int(k), 1)
    if k > 1:
        w = w * (k * np.power(ndtr(z), k - 1))
    x = means[:, None, None] + s[:, None, None] * z
    y = np.asarray(g(x.reshape(-1)), dtype=np.float64).reshape(x.shape)
    e1 = np.sum(w * y, axis=(1, 2))
    e2 = np.sum(w * y * y, axis=(1, 2))
    return e1, np.maximum(e2, e1 * e1)


#: Panel edges, in units of a window's largest spread S around its largest mean c, of the common grid
#: `max_expectations` uses for coarse windows whose entries' spreads are within 2x of each other.
_GRID_PANELS = (-8.0, -5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0, 8.0)


def _window_rows(means, variances, valid):
    """Distinct windows: (mu, s, ok) of one representative each (invalid entries zeroed), and the inverse."""
    means = np.asarray(means, dtype=np.float64)
    k = means.shape[-1]
    mu = means.reshape(-1, k)
    var = np.maximum(np.broadcast_to(np.asarray(variances, dtype=np.float64), means.shape), 0.0).reshape(-1, k)
    ok = np.ones_like(mu, dtype=bool) if valid is None else np.broadcast_to(valid, means.shape).reshape(-1, k)
    mu = np.where(ok, mu, 0.0)
    var = np.where(ok, var, 0.0)
    first, inverse = distinct_rows(mu, var, ok)
    return mu[first], np.sqrt(var[first]), ok[first], inverse


def _on_common_grid(s, ok, constants=False):
    """Windows whose valid entries all have spreads within 2x of each other (and none zero); with
    `constants` (g integrated against the CDF alone, `_identity_above_kink`), zero-spread entries (constants:
    a zero padding's border) are allowed beside at least one entry with a spread, the others' spreads
    within 2x of each other."""
    big = np.max(np.where(ok, s, 0.0), axis=1)
    small = np.min(np.where(ok & (s > 0) if constants else ok, s, np.inf), axis=1)
    return (small > 0) & np.isfinite(small) & (small >= 0.5 * big)


def _grid_split(g, kinks):
    """(flat, other kinks, by_parts) for `_max_common_grid`: g's constant part below its first kink
    (`flat_below_first_kink`) and whether g(M) is integrated against the CDF alone (`_identity_above_kink`)."""
    flat, rest = flat_below_first_kink(g, kinks)
    return flat, rest, _identity_above_kink(g, flat, rest)


def _cdf_by_parts(g, kinks) -> bool:
    """Whether `_max_common_grid` integrates g(M) against the CDF alone (g the identity or a ReLU-like
    max(x, k)): then windows with constant entries stay on the common grid (a step of the CDF, no density)."""
    return _grid_split(g, kinks)[2]


def max_expectations_cost(means, variances, kinks=(), coarse=False, valid=None) -> int:
    """How many CDF evaluations `max_expectations` makes for these windows (entries on the last axis), per
    distinct window (`distinct_rows`): on the common grid (coarse, spreads within 2x), k entries x its
    nodes; otherwise k entries x (quadrature nodes of its panels) x k factors, where a window whose
    entries' spreads differ by more than 2x gets 5 panel edges per other entry, else 1."""
    mu, s, ok, _ = _window_rows(means, variances, valid)
    return _max_cost(mu, s, ok, kinks, coarse)


def _max_cost(mu, s, ok, kinks, coarse, constants=False) -> int:
    """`max_expectations_cost` of distinct windows (`_window_rows`); `constants`: see `_on_common_grid`."""
    k = mu.shape[-1]
    q = len(_GL_X8) if coarse else len(_GL_X)
    grid = _on_common_grid(s, ok, constants) if coarse else np.zeros(len(mu), dtype=bool)
    cost = int(grid.sum()) * k * (len(_GRID_PANELS) - 1 + len(tuple(kinks))) * q
    rest = s[~grid]
    if len(rest):
        narrow = bool(np.any(rest.min(axis=1) < 0.5 * rest.max(axis=1)))
        panels = len(_PANELS) - 1 + len(tuple(kinks)) + (k - 1) * (5 if narrow else 1)
        cost += len(rest) * k * panels * q * k
    return cost


def max_expectations(fn, means, variances, kinks=(), valid=None, coarse=False, max_evaluations=None):
    """E[g(M)] and E[g(M)^2] for M = max_i X_i of independent X_i ~ N(means[..., i], variances[..., i]).

    The entries of one maximum lie along the last axis; `valid` (same shape, bool) excludes entries
    (windows with fewer entries). `fn` None means g(x) = x. With Phi_j the CDF of X_j, the density of M is

        f_M(x) = sum_i phi_i(x) prod_{j != i} Phi_j(x),  so  E[g(M)^p] = integral g(x)^p f_M(x) dx.

    Two quadratures of it. Per entry (exact to ~1e-12, or ~1e-9 when `coarse`): each term
    E[g(X_i)^p prod_{j != i} Phi((X_i - mu_j) / s_j)] is a Gaussian expectation in the standardised X_i,
    integrated by piecewise Gauss-Legendre split at the kinks of g and at every other entry's mean, where
    its CDF factor rises (and 2 and 6 s_j / s_i either side of it when that rise is steep, s_j < s_i / 2).
    A zero-variance entry is the constant mu_j with the step CDF 1[x > mu_j] (ties between constants go to
    the first). On a common grid (`coarse` windows whose spreads are within 2x, the usual windows of an
    element map; relative error ~1e-5): f_M itself is integrated once per window by 8-point
    Gauss-Legendre on panels c + S * `_GRID_PANELS` (c the largest mean, S the largest spread; clipped to
    where the density lives) split at the kinks of g, k CDFs and densities per node instead of k x k. Where
    g is the identity or a ReLU (integrated against the CDF alone) windows with constant entries (a zero
    padding's border) stay on the grid too: a constant's CDF is the step 1[x >= mu_j], and M >= the largest
    constant, where the integration starts.
    Windows equal to `DISTINCT_BITS` (`distinct_rows`) are integrated once. Returns arrays of shape
    ``means.shape[:-1]``, or None when that would take more than `max_evaluations` CDF evaluations
    (`max_expectations_cost`).
    """
    g = _identity if fn is None else fn
    means = np.asarray(means, dtype=np.float64)
    out_shape = means.shape[:-1]
    mu, s, ok, inverse = _window_rows(means, variances, valid)
    kinks = tuple(kinks)
    split = _grid_split(g, kinks) if coarse else None  # decided once, for the cost and the grid alike
    constants = split is not None and split[2]
    if max_evaluations is not None and _max_cost(mu, s, ok, kinks, coarse, constants) > max_evaluations:
        return None
    e1 = np.zeros(len(mu))
    e2 = np.zeros(len(mu))
    grid = _on_common_grid(s, ok, constants) if coarse else np.zeros(len(mu), dtype=bool)
    if grid.any():
        e1[grid], e2[grid] = _max_common_grid(g, mu[grid], s[grid], ok[grid], split)
    if not grid.all():
        rest = ~grid
        e1[rest], e2[rest] = _max_per_entry(g, mu[rest], s[rest], ok[rest], kinks, coarse)
    e1, e2 = e1[inverse].reshape(out_shape), e2[inverse].reshape(out_shape)
    return e1, np.maximum(e2, e1 * e1)


def _max_common_grid(g, mu, s, ok, split):
    """(E[g(M)], E[g(M)^2]) per window, f_M integrated on one grid per window (see `max_expectations`);
    `split`: `_grid_split` of g and its kinks.

    Where g is the constant v below its first kink k (ReLU: 0), that part is v^p F_M(k), with
    F_M(k) = prod_j Phi_j(k), and only [k, hi] is integrated.

    Where g is the identity, or max(x, k) (ReLU, k = 0), the moments are integrated by parts against the
    CDF alone: for any a (below k, g(a) = k and the indicator is 1 over the whole range),

        E[g(M)^p] = g(a)^p + integral_k^inf p x^(p-1) (1{x >= a} - F_M(x)) dx,

    here with a = c, a panel edge, where the integrand jumps by p c^(p-1): k CDFs per node and no densities
    (Xception's pools 0.39 -> 0.28 s under the profiler; the same nodes, a smoother integrand)."""
    from scipy.special import ndtr

    full = bool(ok.all())
    masked = (lambda a, fill: a) if full else (lambda a, fill: np.where(ok, a, fill))
    c = np.max(masked(mu, -np.inf), axis=1)
    big = np.max(masked(s, 0.0), axis=1)
    lo = np.max(masked(mu - 8.0 * s, -np.inf), axis=1)  # below lo, some Phi_j < Phi(-8): f_M ~ 0
    hi = c + 8.0 * big
    flat, kinks, by_parts = split
    steps = ok & (s <= 0.0)  # constant entries: only where by_parts (the same `split` chose the windows)
    if steps.any():
        # M >= every constant, and lo >= each of them: from lo on their steps are 1, so F_M is the random
        # entries' product alone
        ok = ok & ~steps
        full = bool(ok.all())
        masked = (lambda a, fill: a) if full else (lambda a, fill: np.where(ok, a, fill))
    safe = masked(s, 1.0)
    e1 = np.zeros(len(mu))
    e2 = np.zeros(len(mu))
    start = lo
    if flat is not None:
        k0, v = flat
        start = np.clip(k0, lo, hi)
        if v != 0.0 and not by_parts:
            below = np.prod(masked(ndtr((start[:, None] - mu) / safe), 1.0), axis=1)
            e1 += v * below
            e2 += v * v * below
    # Below the first panel edge where F_M = prod_j Phi_j is under `_NEGLIGIBLE_CDF`, f_M carries nothing
    # (a max of 9 similar entries: F_M(c - 1.5 S) ~ 1e-11): those panels are not integrated.
    cut = _negligible_below(mu, safe, masked, c, big)
    start = np.maximum(start, cut)
    # The fixed panels, in units of `big` around `c`; a row's interval starts at (start - c) / big.
    rel = (start - c) / big
    kinks = np.asarray(kinks, dtype=np.float64)
    for rows, edges in _panels_from(rel, np.asarray(_GRID_PANELS), lambda r: (kinks[None, :] - c[r, None]) / big[r, None]):
        edges = c[rows, None] + big[rows, None] * np.minimum(edges, _GRID_PANELS[-1])
        edges = np.clip(edges, start[rows, None], hi[rows, None])
        a, b = edges[:, :-1], edges[:, 1:]
        half = 0.5 * (b - a)
        x = (half[..., None] * _GL_X8 + (0.5 * (a + b))[..., None]).reshape(len(rows), -1)
        w = (half[..., None] * _GL_W8).reshape(len(rows), -1)
        zs = [(x - mu[rows, i, None]) / safe[rows, i, None] for i in range(mu.shape[1])]
        if by_parts:
            cdf_m = np.ones_like(x)
            for i, z in enumerate(zs):
                f = ndtr(z)
                cdf_m *= f if full else np.where(ok[rows, i, None], f, 1.0)
            wt = w * ((x >= c[rows, None]) - cdf_m)
            e1[rows] += wt.sum(axis=1)
            e2[rows] += 2.0 * np.einsum("ij,ij->i", wt, x)
            continue
        # f_M = sum_i pdf_i prod_{j != i} cdf_j, with running products from the left and the right.
        cdf = [ndtr(z) for z in zs]
        pdf = [np.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * safe[rows, i, None]) for i, z in enumerate(zs)]
        if not full:
            live = [ok[rows, i, None] for i in range(mu.shape[1])]
            cdf = [np.where(l, f, 1.0) for l, f in zip(live, cdf)]
            pdf = [np.where(l, f, 0.0) for l, f in zip(live, pdf)]
        k = len(cdf)
        after = [None] * k
        run = np.ones_like(x)
        for i in range(k - 1, -1, -1):
            after[i] = run
            run = run * cdf[i]
        density = np.zeros_like(x)
        before = np.ones_like(x)
        for i in range(k):
            density += pdf[i] * before * after[i]
            before = before * cdf[i]
        y = np.asarray(g(x.reshape(-1)), dtype=np.float64).reshape(x.shape)
        wd = w * density
        e1[rows] += np.einsum("ij,ij->i", wd, y)
        e2[rows] += np.einsum("ij,ij->i", wd * y, y)
    if by_parts:
        g_c = np.asarray(g(c), dtype=np.float64)
        e1 += g_c
        e2 += g_c * g_c
    return e1, e2


def _identity_above_kink(g, flat, kinks):
    """Whether g (split by `flat_below_first_kink`) is the identity, or max(x, k) (the ReLU for k = 0)."""
    if kinks:
        return False
    if flat is None:
        probe = np.array([-1e6, -3.0, -0.5, 0.0, 1e-9, 0.5, 2.0, 1e6])
    else:
        k0, v = flat
        if v != k0:
            return False
        probe = k0 + np.array([1e-9, 0.5, 1.0, 3.0, 1e6]) * max(1.0, abs(k0))
    return bool(np.array_equal(np.asarray(g(probe), dtype=np.float64).reshape(-1), probe))


#: `_max_common_grid` drops the panels below the highest panel edge where the CDF of the maximum is below
#: this: what lies below contributes at most this fraction of the largest |g|^p there.
_NEGLIGIBLE_CDF = 1e-15


def _negligible_below(mu, safe, masked, c, big):
    """Per window, the highest of the edges c + S * `_GRID_PANELS` (below c) where the maximum's CDF
    prod_j Phi((x - mu_j) / s_j) is below `_NEGLIGIBLE_CDF` (-inf where none is)."""
    from scipy.special import log_ndtr

    cut = np.full(len(c), -np.inf)
    for e in _GRID_PANELS:
        if e >= 0.0:
            break
        x = c + e * big
        log_cdf = np.sum(masked(log_ndtr((x[:, None] - mu) / safe), 0.0), axis=1)
        cut = np.where(log_cdf < math.log(_NEGLIGIBLE_CDF), x, cut)
    return cut


def _max_per_entry(g, mu, s, ok, kinks, coarse):
    """(E[g(M)], E[g(M)^2]) per window, one Gaussian expectation per entry (see `max_expectations`)."""
    from scipy.special import ndtr

    gl_x, gl_w = _gl(coarse)
    k = mu.shape[1]
    e1 = np.zeros(len(mu))
    e2 = np.zeros(len(mu))
    for i in range(k):
        si = s[:, i]
        safe = np.where(si > 0, si, 1.0)
        others = [j for j in range(k) if j != i]
        cuts = [np.broadcast_to(np.asarray(_PANELS), (len(mu), len(_PANELS))), _kink_cuts(kinks, mu[:, i], si)]
        for j in others:
            c = (mu[:, j] - mu[:, i]) / safe
            r = s[:, j] / safe
            live = ok[:, j] & (si > 0)
            # A factor narrower than half of entry i's spread gets panels across its rise.
            offsets = (-6.0, -2.0, 0.0, 2.0, 6.0) if np.any(live & (r < 0.5)) else (0.0,)
            for off in offsets:
                cut = np.where(live, c + off * r, -_L)
                cuts.append(np.clip(cut, -_L, _L)[:, None])
        edges = np.sort(np.concatenate(cuts, axis=1), axis=1)
        z, w = _piecewise_nodes(edges, gl_x, gl_w)
        x = mu[:, i, None, None] + si[:, None, None] * z
        factor = np.ones_like(x)
        for j in others:
            sj = s[:, j, None, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                cdf = ndtr((x - mu[:, j, None, None]) / np.where(sj > 0, sj, 1.0))
            step = (x > mu[:, j, None, None]) if j > i else (x >= mu[:, j, None, None])
            cdf = np.where(sj > 0, cdf, step)
            factor *= np.where(ok[:, j, None, None], cdf, 1.0)
        y = np.asarray(g(x.reshape(-1)), dtype=np.float64).reshape(x.shape)
        wf = w * factor * ok[:, i, None, None]
        e1 += np.sum(wf * y, axis=(1, 2))
        e2 += np.sum(wf * y * y, axis=(1, 2))
    return e1, e2


def standard_normal_quantiles(n: int) -> np.ndarray:
    """n deterministic N(0, 1) quantile samples sqrt(2) erfinv(2 (j + 0.5) / n - 1)."""
    from scipy.special import ndtri

    return ndtri((np.arange(n) + 0.5) / n)
