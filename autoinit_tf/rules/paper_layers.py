"""Propagation rules for the paper layers (`autoinit_tf.layers`).

Conventions as elsewhere: inputs are summarised by (mean, var) of all elements, elements are
treated as independent Gaussians, and training-mode behaviour is propagated (batch statistics,
stochastic layers in expectation over their noise).

* ProxyNormalization: exact per channel by 1-D quadrature of phi(gamma_c x + beta_c), then the
  proxy statistics from the same n quantile samples the layer uses.
* LogitGate: AIL gates by exact 1-D integrals for any k (`logit_gates.ail_moments`); exact IL
  operators by k-D Gauss-Hermite quadrature (k <= 4) or a fixed-seed Monte Carlo (k > 4). Per group
  of k channels from their own (per-channel) means and variances when the input tracks them; the
  output keeps per-channel moments.
* LogAvgExpPooling: deterministic probe (fixed-seed Gaussian rows of the pooled size, i.i.d.
  positions as for the engine's global pooling), using LAE_t(m + s z) = m + s LAE_{t/s}(z).
* StochasticDepth: mixture over the Bernoulli draw(s) in training mode.
* IterNormWhitening: i.i.d. channels give Sigma = (v + eps) I, so the Newton iteration is scalar.
* DARBatchNormalization: like BatchNormalization (natural batch statistics).
* ScaledResidual: sum of independent terms; in ``autoinit`` mode the rule sets
  ``a_i = sqrt(signal_variance / (N var_i))``.
* WS layers: zero-sum kernels with sum w^2 = gain^2 per channel, so y has mean = bias and variance
  gain^2 v; the rule sets ``gain = sqrt(signal_variance / v)`` (the kernel scale is irrelevant).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from autoinit_tf.layers import (
    DARBatchNormalization,
    IterNormWhitening,
    LogAvgExpPooling1D,
    LogAvgExpPooling2D,
    LogAvgExpPooling3D,
    LogitGate,
    ProxyNormalization,
    ScaledResidual,
    StochasticDepth,
    WSConv1D,
    WSConv2D,
    WSConv3D,
    WSDense,
)
from autoinit_tf.layers.logit_gates import AIL_FUNCTIONS, ail_moments, gate_reduce, nail_constants
from autoinit_tf.moments import Moments, gaussian_expectations, standard_normal_quantiles
from autoinit_tf.rules.normalization import set_moving_statistics, set_revisited_affine
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

# Batch statistics (whitening, DAR-BN's natural-image statistics) mix the examples of a batch.
for _cls in (IterNormWhitening, DARBatchNormalization):
    BUILTIN.declare(_cls, mixes_examples=True, advice="GroupNormalization (or LayerNormalization)")
BUILTIN.declare(DARBatchNormalization, moving_statistics=lambda layer: (layer.moving_mean, layer.moving_variance, -1),
                normalizes=True)


def _per_channel(means, seconds):
    """Moments over all channels from per-channel (mean, second moment)."""
    means = np.asarray(means, np.float64)
    seconds = np.asarray(seconds, np.float64)
    return Moments.from_second(float(means.mean()), float(seconds.mean()), float(means.var()))


def _np_activation(act):
    def fn(x):
        y = act(keras.ops.convert_to_tensor(np.asarray(x, np.float32)))
        return np.asarray(keras.ops.convert_to_numpy(y), np.float64)

    return fn


# ---- ProxyNormalization ------------------------------------------------------------------------
@BUILTIN.rule(ProxyNormalization)
def proxy_normalization_rule(ctx):
    layer, m = ctx.layer, ctx.input
    gamma = ctx.value(layer.gamma).astype(np.float64)
    beta = ctx.value(layer.beta).astype(np.float64)
    act = _np_activation(layer.activation)
    q = standard_normal_quantiles(layer.n_samples).astype(np.float32).astype(np.float64)
    zt = act(q[:, None] * gamma[None, :] + beta[None, :])
    mu, var = zt.mean(0), zt.var(0)
    means, seconds = [], []
    for c in range(len(gamma)):
        g, b = gamma[c], beta[c]
        kinks = (-b / g,) if g != 0 else ()
        e1, e2 = gaussian_expectations(lambda x, g=g, b=b: act(g * x + b), m.mean, m.var, kinks)
        d = var[c] + layer.epsilon
        means.append((e1 - mu[c]) / math.sqrt(d))
        seconds.append((e2 - 2 * e1 * mu[c] + mu[c] ** 2) / d)
    return _per_channel(means, seconds)


# ---- LogitGate ---------------------------------------------------------------------------------
def _il_moments(name, k, mean, var):
    mu = np.broadcast_to(np.asarray(mean, np.float64), (k,))
    sd = np.sqrt(np.maximum(np.broadcast_to(np.asarray(var, np.float64), (k,)), 0.0))
    if k <= 4:
        nodes, weights = np.polynomial.hermite_e.hermegauss({1: 96, 2: 64, 3: 24, 4: 14}[k])
        weights = weights / math.sqrt(2 * math.pi)
        grids = np.meshgrid(*([nodes] * k), indexing="ij")
        pts = np.stack([g.reshape(-1) for g in grids], -1)
        w = np.ones(len(pts))
        for wg in np.meshgrid(*([weights] * k), indexing="ij"):
            w = w * wg.reshape(-1)
    else:
        pts = np.random.default_rng(0).standard_normal((200_000, k))
        w = np.full(len(pts), 1.0 / len(pts))
    x = keras.ops.convert_to_tensor((mu + sd * pts).astype(np.float32))
    y = np.asarray(keras.ops.convert_to_numpy(gate_reduce(name, x, k)), np.float64)
    return float(np.dot(w, y)), float(np.dot(w, y * y))


def gate_moments(name, k, m, normalize=False):
    """(E, E^2) of one gate for k independent Gaussian inputs.

    ``m`` is a `Moments` (k i.i.d. N(m.mean, m.var) inputs) or a pair ``(means, vars)`` of scalars
    or length-k arrays (one per input of the group).
    """
    mean, var = (m.mean, m.var) if isinstance(m, Moments) else m
    if name in AIL_FUNCTIONS:
        e1, e2 = ail_moments(name, k, mean, var)
    else:
        e1, e2 = _il_moments(name, k, mean, var)
    if normalize:
        mu, sd = nail_constants(name, k)
        e1, e2 = (e1 - mu) / sd, (e2 - 2 * mu * e1 + mu * mu) / sd**2
    return e1, e2


@BUILTIN.rule(LogitGate)
def logit_gate_rule(ctx):
    """Per output channel: each group of k consecutive input channels is propagated with its own
    channels' means and variances when the input carries them (exact for independent Gaussian
    channels), else with the pooled moments; the output keeps its per-channel moments (the AND,
    OR and XNOR blocks of an ensemble have different means)."""
    layer, m = ctx.layer, ctx.input
    k, fns = layer.k, layer.functions
    c = int(ctx.input_shapes[0][-1])
    if m.ch_mean is None or m.channels != c:
        parts = [gate_moments(f, k, m, layer.normalize) for f in fns]
        groups = c // k
        if layer.combine == "dup" or len(fns) == 1:
            reps = [groups] * len(fns)
        else:
            reps = [groups // len(fns)] * len(fns)
        e1 = np.concatenate([np.full(r, p[0]) for r, p in zip(reps, parts)])
        e2 = np.concatenate([np.full(r, p[1]) for r, p in zip(reps, parts)])
        return Moments.from_channel_second(e1, e2)
    gm = m.ch_mean.reshape(-1, k)
    gv = m.ch_var.reshape(-1, k)
    cache = {}

    def one(f, g):
        key = (f, tuple(np.round(gm[g], 12)), tuple(np.round(gv[g], 12)))
        if key not in cache:
            cache[key] = gate_moments(f, k, (gm[g], gv[g]), layer.normalize)
        return cache[key]

    n = len(fns)
    if layer.combine == "dup" or n == 1:
        plan = [(f, g) for f in fns for g in range(len(gm))]
    else:
        per = len(gm) // n
        plan = [(f, g) for i, f in enumerate(fns) for g in range(i * per, (i + 1) * per)]
    res = np.array([one(f, g) for f, g in plan], dtype=np.float64)
    return Moments.from_channel_second(res[:, 0], res[:, 1])


# ---- LogAvgExpPooling --------------------------------------------------------------------------
def log_avg_exp_rule(ctx):
    from scipy.special import logsumexp

    layer, m = ctx.layer, ctx.input
    shape = ctx.input_shapes[0]
    n = 1
    for a in layer._axes:
        n *= int(shape[a])
    t = float(np.exp(ctx.value(layer.log_temperature))) if layer.learnable else layer.temperature
    s = math.sqrt(m.var)
    if s == 0.0:
        return Moments(m.mean, 0.0, m.between)
    rows = max(64, min(4096, 2_000_000 // n))
    z = np.random.default_rng(0).standard_normal((rows, n))
    ts = t / s
    y = ts * (logsumexp(z / ts, axis=1) - math.log(n))
    return Moments(m.mean + s * float(y.mean()), s * s * float(y.var()), m.between)


for _cls in (LogAvgExpPooling1D, LogAvgExpPooling2D, LogAvgExpPooling3D):
    BUILTIN.rule(_cls, log_avg_exp_rule)


# ---- StochasticDepth ---------------------------------------------------------------------------
@BUILTIN.rule(StochasticDepth)
def stochastic_depth_rule(ctx):
    sc, r = ctx.inputs[0], ctx.inputs[1]
    p = ctx.layer.survival_probability
    if ctx.layer.mode == "paper":  # b ~ Bernoulli(p): s + b r
        mean = sc.mean + p * r.mean
        second = sc.second + p * (2 * sc.mean * r.mean + r.second)
        between = sc.between + p * r.between
    else:  # s + (b / p) r, b per example
        mean = sc.mean + r.mean
        second = sc.second + 2 * sc.mean * r.mean + (r.second / p if p > 0 else 0.0)
        between = sc.between + r.between
        if p == 0:
            mean = sc.mean
    return Moments.from_second(mean, second, between)


# ---- IterNormWhitening -------------------------------------------------------------------------
@BUILTIN.rule(IterNormWhitening)
def iternorm_rule(ctx):
    layer, m = ctx.layer, ctx.input
    g = layer.g
    v, eps = m.within if hasattr(m, "within") else m.var, layer.epsilon
    lam = 1.0 / g  # the eigenvalue of the trace-normalized (v + eps) I
    p = 1.0
    for _ in range(layer.iterations):
        p = 1.5 * p - 0.5 * p**3 * lam
    ratio = p * p * v / (g * (v + eps))
    gamma = ctx.value(layer.gamma).astype(np.float64) if layer.scale else np.ones(layer.channels)
    beta = ctx.value(layer.beta).astype(np.float64) if layer.center else np.zeros(layer.channels)
    return _per_channel(beta, gamma**2 * ratio + beta**2)


# ---- DARBatchNormalization ---------------------------------------------------------------------
@BUILTIN.rule(DARBatchNormalization)
def dar_batch_normalization_rule(ctx):
    layer, m = ctx.layer, ctx.inputs[0]
    set_revisited_affine(ctx, layer)
    set_moving_statistics(ctx, layer, m, per_channel=m.ch_mean is not None)  # a probe is all natural images
    v = m.var
    ratio = v / (v + layer.epsilon) if v > 0 else 0.0
    c = int(ctx.input_shapes[0][-1])
    gamma = ctx.value(layer.gamma).astype(np.float64) if layer.scale else np.ones(c)
    beta = ctx.value(layer.beta).astype(np.float64) if layer.center else np.zeros(c)
    return _per_channel(beta, gamma**2 * ratio + beta**2)


# ---- ScaledResidual ----------------------------------------------------------------------------
@BUILTIN.rule(ScaledResidual)
def scaled_residual_rule(ctx):
    layer, ins = ctx.layer, ctx.inputs
    n = len(ins)
    if layer.mode == "autoinit":
        coeffs = []
        for var, mo in zip(layer.coefficients, ctx.fit_inputs):
            a = math.sqrt(ctx.signal_variance / (n * mo.var)) if mo.var > 0 else 1.0
            ctx.assign(var, np.asarray(a, dtype=np.float32))
            coeffs.append(float(ctx.value(var)))
    elif layer.mode == "idshort":
        coeffs = [1.0 / math.sqrt(n)] * n
    else:
        coeffs = [1.0 if v is None else float(ctx.value(v)) for v in layer.scale_variables()]
    mean = sum(a * mo.mean for a, mo in zip(coeffs, ins))
    var = sum(a * a * mo.var for a, mo in zip(coeffs, ins))
    between = sum(a * a * mo.between for a, mo in zip(coeffs, ins))
    return Moments(mean, var, min(between, var))


# ---- Weight-standardized layers ----------------------------------------------------------------
def _ws_rule(ctx):
    layer, m = ctx.layer, ctx.input
    v = m.var
    n = int(layer.gain.shape[0])
    if v > 0 and ctx.may_reinit(layer.gain):
        ctx.assign(layer.gain, np.full((n,), math.sqrt(ctx.signal_variance / v), np.float32))
        ctx.weight_scale = ctx.signal_variance / v
    gain = ctx.value(layer.gain).astype(np.float64)
    bias = ctx.value(layer.bias).astype(np.float64) if layer.bias is not None else np.zeros(n)
    pre = _per_channel(bias, gain**2 * v + bias**2)
    if layer.activation is None or layer.activation is keras.activations.linear:
        return pre
    from autoinit_tf.moments import elementwise_moments

    return elementwise_moments(_np_activation(layer.activation), pre, (0.0,))


for _cls in (WSConv1D, WSConv2D, WSConv3D, WSDense):
    BUILTIN.rule(_cls, _ws_rule)
