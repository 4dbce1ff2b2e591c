"""Activation rules: any elementwise function by quadrature of the real Keras function; softmax.

For an elementwise f and X ~ N(mu, var) (`autoinit_tf.moments.elementwise_moments`):

    mean_out = E[f(X)],   var_out = E[f(X)^2] - mean_out^2,

with the Keras function itself evaluated once on the quadrature nodes, split at its kinks (the table
below) so piecewise-linear functions are integrated exactly.

Softmax over K entries i.i.d. N(mu, v): the output p_i has mean exactly 1/K. Writing
p_i = sigmoid(x_i - log S) with S = sum_{j != i} exp(x_j), and approximating S by a log-normal with
the same mean and variance (Fenton-Wilkinson; exact for K = 2),

    log S ~ N(mu_S, s_S^2),  s_S^2 = log(1 + V / M^2),  mu_S = log M - s_S^2 / 2,
    M = (K-1) e^{mu + v/2},  V = (K-1) (e^v - 1) e^{2 mu + v},

so p_i = sigmoid(D) with D ~ N(mu - mu_S, v + s_S^2): a one-dimensional integral.

Logits with per-class means (`Moments.ch_mean`: a classifier's Dense, whose drawn kernel gives each class its
own offset from the mean of the features before it) are not i.i.d.: class c's logit is N(m_c, v_c), and its
S_c sums the other classes' log-normals, M_c = sum_{j != c} e^{m_j + v_j/2}, V_c = sum_{j != c} (e^{v_j} - 1)
e^{2 m_j + v_j}, each class its own one-dimensional integral (`softmax_per_class_moments`). A 10-class VGG16
head after the analytic wrap (offsets 99% of the logits' variance): softmax variance measured 0.0206, i.i.d.
rule 0.0100, per class 0.0206.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np

from autoinit_tf.moments import (Moments, elementwise_moments, gaussian_expectations, piecewise_polynomial_expectations,
                                 relu_gaussian_expectations, relu_of_sum_expectations)
from autoinit_tf.rules import shared_part, spatial_correlation
from autoinit_tf.rules.registry import BuiltinTable, register_layer, spec_of

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

# Kinks (x positions where f or f' jumps) of Keras' built-in activations, by function name.
ACTIVATION_KINKS = {
    "relu": (0.0,),
    "relu6": (0.0, 6.0),
    "leaky_relu": (0.0,),
    "elu": (0.0,),
    "selu": (0.0,),
    "celu": (0.0,),
    "hard_sigmoid": (-3.0, 3.0),
    "hard_silu": (-3.0, 3.0),
    "hard_swish": (-3.0, 3.0),
    "hard_tanh": (-1.0, 1.0),
    "soft_shrink": (-0.5, 0.5),
    "softsign": (0.0,),
    "hard_shrink": (-0.5, 0.5),
    "sparse_plus": (-1.0, 1.0),
    "sparse_sigmoid": (-1.0, 1.0),
    "threshold": (0.0,),
    "abs": (0.0,),
    "absolute": (0.0,),
}

# Monotone non-decreasing activations: max(f(x_1), ..., f(x_k)) = f(max(x_1, ..., x_k)).
MONOTONE = {"relu", "relu6", "leaky_relu", "elu", "selu", "celu", "sigmoid", "tanh", "softplus", "softsign",
            "hard_sigmoid", "hard_tanh", "exponential", "log_sigmoid", "sparse_plus", "squareplus",
            "sparse_sigmoid"}

# Activations that are not elementwise; they need their own rule.
VECTOR_ACTIVATIONS = {"softmax", "log_softmax", "sparsemax", "glu"}

def register_activation_kinks(fn, kinks) -> None:
    """Declare the kinks of a custom elementwise activation `fn` so quadrature splits there (the
    ``kinks`` field of `fn`'s record in the layer registry)."""
    register_layer(fn, kinks=tuple(kinks))


def activation_name(fn) -> str:
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", type(fn).__name__).lower()


def kinks_of(fn) -> tuple:
    declared = spec_of(fn).kinks
    if declared is not None:
        return declared
    return ACTIVATION_KINKS.get(activation_name(fn), ())


def _backend_function(fn):
    def f(x):
        y = fn(keras.ops.convert_to_tensor(np.asarray(x, dtype="float64"), dtype="float64"))
        return np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)

    return f


def _silu(x):
    """x sigmoid(x) as x (1 + tanh(x / 2)) / 2, in place on one array: 2.4x faster than scipy's expit on this
    project's CPUs (the quadratures evaluate the swish of EfficientNets on ~10^7 nodes per wrap). Against
    x * expit(x): absolute error below 5e-16 max(1, |x|) (1 + tanh cancels for very negative x, where the
    values themselves are below e^x |x|), relative error below 1e-12 for x > -10."""
    y = np.multiply(x, 0.5)
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y


@functools.lru_cache(maxsize=1)
def _numpy_twins() -> dict:
    """NumPy float64 twins of Keras' built-in activations (their default arguments), keyed by the Keras
    function: the quadratures evaluate an activation hundreds of times per network, and one backend call
    costs ~1 ms of dispatch (0.4 of EfficientNetB0's 2 s analytic pass) against microseconds here."""
    from scipy.special import erf, expit

    a = keras.activations
    selu_scale, selu_alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
    twins = {
        a.relu: lambda x: np.maximum(x, 0.0),
        a.relu6: lambda x: np.clip(x, 0.0, 6.0),
        a.leaky_relu: lambda x: np.where(x > 0, x, 0.2 * x),
        a.sigmoid: expit,
        a.tanh: np.tanh,
        a.silu: _silu,
        a.elu: lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
        a.selu: lambda x: selu_scale * np.where(x > 0, x, selu_alpha * np.expm1(np.minimum(x, 0.0))),
        a.softplus: lambda x: np.logaddexp(0.0, x),
        a.softsign: lambda x: x / (1.0 + np.abs(x)),
        a.gelu: lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
        a.hard_sigmoid: lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0,
        a.hard_silu: lambda x: x * (np.clip(x + 3.0, 0.0, 6.0) / 6.0),
        a.mish: lambda x: x * np.tanh(np.logaddexp(0.0, x)),
        a.log_sigmoid: lambda x: -np.logaddexp(0.0, -x),
        a.linear: lambda x: np.asarray(x, dtype=np.float64),
    }
    return {k: (lambda g: lambda x: np.asarray(g(np.asarray(x, dtype=np.float64)), dtype=np.float64))(v)
            for k, v in twins.items()}


#: Where each twin is checked against the backend before its first use (kinks and both tails included).
_TWIN_CHECK = np.concatenate([np.linspace(-40.0, 40.0, 1601), [-3.0, -1e-9, 0.0, 1e-9, 3.0, 6.0]])


@functools.lru_cache(maxsize=64)
def _verified_twin(fn):
    """`fn`'s NumPy twin if it agrees with the backend's own evaluation on `_TWIN_CHECK` to 1e-5 relative (and
    1e-6 absolute): float32 rounding passes (JAX without x64 evaluates in float32; TensorFlow's float64
    leaky_relu and gelu carry float32 constants, 1e-8 off), a different definition does not (gelu's tanh
    form is 5e-4 from its erf form, a hard sigmoid of slope 0.2 10% from relu6(x + 3) / 6): then None,
    and the backend is used."""
    twin = _numpy_twins().get(fn)
    if twin is None:
        return None
    want = _backend_function(fn)(_TWIN_CHECK)
    return twin if np.allclose(twin(_TWIN_CHECK), want, rtol=1e-5, atol=1e-6) else None


def numpy_function(fn):
    """Wrap a Keras (backend) elementwise function so it maps float64 numpy to float64 numpy: Keras'
    built-in activations by their NumPy twins (`_numpy_twins`, checked against the backend once per
    process), every other function through the backend."""
    try:
        twin = _verified_twin(fn)
    except TypeError:  # unhashable callable
        twin = None
    return twin if twin is not None else _backend_function(fn)


@functools.lru_cache(maxsize=4096)
def _cached_elementwise(fn, mean, var, between, kinks):
    return elementwise_moments(numpy_function(fn), Moments(mean, var, between), kinks)


def function_moments(fn, m: Moments, kinks=None, size=None) -> Moments:
    """Moments of activation `fn` (a Keras activation function, name, or callable) applied to m.

    `size` is the number of entries along the softmax axis for vector activations. For monotone
    activations the result remembers its pre-activation (`Moments.pre`) for max pooling.
    """
    out = activation_moments(fn, m, kinks, size)
    name = activation_name(keras.activations.get(fn) if isinstance(fn, str) else fn)
    if shared_part.tracked(m) and out is not m and name not in VECTOR_ACTIVATIONS:
        f = keras.activations.get(fn) if isinstance(fn, str) else fn
        out = shared_part.through_activation(numpy_function(f), kinks_of(f) if kinks is None else tuple(kinks), m,
                                             out, pieces=polynomial_pieces(f))
    if spatial_correlation.corr_of(m) is not None and out is not m and name not in VECTOR_ACTIVATIONS:
        f = keras.activations.get(fn) if isinstance(fn, str) else fn
        out = spatial_correlation.through_activation(numpy_function(f), kinks_of(f) if kinks is None else tuple(kinks),
                                                     m, out, pieces=polynomial_pieces(f))
    if name in MONOTONE and out is not m:
        f = keras.activations.get(fn) if isinstance(fn, str) else fn
        pre = m
        if m.sum_of is not None and name == "relu":  # m is not Gaussian: the Gaussian whose ReLU matches out
            pre = relu_matched_pre(out)
        if pre is not None:
            out.pre = (pre, numpy_function(f), kinks_of(f) if kinks is None else tuple(kinks))
    return out


_ALIKE_POINTS = np.array([-3.0, -1.0, -0.25, 0.0, 0.25, 1.0, 3.0])


def acts_alike(f, g) -> bool:
    """Whether two elementwise functions (`numpy_function` wrappers) are the same activation: they agree on a
    few points on both sides of 0 (wrappers of one Keras function are distinct objects)."""
    return f is g or bool(np.allclose(f(_ALIKE_POINTS), g(_ALIKE_POINTS), rtol=0.0, atol=1e-12))


def is_relu(f) -> bool:
    """Whether elementwise function `f` is max(x, 0) (on the points of `acts_alike`)."""
    return bool(np.allclose(f(_ALIKE_POINTS), np.maximum(_ALIKE_POINTS, 0.0), rtol=0.0, atol=1e-12))


_MATCH_A = np.linspace(-8.0, 8.0, 4001)
_MATCH_G1, _MATCH_G2 = relu_gaussian_expectations(_MATCH_A, 1.0)  # E[relu(Z + a)], E[relu(Z + a)^2]
_MATCH_RATIO = _MATCH_G1**2 / _MATCH_G2  # increasing in a, from 0 to 1


def relu_matched_pre(out: Moments):
    """The Gaussian Q (per element, per channel or pooled, as `out` is) with E[relu(Q)] and E[relu(Q)^2]
    equal to `out`'s first two moments: a = mu/sigma from the ratio E[relu]^2 / E[relu^2], which depends
    on a only (monotone, tabulated on [-8, 8]), then sigma = E[relu] / (a Phi(a) + phi(a)). ReLU of a
    non-Gaussian sum (Inception-ResNet's relu(relu(P) + 0.1 R)) keeps a pre-activation memo this way, so a
    max pool after it integrates over the max of pre-activations whose ReLU has the right moments."""
    if out.el_mean is not None:
        e1, e2, shape = out.el_mean.reshape(-1), out.el_second.reshape(-1), out.el_mean.shape
    elif out.ch_mean is not None:
        e1, e2, shape = out.ch_mean, out.ch_second, None
    else:
        return None
    e1, e2 = np.maximum(e1, 0.0), np.maximum(e2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(e2 > 0, e1 * e1 / np.where(e2 > 0, e2, 1.0), 0.0)
    a = np.interp(ratio, _MATCH_RATIO, _MATCH_A)
    g1, _ = relu_gaussian_expectations(a, 1.0)
    sigma = np.where(e2 > 0, e1 / g1, 0.0)
    mean = np.where(e2 > 0, a * sigma, 0.0)
    if shape is not None:
        out = Moments.from_elements(mean.reshape(shape), (sigma * sigma).reshape(shape))
    else:
        out = Moments.from_channels(mean, sigma * sigma)
    out.matched = True
    return out


def activation_moments(fn, m: Moments, kinks=None, size=None) -> Moments:
    """Moments of activation `fn` applied to `m`, without the pre-activation memo of `function_moments`."""
    if fn is None:
        return m
    if isinstance(fn, str):
        fn = keras.activations.get(fn)
    name = activation_name(fn)
    if name == "linear":
        return m
    if name == "softmax":  # Keras' activations take the last axis
        return softmax_per_class_moments(m) if per_class(m, size) else softmax_moments(m, size)
    if name == "log_softmax":
        return log_softmax_per_class_moments(m) if per_class(m, size) else log_softmax_moments(m, size)
    if name in VECTOR_ACTIVATIONS:
        raise NotImplementedError(f"No closed-form rule for the vector activation {name!r}.")
    kinks = kinks_of(fn) if kinks is None else tuple(kinks)
    if name == "relu" and m.sum_of is not None:
        out = relu_of_sum_moments(m)
        if out is not None:
            return out
    if name == "relu" and m.ch_mean is not None:
        return relu_channel_moments(m)
    pieces = polynomial_pieces(fn)
    if pieces is not None and m.ch_mean is not None:
        return piecewise_moments(pieces, m)
    if m.ch_mean is not None:
        return elementwise_moments(numpy_function(fn), m, kinks)
    try:
        hash(fn)
        return _cached_elementwise(fn, m.mean, m.var, m.between, kinks)
    except TypeError:
        return elementwise_moments(numpy_function(fn), m, kinks)


def relu_channel_moments(m: Moments) -> Moments:
    """ReLU per channel, or per element of an element map, in closed form (`relu_gaussian_expectations`)."""
    per_element = m.el_mean is not None
    mu, s = (m.el_mean, np.sqrt(m.el_var)) if per_element else (m.ch_mean, np.sqrt(m.ch_var))
    e1, e2 = relu_gaussian_expectations(mu, s)
    if per_element:
        return Moments.from_elements(e1, np.maximum(e2 - e1 * e1, 0.0))
    return Moments.from_channel_second(e1, e2)


def relu_of_sum_moments(m: Moments):
    """ReLU of f(P) + R (`Moments.sum_of`: a residual sum of an activation and a Gaussian branch), per
    element or per channel, integrated over P (`moments.relu_of_sum_expectations`); None when the parts
    do not carry matching per-element or per-channel detail."""
    activated, rest = m.sum_of
    pre, fn, kinks = activated.pre
    if m.el_mean is not None and all(x.el_mean is not None and x.el_mean.shape == m.el_mean.shape
                                     for x in (pre, rest)):
        e1, e2 = relu_of_sum_expectations(fn, kinks, pre.el_mean, pre.el_var, rest.el_mean, rest.el_var)
        shape = m.el_mean.shape
        return Moments.from_elements(e1.reshape(shape), (e2 - e1 * e1).reshape(shape))
    if m.ch_mean is not None and pre.channels == m.channels and rest.channels == m.channels:
        e1, e2 = relu_of_sum_expectations(fn, kinks, pre.ch_mean, pre.ch_var, rest.ch_mean, rest.ch_var)
        return Moments.from_channel_second(e1, e2)
    return None


def _lognormal_sum(m: Moments, k: int):
    """(mu_S, s_S^2) of the Fenton-Wilkinson log-normal for a sum of k i.i.d. exp(N(m)).

    With M = k e^(mu + v/2) and V = k (e^v - 1) e^(2 mu + v): s_S^2 = log(1 + (e^v - 1) / k) and
    mu_S = log M - s_S^2 / 2, computed in log space so large logit variances (attention masks adding
    -100 or -inf-like constants) do not overflow."""
    v = float(m.var)
    log_expm1 = v + math.log1p(-math.exp(-v)) if v > 0 else -math.inf  # log(e^v - 1)
    s2 = float(np.logaddexp(0.0, log_expm1 - math.log(k))) if v > 0 else 0.0
    return math.log(k) + m.mean + 0.5 * v - 0.5 * s2, s2


def _against_the_rest(m: Moments, size, what):
    """``(k, d)``: the softmax axis size and the moments of z_i - log(sum_{j != i} exp z_j) (Fenton-Wilkinson),
    so that softmax_i = sigmoid(d) and log_softmax_i = log_sigmoid(d); d is None when k == 1."""
    k = int(size) if size else 0
    if k <= 0:
        raise ValueError(f"{what} needs the static size of the softmax axis.")
    if k == 1:
        return k, None
    mu_s, s2 = _lognormal_sum(m, k - 1)
    return k, Moments(m.mean - mu_s, m.var + s2)


def softmax_moments(m: Moments, size) -> Moments:
    """Moments of softmax entries over `size` i.i.d. N(m) logits (see the module docstring)."""
    k, d = _against_the_rest(m, size, "softmax_moments")
    if d is None:
        return Moments(1.0, 0.0)
    _, e2 = gaussian_expectations(_sigmoid, d.mean, d.var)
    mean = 1.0 / k
    return Moments(mean, max(e2 - mean * mean, 0.0))


#: Above this logit variance the log-normal (Fenton-Wilkinson) softmax is a rough estimate, and large
#: spreads usually come from structure the pooled moments do not carry (attention masks of -100, relative
#: position biases): the call is marked inexact (calibrate="auto" corrects what follows).
SOFTMAX_EXACT_VARIANCE = 4.0


def mark_wide_logits(ctx, m: Moments, classwise: bool) -> None:
    """Mark a softmax call inexact where its logits are too spread for the Fenton-Wilkinson sums: the whole
    variance for i.i.d. logits, the within-class variance where the per-class offsets are carried exactly
    (`classwise`, `softmax_per_class_moments`)."""
    if classwise:
        spread = float(np.mean(m.ch_var))
        if spread > SOFTMAX_EXACT_VARIANCE:
            ctx.inexact(f"softmax of logits with within-class variance {spread:.3g}")
    elif m.var > SOFTMAX_EXACT_VARIANCE:
        ctx.inexact(f"softmax of logits with variance {m.var:.3g} (masks or biases not modelled)")


def per_class(m: Moments, size) -> bool:
    """Whether `m` carries per-class means over a softmax axis of `size` (the last axis) entries, the same for
    every row (no per-position maps, no mask: `Moments.visible`)."""
    return (m.ch_mean is not None and size is not None and m.channels == int(size) and int(size) > 1
            and (m.el_mean is None or np.ndim(m.el_mean) <= 1) and getattr(m, "visible", None) is None)


def _against_the_rest_per_class(mc, vc):
    """(mean, var) per class c of d_c = z_c - log(sum_{j != c} exp z_j) for independent z_c ~ N(mc[c], vc[c])
    (Fenton-Wilkinson per class, the sums in log space: a dominant class leaves the others' sum as a small
    difference)."""
    mc = np.asarray(mc, dtype=np.float64)
    vc = np.maximum(np.asarray(vc, dtype=np.float64), 0.0)
    first = mc + 0.5 * vc  # log e^{m + v/2}
    with np.errstate(divide="ignore"):
        second = 2.0 * mc + vc + np.log(np.expm1(vc))  # log (e^v - 1) e^{2m + v}; -inf where v = 0
    log_m = _log_sum_but_own(first)
    log_v = _log_sum_but_own(second)
    s2 = np.logaddexp(0.0, log_v - 2.0 * log_m)  # log(1 + V / M^2)
    return mc - (log_m - 0.5 * s2), vc + s2


def _log_sum_but_own(terms):
    """log(sum_{j != c} e^{terms_j}) for every c, from the log of the whole sum."""
    from scipy.special import logsumexp

    total = logsumexp(terms)
    if not np.isfinite(total):
        return np.full(terms.shape, -np.inf)
    own = np.minimum(np.exp(terms - total), 1.0 - 1e-16)
    return total + np.log1p(-own)


def _per_class_entries(m: Moments, fn):
    """(E[f(d_c)], E[f(d_c)^2]) per class (24-point Gauss-Hermite). Logits with a `shared_part.Given` (a head
    after squeeze-and-excitation gates: each example's classes shift together with its latent log-scale) go
    node by node, the classes independent given the node, and the nodes' moments are averaged: there the
    classes move together, which a softmax does not see (EfficientNetV2B0's head: softmax variance measured
    0.0050, independent classes 0.0139, node by node 0.0062)."""
    x, w = _HERMITE_24
    g = shared_part.given_of(m, per_example=True)
    nodes = [(1.0, m.ch_mean, m.ch_var)] if g is None or g.channels != m.channels else \
        [(g.w[q], g.mean[q], g.spread[q] + g.within[q]) for q in range(len(g.w))]
    e1 = e2 = 0.0
    for weight, mc, vc in nodes:
        dm, dv = _against_the_rest_per_class(mc, vc)
        y = fn(dm[:, None] + np.sqrt(dv)[:, None] * x[None, :])
        e1 = e1 + weight * (y @ w)
        e2 = e2 + weight * ((y * y) @ w)
    return e1, e2


def softmax_per_class_moments(m: Moments) -> Moments:
    """Softmax entries over the last axis for logits with per-class means (module docstring): per class,
    E[sigmoid(d_c)] and E[sigmoid(d_c)^2], d_c from `_against_the_rest_per_class` (`_per_class_entries`)."""
    e1, e2 = _per_class_entries(m, _sigmoid)
    e1 = e1 / e1.sum()  # the entries sum to one (Fenton-Wilkinson leaves ~1e-5)
    return Moments.from_channels(e1, np.maximum(e2 - e1 * e1, 0.0))


def log_softmax_per_class_moments(m: Moments) -> Moments:
    """Log-softmax entries over the last axis for logits with per-class means: log sigmoid(d_c) per class."""
    e1, e2 = _per_class_entries(m, _log_sigmoid)
    return Moments.from_channels(e1, np.maximum(e2 - e1 * e1, 0.0))


def softmax_tilted_square(m: Moments, size) -> float:
    """E[a_i^2 (z_i - mean)^2] of a softmax entry a_i over `size` i.i.d. N(m) logits z: with R the sum of the
    other entries' exponentials (Fenton-Wilkinson log-normal, independent of z_i), a_i = sigmoid(z_i - log R),
    integrated over (z_i, log R) by a 24 x 24-point Gauss-Hermite rule. The weights' squares favour large
    logits: against E[a_i^2] var(z), over 36 keys of logit variance 1 this is 3.9x (sampled 3.87); the
    large-size limit, where R is a constant, is 1 + 4 var(z)."""
    k, d = _against_the_rest(m, size, "softmax_tilted_square")
    if d is None:
        return float(m.var)
    x, w = _HERMITE_24
    sd_z, sd_r = math.sqrt(max(float(m.var), 0.0)), math.sqrt(max(d.var - float(m.var), 0.0))
    diff = d.mean + sd_z * x[:, None] - sd_r * x[None, :]  # z_i - log R at the nodes
    a2 = _sigmoid(diff) ** 2
    return float(w @ (a2 * (sd_z * x[:, None]) ** 2) @ w)


#: Probabilists' Gauss-Hermite nodes and weights normalized to sum to one (expectations over N(0, 1)).
_HERMITE_24 = (lambda xw: (xw[0], xw[1] / xw[1].sum()))(np.polynomial.hermite_e.hermegauss(24))


def log_softmax_moments(m: Moments, size) -> Moments:
    """Moments of log-softmax entries over `size` i.i.d. N(m) logits."""
    _, d = _against_the_rest(m, size, "log_softmax_moments")
    if d is None:
        return Moments(0.0, 0.0)
    return elementwise_moments(_log_sigmoid, d)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def axis_size(shape, axis) -> int | None:
    if shape is None:
        return None
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    n = 1
    for a in axes:
        d = shape[a]
        if d is None:
            return None
        n *= int(d)
    return n


# -- layers --------------------------------------------------------------------------------------


@BUILTIN.rule(keras.layers.Activation)
def activation_layer_rule(ctx):
    fn = ctx.layer.activation
    size = axis_size(ctx.output_shapes[0], -1)
    return function_moments(fn, ctx.input, size=size)


def piecewise_moments(pieces, m: Moments) -> Moments:
    """A piecewise-polynomial activation (`pieces`, see `PIECEWISE_POLYNOMIAL`) of `m`'s element maps or
    channels, in closed form (`moments.piecewise_polynomial_expectations`)."""
    per_element = m.el_mean is not None
    mu, var = (m.el_mean, m.el_var) if per_element else (m.ch_mean, m.ch_var)
    e1, e2 = piecewise_polynomial_expectations(pieces, mu, np.sqrt(var))
    if per_element:
        return Moments.from_elements(e1, np.maximum(e2 - e1 * e1, 0.0))
    return Moments.from_channel_second(e1, e2)


def relu_layer_pieces(layer):
    """keras.layers.ReLU as polynomial pieces (lo, hi, coefficients): negative_slope (x - threshold) below
    the threshold, x up to max_value, max_value above."""
    t = float(layer.threshold)
    a = float(layer.negative_slope or 0.0)
    top = math.inf if layer.max_value is None else float(layer.max_value)
    pieces = [(-math.inf, t, (-a * t, a)), (t, top, (0.0, 1.0))]
    if top < math.inf:
        pieces.append((top, math.inf, (top,)))
    return pieces


_INF = math.inf
#: Keras activations that are polynomials piece by piece, (lo, hi, coefficients of x^0, x^1, ...), at their
#: default arguments: their moments are closed form (`moments.piecewise_polynomial_expectations`).
PIECEWISE_POLYNOMIAL = {
    "relu": [(-_INF, 0.0, ()), (0.0, _INF, (0.0, 1.0))],
    "relu6": [(-_INF, 0.0, ()), (0.0, 6.0, (0.0, 1.0)), (6.0, _INF, (6.0,))],
    "leaky_relu": [(-_INF, 0.0, (0.0, 0.2)), (0.0, _INF, (0.0, 1.0))],
    "hard_sigmoid": [(-_INF, -3.0, ()), (-3.0, 3.0, (0.5, 1.0 / 6.0)), (3.0, _INF, (1.0,))],
    "hard_silu": [(-_INF, -3.0, ()), (-3.0, 3.0, (0.0, 0.5, 1.0 / 6.0)), (3.0, _INF, (0.0, 1.0))],
    "hard_tanh": [(-_INF, -1.0, (-1.0,)), (-1.0, 1.0, (0.0, 1.0)), (1.0, _INF, (1.0,))],
    "hard_shrink": [(-_INF, -0.5, (0.0, 1.0)), (-0.5, 0.5, ()), (0.5, _INF, (0.0, 1.0))],
    "soft_shrink": [(-_INF, -0.5, (0.5, 1.0)), (-0.5, 0.5, ()), (0.5, _INF, (-0.5, 1.0))],
}


def polynomial_pieces(fn):
    """`fn`'s pieces when it is one of Keras' own piecewise-polynomial activations (the function itself,
    at its default arguments), else None."""
    name = activation_name(fn)
    return PIECEWISE_POLYNOMIAL.get(name) if fn is getattr(keras.activations, name, None) else None


@BUILTIN.rule(keras.layers.ReLU)
def relu_layer_rule(ctx):
    """Per element or per channel in closed form (`moments.piecewise_polynomial_expectations`: ReLU6 of
    MobileNetV2 on element maps), else by quadrature; the shared part through the activation."""
    layer = ctx.layer
    m = ctx.input
    kinks = [float(layer.threshold)]
    if layer.max_value is not None:
        kinks.append(float(layer.max_value))
    if m.ch_mean is None:
        return elementwise_moments(numpy_function(layer), m, kinks)
    pieces = relu_layer_pieces(layer)
    out = shared_part.through_activation(numpy_function(layer), tuple(kinks), m, piecewise_moments(pieces, m),
                                         pieces=pieces)
    return spatial_correlation.through_activation(numpy_function(layer), tuple(kinks), m, out, pieces=pieces)


@BUILTIN.rule(keras.layers.LeakyReLU)
@BUILTIN.rule(keras.layers.ELU)
def kink_at_zero_layer_rule(ctx):
    return elementwise_moments(numpy_function(ctx.layer), ctx.input, (0.0,))


@BUILTIN.rule(keras.layers.PReLU)
def prelu_rule(ctx):
    """f(x) = x for x > 0, alpha_c x otherwise: per channel when alpha is per channel, else mixed."""
    from autoinit_tf.moments import channel_expectations

    alpha = ctx.value(ctx.layer.alpha).astype(np.float64).ravel()
    m = ctx.input
    if m.ch_mean is not None and alpha.size == m.channels:
        pos1, pos2 = channel_expectations(lambda x: np.maximum(x, 0.0), m.ch_mean, m.ch_var, (0.0,))
        neg1, neg2 = channel_expectations(lambda x: np.minimum(x, 0.0), m.ch_mean, m.ch_var, (0.0,))
        return Moments.from_channel_second(pos1 + alpha * neg1, pos2 + alpha**2 * neg2)
    pos1, pos2 = gaussian_expectations(lambda x: np.maximum(x, 0.0), m.mean, m.var, (0.0,))
    neg1, neg2 = gaussian_expectations(lambda x: np.minimum(x, 0.0), m.mean, m.var, (0.0,))
    mean = pos1 + float(alpha.mean()) * neg1
    second = pos2 + float((alpha**2).mean()) * neg2
    return Moments.from_second(mean, second)


@BUILTIN.rule(keras.layers.Softmax)
def softmax_layer_rule(ctx):
    """An unknown softmax axis (attention over a sequence of unknown length) has the probe length."""
    size = axis_size(ctx.input_shapes[0], ctx.layer.axis)
    axis = ctx.layer.axis
    last = axis in (-1, len(ctx.input_shapes[0]) - 1)
    mask = ctx.kwargs.get("mask") if ctx.kwargs else None
    if mask is None and len(ctx.args) > 1:
        mask = ctx.args[1]
    classwise = mask is None and last and per_class(ctx.input, size)
    mark_wide_logits(ctx, ctx.input, classwise)
    if classwise:
        return softmax_per_class_moments(ctx.input)
    size = size or ctx.probe_length
    const = getattr(mask, "const", None) if isinstance(mask, Moments) else None
    if const is not None and last and np.shape(const)[-1] == size:
        rows = np.asarray(const).reshape(-1, size) != 0
        if not rows.all():
            ctx.inexact(MASKED_WEIGHTS)
        return masked_softmax_moments(ctx.input, rows)
    return softmax_moments(ctx.input, size)


def masked_softmax_moments(m: Moments, rows) -> Moments:
    """Softmax over the last axis where each row sees only its True entries (`rows`: a boolean array, rows x
    size; Keras gives a row with none uniform weights): n_i entries of `softmax_moments(m, n_i)` and
    size - n_i zeros per row. Mean 1 / size; second moment the rows' average of n_i E[a^2 | n_i] / size (a
    causal mask over 64 keys: 4.7x what every row seeing every key gives)."""
    size = rows.shape[1]
    _, means = uniform_row_weights(rows)
    second = row_sum_average(rows, lambda c: softmax_moments(m, c).second) / size
    # each entry's mean is fixed by its position (1 / n_i where seen, 0 where masked): that spread is
    # `between`, which a layer reading the weights directly sees as offsets
    return Moments.from_second(1.0 / size, second, float(np.mean(means * means)) - 1.0 / size ** 2)


def masked_softmax_tilted_square(m: Moments, rows) -> float:
    """E[sum_k a_k^2 (z_k - mean)^2] over a row's visible entries (`softmax_tilted_square`), averaged over the
    rows of the boolean mask `rows` as in `masked_softmax_moments`."""
    return row_sum_average(rows, lambda c: softmax_tilted_square(m, c))


def row_sum_average(rows, per_entry) -> float:
    """The rows' average of n_i per_entry(n_i), n_i a row's visible entries (`uniform_row_weights`): a sum over a
    row's entries of a quantity that depends only on how many it sees, each count evaluated once."""
    n, _ = uniform_row_weights(rows)
    counts, freq = np.unique(n, return_counts=True)
    return float(sum(f * c * per_entry(int(c)) for c, f in zip(counts, freq)) / n.size)


def uniform_row_weights(rows):
    """``(n, weights)`` for a boolean (rows x size) mask: each row's number of visible entries (a row with
    none counts all, as Keras' softmax then weighs every entry alike) and uniform weights 1 / n_i over them."""
    size = rows.shape[1]
    seen = rows.sum(axis=1)
    n = np.where(seen == 0, size, seen)
    return n, np.where(seen[:, None] == 0, 1.0 / size, rows / n[:, None])


#: Why a masked softmax's output is an estimate for a layer that reads it directly (attention reads it
#: through its moments only: `rules.attention`, `rules.ops.attended_values`).
MASKED_WEIGHTS = ("softmax of masked logits: each weight's mean is fixed by its position (1 / n_i where seen, 0 "
                  "where masked), which a layer reading the weights directly sees as a pattern, not as noise")
