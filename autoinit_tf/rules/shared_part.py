"""The per-example shared part of a feature map (`Moments.shared`).

For each channel c, S_c is the variance over examples of an example's own mean of channel c: the part of the
channel's variance that all positions of one example share. A squeeze-and-excitation gate makes it: it
multiplies every position of one example's channel by the same g_c, so where the map has a mean (after
swish or ReLU), the example's channel mean moves with g_c. Positions are then correlated, and a global
average pool keeps S whole instead of dividing it by the number of positions: EfficientNetB0 at 96x96
(block6a, 36 positions), 22% of the activation's variance is shared, and the pooled variance that the SE
reduce conv reads was 2.1x the independent-positions prediction.

With m_c the channel mean, V_c its variance (over examples and positions) and W[t, c, o] a kernel with taps t:

    gate  y = g x, g of shape (batch, 1, .., 1, C), independent of x:
                    S_y = E[g^2] (m^2 + S_x) - E[g]^2 m^2
    linear (Conv, Dense on positions), with a_p[c, o] the sum of W[t, c, o] over the taps t that read
    real positions (not padding) at output position p:
                    S_out[o] = sum_c mean_p(a_p[c, o])^2 S_c, and each position's variance gains
                    sum_c (a_p[c, o]^2 - sum_t W[t, c, o]^2) S_c (the taps of one channel share S_c)
    depthwise:      the same with one input channel per output channel
    BatchNorm:      S gamma^2 / (V + eps)
    activation f:   S_out = Var_u(E_v f(m + u + v)), u ~ N(0, S), v ~ N(0, V - S) (8-point Gauss-Hermite in u)
    add:            sum of S (inputs independent)
    dropout:        element masks average out over positions: S; one mask per example (noise_shape
                    (None, 1, .., 1) or SpatialDropout): (m^2 + S) / k - m^2 with keep probability k
    global average over n positions:
                    variance of the pooled value V / n + S (1 - 1 / n)

The per-example scale (`Moments.scale`). A gate also makes the signal a scale mixture: each example's
map has its own energy, e^xi times the average, with xi common to its channels. On MobileNetV3Small
(`benchmarks/zoo_real.py`'s fresh images after the analytic wrap) Var(xi) = lam grows from 0.006 at the
fourth gate to 0.78 at the last and 1.27 at the logits. Through a non-homogeneous activation it moves each
example's channel means (hard swish: E[f(s z)] ~ s^2 / 6), which is what the squeeze reads: there the
per-example part of the squeeze's variance was 0.045, of which the shared part without the scale
predicted 0.0005. With lam carried and xi taken Gaussian (5 Gauss-Hermite nodes xi_q, S_q = e^(xi_q)
normalized to E[S] = 1):

    linear (mixing channels), dropout, padding: lam unchanged (every example's energy scaled alike)
    depthwise, BatchNorm: each channel keeps its energy profile over the nodes (`Given.within`, set by the
                    activation before: its channels follow the scale differently, by their offsets),
                    rescaled to the channel's new variance: lam = Var_q(log sum_c W'_qc), plus the
                    activation's offsets part
    activation f:   an example at node q has channel c ~ N(m_c + u, W_c S_q), u ~ N(0, S_c): the shared part
                    is the variance over (q, u) of E_v f, and lam_out = Var_q(log sum_c Var_v f) (the
                    activation's elasticity: 1.3-1.6x per hard swish on MobileNetV3Small); on element maps
                    with correlated positions, plus its own sampling: the spread of an example's energy of
                    f(y) over its entries less the Gaussian y's the linear layer added
                    (`rules.spatial_correlation.activation_sampling_variance`: 2.2x a Gaussian's for a ReLU)
    add:            the log-scales are one latent xi: lam = Var_xi(log sum_i E_i e^(sqrt(lam_i) xi)) (E_i the
                    inputs' within-energies; measured 0.196, first order 0.198); an input behind a
                    per-example mask (drop-connect, keep k) contributes 0 or E_i / k
    dropout:        one mask per example is carried to the sum after it (`Moments.keep`)
    between activations: each example's channel means given xi (`Given.mean`; an activation makes their
                    shift with xi) move through convs (the kernel summed over the real taps, averaged over
                    positions), depthwise, BatchNorm (gamma / sqrt(var + eps)) and sums; the activation
                    after them takes the shift as part of its offsets
    global pool:    an example's channel means given xi (`Given`) go on to the gate's convolutions and
                    activations node by node (channels independent given xi)
    gate y = g x:   per node, E[g^2 | q] multiplies x's within-energy: lam_y = Var_q(log energy_q) plus the
                    gate's own independent part sum_c W_c^2 Var(g_c^2 | q) / energy_q^2; the shared part
                    E_q[E[g^2 | q] (M^2 + spread)] - (E_q[E[g | q] M])^2 with M the channel mean given q.

Measured on MobileNetV3Small (`benchmarks/zoo_real.py`'s recorder, 512 fresh images): SE convs up to +0.65 ->
below +0.45 (log of measured / target), the logits +1.01 -> +0.47, median 0.052 -> 0.043. The predicted lam is
still about half of the measured (0.38 for 0.76 at the last gate's activation): the growth opens in the
first gated blocks, where the activations' measured elasticity (1.18-1.23 by regression on 1536 examples)
exceeds a Gaussian's (1.16) and the examples' channel offsets follow their scale (a quarter to all of the
shared part, by regression on the log-energy) more than carried. On EfficientNetV2B0 it went the other way:
close at block 4a, 1.3-1.5x over from block 6 on (`benchmarks/per_example_scale.py`, energy about each
example's own channel means), because the BatchNorm after each depthwise conv lowers the measured scale
(0.86 -> 0.70 in block 6b) by giving every channel the same weight, where the activation before weighted the
channels that follow the scale most. With each channel's profile carried through depthwise convs and
BatchNorm, block 6b's BatchNorm is predicted at 0.84 (measured 0.70; 1.13 before) and its projection at 1.14
(1.01; 1.50 before); EfficientNetB0's block 6b projection 1.23 (1.26; 1.50 for 1.21 before). The default
`wrap` still calibrates the layers after a gate.
"""

from __future__ import annotations

import itertools

import numpy as np

from autoinit_tf.moments import Moments, many_expectations, piecewise_polynomial_expectations

_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(8)
_GH_W = _GH_W / _GH_W.sum()
#: The latent's nodes, and the offsets' where the latent is tracked too: 5 Gauss-Hermite points (exact for
#: polynomials of degree 9; E[e^(a z)] to 3e-7 for a = 1), so an activation of C channels integrates 25 C
#: Gaussians instead of 64 C (EfficientNetB0's analytic wrap: 1.2 s of quadrature at 8 x 8).
_LATENT_Z, _LATENT_W = np.polynomial.hermite_e.hermegauss(5)
_LATENT_W = _LATENT_W / _LATENT_W.sum()


class Given:
    """Channel statistics of an example given its latent log-scale xi, at the latent's nodes q (standard normal
    Gauss-Hermite nodes z_q, xi = sqrt(lam) z_q; weights `w`, scale factors `s` with E[S] = 1). Arrays (Q, C):
    `mean` E[x | q]; `spread` the variance over examples of an example's own channel mean given q (offsets the
    latent does not explain); `within` the variance over an example's positions given q. `per_example`: a
    tensor of one value per example and channel (a pooled squeeze, its gate), else a feature map. On a map
    between activations only `mean` is carried (the shift of each example's channel means with xi: an
    activation's mean moves with the scale, and every later layer moves it on); the activation after it
    takes spread and within from the map's shared part and variance."""

    __slots__ = ("lam", "w", "s", "mean", "spread", "within", "per_example")

    def __init__(self, lam, w, s, mean, spread, within, per_example=None):
        self.lam, self.w, self.s = float(lam), w, s
        self.mean, self.spread, self.within = mean, np.maximum(spread, 0.0), np.maximum(within, 0.0)
        self.per_example = (not np.any(self.within)) if per_example is None else bool(per_example)

    @property
    def deviation(self):
        """(Q, C): each node's channel means less their average over the nodes."""
        return self.mean - self.w @ self.mean

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def affine(self, a, b=0.0) -> "Given":
        a2 = np.square(np.asarray(a, dtype=np.float64))
        return Given(self.lam, self.w, self.s, a * self.mean + b, a2 * self.spread, a2 * self.within,
                     self.per_example)

    def channel_moments(self):
        """(mean, variance) per channel over examples (and positions): the mixture over the nodes."""
        mu = self.w @ self.mean
        second = self.w @ (self.spread + self.within + self.mean * self.mean)
        return mu, np.maximum(second - mu * mu, 0.0)


def scale_of(m: Moments) -> float:
    """Var(xi) of `m`'s per-example log-scale (0 when not tracked)."""
    s = getattr(m, "scale", None)
    return 0.0 if s is None else float(s)


def given_of(m: Moments, per_example: bool | None = None):
    """`m`'s `Given` when it is of `m`'s channels (and, with `per_example`, of one value per example and
    channel (True) or of a feature map (False)), else None."""
    g = getattr(m, "given", None)
    if g is None or m.ch_mean is None or g.channels != m.channels:
        return None
    if per_example is not None and per_example != g.per_example:
        return None
    return g


def carry_given(out: Moments, m_in: Moments, deviation=None, channel_of=None, reweigh=True) -> Moments:
    """`out`, a map of the feature map `m_in`, with the shift of its examples' channel means with the latent:
    `deviation` maps m_in's (Q, C_in) deviations to out's (a linear layer's summed taps, BatchNorm's gain;
    None: unchanged), re-centred on out's channel means.

    `channel_of` (a map that keeps channels apart: depthwise, BatchNorm): the input channel each output channel
    reads (an index array). Then the within-energy profile over the nodes (`Given.within`, set by an
    activation: each channel's positions' variance given the node) goes on per channel, each channel's
    profile rescaled to its new within variance (`out`'s variance less its shared part), and the log-scale
    is recomputed from the reweighted sum (`_reweighted_profile`); ``reweigh=False`` (padding, cropping: every
    example's energy scaled alike) keeps the profiles as they are. Elsewhere the profile is dropped."""
    g = given_of(m_in, per_example=False)
    if g is None or out.ch_mean is None:
        return out
    dev = g.deviation if deviation is None else deviation(g.deviation)
    if dev is None or dev.shape != (g.w.size, out.channels):
        return out
    zeros = np.zeros_like(dev)
    within = zeros
    if channel_of is not None and np.any(g.within) and len(channel_of) == out.channels:
        channel_of = np.asarray(channel_of)
        within = _reweighted_profile(out, g, channel_of) if reweigh else g.within[:, channel_of]
    out.given = Given(g.lam, g.w, g.s, out.ch_mean[None, :] + dev, zeros, within, per_example=False)
    return out


def _reweighted_profile(out: Moments, g: Given, channel_of):
    """The within-energy profile (Q, C_out) of `out`, whose channel o is input channel ``channel_of[o]`` of the
    map `g` describes, scaled: each channel keeps its profile over the nodes, with its node-average set to its
    new within variance V_o. Sets ``out.scale`` to lam - Var_q(log sum_c W_qc) + Var_q(log sum_o W'_qo):
    a map that changes the channels' weights changes the log-scale where the channels' energies follow the
    latent differently (an activation's channels, by their offsets), which one scale common to all channels
    misses (EfficientNetV2B0's block 6: the BatchNorm after a depthwise conv lowered the measured scale by
    a fifth)."""
    profile = g.within[:, channel_of]
    avg = g.w @ profile
    shared = shared_of(out)
    target = np.maximum(out.ch_var - (0.0 if shared is None else np.minimum(shared, out.ch_var)), 0.0)
    new = profile * np.where(avg > 0, target / np.where(avg > 0, avg, 1.0), 0.0)[None, :]
    lam = scale_of(out)
    if lam > 0.0:
        before = _log_variance(g.within.sum(axis=1), g.w)
        out.scale = max(lam - before + _log_variance(new.sum(axis=1), g.w), 0.0)
    return new


def tracked(m: Moments) -> bool:
    """Whether `m` carries any per-example structure (shared part, scale or `Given`)."""
    return shared_of(m) is not None or scale_of(m) > 0.0 or given_of(m) is not None


def carry_per_example(out: Moments, m_in: Moments) -> Moments:
    """`out`, which keeps each example's positions and channels as `m_in` has them (padding, cropping, a
    correlation-only change), with m_in's shared part, log-scale and `Given`."""
    out.shared = m_in.shared
    carry_scale(out, m_in)
    g = given_of(m_in, per_example=True)
    if g is not None:
        out.given = g
        return out
    # the same channels, each example's energy scaled alike (padding, cropping): the channels' energy
    # profiles as they were, for a BatchNorm after a padded depthwise conv to reweight
    return carry_given(out, m_in, channel_of=None if out.ch_mean is None else np.arange(out.channels),
                       reweigh=False)


def carry_scale(out: Moments, m_in: Moments) -> Moments:
    """`out` (a homogeneous map of `m_in`: linear, BatchNorm, dropout, padding) with `m_in`'s log-scale."""
    lam = scale_of(m_in)
    if lam > 0.0:
        out.scale = lam
    return out


def with_sampling(out: Moments, variance) -> Moments:
    """`out`, a linear map's output, with the sampling `variance` of an example's log-energy added to its
    log-scale (`rules.spatial_correlation.energy_sampling_variance`): given the input, each example's
    output energy x^T W W^T x / x^T x varies with the example's own configuration of its entries, which
    later layers carry like any other scale."""
    if variance and scale_of(out) > 0.0:
        out.scale = scale_of(out) + float(variance)
    return out


def scale_nodes(lam: float):
    """(weights, S_q) of the latent's nodes: S = e^xi normalized to E[S] = 1; one node S = 1 for lam = 0."""
    if lam <= 0.0:
        return np.ones(1), np.ones(1)
    s = np.exp(np.sqrt(lam) * _LATENT_Z)
    return _LATENT_W, s / float(s @ _LATENT_W)


def _log_variance(energy, w) -> float:
    """Var_q(log energy_q) under node weights `w`."""
    e = np.log(np.maximum(np.asarray(energy, dtype=np.float64), 1e-300))
    mu = float(w @ e)
    return max(float(w @ (e * e)) - mu * mu, 0.0)


def _expect(fn, kinks, pieces, mean, var):
    """(E f(X), E f(X)^2) for X ~ N(mean, var), elementwise over flat arrays."""
    if pieces is not None:
        return piecewise_polynomial_expectations(pieces, mean, np.sqrt(np.maximum(var, 0.0)))
    return many_expectations(fn, mean, var, kinks)


def shared_of(m: Moments):
    """Per-channel shared variance of `m` (an array), or None when not tracked or of other channels."""
    s = getattr(m, "shared", None)
    if s is None or m.ch_mean is None or np.size(s) != m.channels:
        return None
    return np.asarray(s, dtype=np.float64)


def _with_extra_variance(m: Moments, extra) -> Moments:
    """`m` with `extra` (per channel) added to the variance of every element."""
    if m.el_mean is not None:
        return Moments.from_elements(m.el_mean, m.el_var + extra)
    return Moments.from_channels(m.ch_mean, m.ch_var + extra)


def gate(x: Moments, g: Moments, out: Moments) -> Moments:
    """Set the shared part (and log-scale) of y = g x (g constant over positions, per example and channel).
    With x's and g's `Given` on one latent, node by node (module docstring); else g independent of x."""
    if out.ch_mean is None:
        return out
    gx, gg = given_of(x, per_example=False), given_of(g, per_example=True)
    if gx is not None and gg is not None and gx.channels == gg.channels == out.channels \
            and gx.mean.shape == gg.mean.shape and abs(gx.lam - gg.lam) <= 1e-12 * max(gx.lam, 1.0):
        return _coupled_gate(gx, gg, out)
    c = out.channels
    gm, g2 = _per_channel(g, c)
    xm, _ = _per_channel(x, c)
    if gm is None or xm is None:
        carry_scale(out, x)
        return out
    sx = shared_of(x)
    m2 = xm ** 2
    out.shared = np.maximum(g2 * (m2 + (0.0 if sx is None else sx)) - gm ** 2 * m2, 0.0)
    # the gate's own part of the log-scale: channels gated independently, sum_c Var(g_c^2) W_c^2 / energy^2
    within = np.maximum(x.ch_var - (0.0 if sx is None else np.minimum(sx, x.ch_var)), 0.0)
    gv = np.maximum(g2 - gm * gm, 0.0)
    energy = float(np.sum(g2 * within))
    own = float(np.sum((4.0 * gm * gm * gv + 2.0 * gv * gv) * within ** 2)) / energy ** 2 if energy > 0 else 0.0
    if scale_of(x) + own > 0.0:
        out.scale = scale_of(x) + own
    return out


def _coupled_gate(gx: Given, gg: Given, out: Moments) -> Moments:
    """y = g x with the gate and the map on one latent: given node q, g independent of x.

    y's channel mean given q is E[g|q] M, its per-example spread E[g^2|q] (M^2 + spread) - (E[g|q] M)^2, its
    variance over positions E[g^2|q] W; lam_y = Var_q(log sum_c E[g_c^2|q] W_qc) plus the gate's independent
    part E_q[sum_c Var(g_c^2|q) W_qc^2] / energy^2, Var(g^2) = 4 E[g]^2 var + 2 var^2 (Gaussian given q)."""
    g1, gv = gg.mean, gg.spread
    g2 = gv + g1 * g1
    mean = g1 * gx.mean
    spread = g2 * (gx.mean ** 2 + gx.spread) - mean * mean
    within = g2 * gx.within
    energy = within.sum(axis=1)
    lam = _log_variance(energy, gx.w)
    var_g2 = 4.0 * g1 * g1 * gv + 2.0 * gv * gv
    safe = np.where(energy > 0, energy, 1.0)
    lam += float(gx.w @ (np.sum(var_g2 * gx.within ** 2, axis=1) / safe ** 2))
    w = gx.w
    given = Given(lam, w, gx.s, mean, spread, within, per_example=False)
    ch_mean, ch_var = given.channel_moments()
    shared = np.maximum(w @ (given.spread + mean * mean) - ch_mean * ch_mean, 0.0)
    if out.el_mean is None:
        res = Moments.from_channels(ch_mean, ch_var)
        res.corr = out.corr
    else:
        res = out  # element maps: their per-position numbers stay; the per-example structure is set below
    res.shared = shared
    res.scale = lam
    given.mean = mean - ch_mean + res.ch_mean
    res.given = given
    return res


def _per_channel(m: Moments, c: int):
    """(mean, second moment) per channel of `m` for `c` channels; pooled moments without a between-channel
    part stand for every channel alike; else (None, None)."""
    if m.ch_mean is not None:
        return (m.ch_mean, m.ch_second) if m.channels == c else (None, None)
    if m.between == 0.0:
        return np.full(c, m.mean), np.full(c, m.second)
    return None, None


def _tap_classes(taps, n):
    """[(weight, valid taps)] for a layer's `taps` (the rules' per-position classes of real taps, a vector,
    or None: all `n` taps everywhere)."""
    if taps is None:
        return [(1.0, np.ones(n))]
    if isinstance(taps, list) and taps and isinstance(taps[0], tuple):
        return [(float(w), np.asarray(v, dtype=np.float64).reshape(-1)) for w, v in taps]
    return [(1.0, np.asarray(taps, dtype=np.float64).reshape(-1))]


def _mean_gain(w3, taps):
    """mean_p(a_p): what a shift of an input channel's mean moves an output channel's mean by, averaged over
    the output positions (a_p: the kernel summed over the taps that read real positions at p)."""
    w = np.asarray(w3, dtype=np.float64)
    if w.shape[0] == 1:
        return w[0]
    return sum(weight * np.tensordot(valid, w, axes=1) for weight, valid in _tap_classes(taps, w.shape[0]))


def _through_taps(pre: Moments, s, w, taps, expand):
    """Shared part and correlated-taps variance after a kernel `w` (taps, cin, k): with a_p the sum of the
    real taps at position p, an example's shared offset u of channel c reaches position p as a_p u. The
    example's mean over positions moves by mean_p(a_p) u, so S_out = sum_c S_c mean_p(a_p)^2; each
    position's variance gains S_c (a_p^2 - sum_t W_t^2) (averaged over positions). `expand` maps
    per-(cin, k) values to output channels."""
    if w.shape[0] == 1:  # one tap (1x1 conv, Dense): no correlated taps, the same sum everywhere
        out = pre
        out.shared = np.maximum(expand(s, w[0] * w[0]), 0.0)
        return out
    a_mean = 0.0
    extra = 0.0
    for weight, valid in _tap_classes(taps, w.shape[0]):
        a = np.tensordot(valid, w, axes=1)  # (cin, k)
        a_mean = a_mean + weight * a
        extra = extra + weight * expand(s, a * a - np.tensordot(valid, w * w, axes=1))
    out_shared = expand(s, a_mean * a_mean)
    out = _with_extra_variance(pre, extra) if np.any(extra) else pre
    shared = np.maximum(out_shared, 0.0)
    if out is not pre:
        carry_per_example(out, pre)
    out.shared = shared
    return out


def through_linear(pre: Moments, m_in: Moments, w3, taps=None) -> Moments:
    """`pre` (a linear layer's output from `m_in`, kernel `w3` of shape (taps, cin, cout), `taps` its
    per-position real taps) with the shared part carried and its correlated-taps variance added."""
    carry_scale(pre, m_in)
    # a per-example mean shift's gain (cin, cout), averaged over positions; computed only when one is carried
    carry_given(pre, m_in, lambda d: d @ _mean_gain(w3, taps) if d.shape[1] == w3.shape[1] else None)
    s = shared_of(m_in)
    if s is None or pre.ch_mean is None or w3.shape[1] != s.size or w3.shape[2] != pre.channels:
        return pre
    return _through_taps(pre, s, np.asarray(w3, dtype=np.float64), taps, lambda s_, v: s_ @ v)


def through_depthwise(pre: Moments, m_in: Moments, w3, taps=None) -> Moments:
    """Like `through_linear` for a depthwise kernel `w3` of shape (taps, C, depth_multiplier) (output
    channel c * dm + d reads input channel c)."""
    carry_scale(pre, m_in)
    s = shared_of(m_in)
    if not (s is None or pre.ch_mean is None or w3.shape[1] != s.size or w3.shape[1] * w3.shape[2] != pre.channels):
        pre = _through_taps(pre, s, np.asarray(w3, dtype=np.float64), taps,
                            lambda s_, v: (s_[:, None] * v).reshape(-1))
    # after the shared part: the within-energy profile is rescaled to the output's variance less it
    carry_given(pre, m_in, lambda d: (d[:, :, None] * _mean_gain(w3, taps)[None]).reshape(d.shape[0], -1)
                if d.shape[1] == w3.shape[1] else None,  # the gain (C, depth_multiplier) only when carried
                channel_of=np.repeat(np.arange(w3.shape[1]), w3.shape[2]))
    return pre


def through_batch_norm(out: Moments, m_in: Moments, gamma, epsilon) -> Moments:
    """Training-mode BatchNormalization on the last axis: S gamma^2 / (V + eps); the log-scale reweighted by
    channel where the channels' energy profiles are carried (`carry_given`), else unchanged."""
    carry_scale(out, m_in)
    s = shared_of(m_in)
    if not (s is None or out.ch_mean is None or out.channels != s.size):
        g2 = 1.0 if gamma is None else np.square(np.asarray(gamma, dtype=np.float64).reshape(-1))
        den = m_in.ch_var + float(epsilon)
        out.shared = np.where(den > 0, s * g2 / np.where(den > 0, den, 1.0), 0.0)  # a constant channel: none
    carry_given(out, m_in, lambda d: d * ((1.0 if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1))
                                          / np.sqrt(m_in.ch_var + float(epsilon)))[None, :],
                channel_of=np.arange(out.channels) if out.ch_mean is not None else None)
    return out


def through_activation(fn, kinks, m_in: Moments, out: Moments, pieces=None) -> Moments:
    """The shared part, log-scale and `Given` of f(x) (module docstring): per channel, over the latent's nodes q
    and 8 Gauss-Hermite nodes of the offset u, E_v f and Var_v f of N(m + u, W S_q); `fn` maps numpy to
    numpy, `pieces` (when fn is piecewise polynomial, `rules.activation.PIECEWISE_POLYNOMIAL`) gives them in
    closed form. A tensor of one value per example and channel with a `Given` goes node by node."""
    if out.ch_mean is None or m_in.ch_mean is None or out.channels != m_in.channels:
        return out
    g_in = given_of(m_in, per_example=True)
    if g_in is not None:
        return _given_activation(fn, kinks, pieces, g_in)
    s = shared_of(m_in)
    lam = scale_of(m_in)
    if s is None and lam <= 0.0:
        return out
    c = m_in.channels
    s = np.zeros(c) if s is None else np.minimum(s, m_in.ch_var)
    within = np.maximum(m_in.ch_var - s, 0.0)
    w_q, s_q = scale_nodes(lam)
    # each example's channel means given the node (carried from the activation before: `carry_given`); the
    # rest of the shared part is offsets independent of the latent
    g_map = given_of(m_in, per_example=False)
    dev = g_map.deviation if g_map is not None and g_map.w.size == w_q.size else np.zeros((w_q.size, c))
    unexplained = np.maximum(s - w_q @ (dev * dev), 0.0)
    u_z, u_w = (_LATENT_Z, _LATENT_W) if lam > 0.0 else (_GH_Z, _GH_W)
    shape = (c, s_q.size, u_z.size)
    mean = (m_in.ch_mean[:, None, None] + dev.T[:, :, None]
            + np.sqrt(unexplained)[:, None, None] * u_z[None, None, :])
    mean = np.broadcast_to(mean, shape)
    var = np.broadcast_to(within[:, None, None] * s_q[None, :, None], shape)
    # node by node: each call's spreads differ only across channels, which keeps a smooth activation on
    # `moments.many_expectations`' interpolated grid (all nodes at once span e^(+-4 sqrt(lam)) and fell back
    # to one quadrature per pair)
    h1, h2 = np.empty(shape), np.empty(shape)
    for q in range(s_q.size):
        e1, e2 = _expect(fn, kinks, pieces, mean[:, q, :].reshape(-1), var[:, q, :].reshape(-1))
        h1[:, q, :] = np.asarray(e1, dtype=np.float64).reshape(c, -1)
        h2[:, q, :] = np.asarray(e2, dtype=np.float64).reshape(c, -1)
    given_mean = h1 @ u_w  # (c, Q): an example's channel mean given the node, averaged over u
    avg = given_mean @ w_q
    out.shared = np.maximum(np.einsum("cqj,q,j->c", h1 * h1, w_q, u_w) - avg * avg, 0.0)
    positions = np.maximum((h2 - h1 * h1) @ u_w, 0.0)  # (c, Q): over an example's positions
    spread = np.maximum((h1 * h1) @ u_w - given_mean ** 2, 0.0)
    if lam > 0.0:
        # Jensen over S (and the offsets' dependence on it), against the Gaussian `out` came from: the same
        # quadrature with every example at S = 1 and all of the shared part independent offsets
        base = m_in.ch_mean[:, None] + np.sqrt(s)[:, None] * u_z[None, :]
        b1, b2 = _expect(fn, kinks, pieces, base.reshape(-1), within.repeat(u_z.size))
        b1 = np.asarray(b1, dtype=np.float64).reshape(c, -1) @ u_w
        b2 = np.asarray(b2, dtype=np.float64).reshape(c, -1) @ u_w
        out = _mixture_moments(out, avg - b1, np.einsum("cqj,q,j->c", h2, w_q, u_w) - avg * avg, b2 - b1 * b1)
        # Var_q of the log-energy, plus the offsets' part: each channel's offset u moves its positions'
        # variance too, independently across channels (first order: sum_c Var_u(V_c) / energy^2)
        pos_uj = np.maximum(h2 - h1 * h1, 0.0)  # (c, Q, J)
        energy = positions.sum(axis=0)
        by_offset = np.maximum((pos_uj * pos_uj) @ u_w - positions * positions, 0.0).sum(axis=0)
        safe = np.where(energy > 0, energy, 1.0)
        out.scale = _log_variance(energy, w_q) + float(w_q @ (by_offset / safe ** 2))
    out.given = Given(lam, w_q, s_q, given_mean.T, spread.T, positions.T, per_example=False)
    return out


def _mixture_moments(out: Moments, shift, var, base_var) -> Moments:
    """`out` (f of a Gaussian) moved to f of the scale mixture (Jensen over S: a ReLU's mean falls as
    E[sqrt(S)], its variance rises): each channel's mean by `shift`, its variance (and its element maps')
    by var / base_var, the mixture's against the Gaussian's on the same quadrature."""
    ratio = np.where(base_var > 0, np.maximum(var, 0.0) / np.where(base_var > 0, base_var, 1.0), 1.0)
    if out.el_mean is not None:
        shape = (1,) * (out.el_mean.ndim - 1) + (out.channels,)
        res = Moments.from_elements(out.el_mean + shift.reshape(shape), out.el_var * ratio.reshape(shape))
    else:
        res = Moments.from_channels(out.ch_mean + shift, out.ch_var * ratio)
    res.shared, res.corr, res.pre = out.shared, out.corr, out.pre
    return res


def _given_activation(fn, kinks, pieces, g: Given) -> Moments:
    """f of a tensor with one value per example and channel, node by node: given q, x_c ~ N(mean, spread)."""
    h1, h2 = _expect(fn, kinks, pieces, g.mean.reshape(-1), g.spread.reshape(-1))
    h1 = np.asarray(h1, dtype=np.float64).reshape(g.mean.shape)
    h2 = np.asarray(h2, dtype=np.float64).reshape(g.mean.shape)
    return _from_given(Given(g.lam, g.w, g.s, h1, h2 - h1 * h1, np.zeros_like(h1)))


def _from_given(g: Given) -> Moments:
    """Per-channel moments of the mixture `g`, with `g` attached: they replace a rule's own, which take the
    channels (or the examples' values) independent of the latent."""
    mu, var = g.channel_moments()
    out = Moments.from_channels(mu, var)
    out.given = g
    return out


def given_through_linear(pre: Moments, m_in: Moments, w2, bias=None) -> Moments:
    """A one-tap linear map (a 1x1 convolution or Dense, kernel `w2` of shape (cin, cout)) of a tensor with
    one value per example and channel: given the node, channels independent, mean @ W + b, spread @ W^2.
    The pooled moments then include the correlation between channels that the latent makes."""
    g = given_of(m_in, per_example=True)
    if g is None or pre.ch_mean is None or w2.shape != (g.channels, pre.channels):
        return pre
    w2 = np.asarray(w2, dtype=np.float64)
    mean = g.mean @ w2 + (0.0 if bias is None else np.asarray(bias, dtype=np.float64).reshape(1, -1))
    return _from_given(Given(g.lam, g.w, g.s, mean, g.spread @ (w2 * w2), np.zeros_like(mean)))


def pooled(out: Moments, m_in: Moments) -> Moments:
    """A global average of `m_in` (a feature map with a `Given`): an example's pooled channel means given the
    node are its channel means; what the node does not explain (offsets and the positions' average) is
    `out`'s channel variance less the nodes' part."""
    g = given_of(m_in, per_example=False)
    if g is None or out.ch_mean is None or out.channels != g.channels:
        return out
    explained = g.w @ (g.mean * g.mean) - (g.w @ g.mean) ** 2
    rest = np.maximum(out.ch_var - explained, 0.0)
    given = Given(g.lam, g.w, g.s, g.mean - (g.w @ g.mean) + out.ch_mean, np.broadcast_to(rest, g.mean.shape).copy(),
                  np.zeros_like(g.mean))
    return _from_given(given)


def added(ms, out: Moments) -> Moments:
    """Sum of independent inputs: the shared parts add (an input without one contributes 0); the log-scales
    are one latent, loaded by each input's within-energy."""
    lams = [scale_of(m) for m in ms]
    keeps = [getattr(m, "keep", None) for m in ms]
    if any(k is not None for k in keeps) and all(k is not None for k in keeps):
        keeps = [None] * len(ms)  # every input masked: an energy of 0 has no log; left out
    if any(lam > 0.0 for lam in lams) or any(k is not None for k in keeps):
        energy = [max(m.within, 0.0) for m in ms]
        if sum(energy) > 0.0:
            # one latent xi ~ N(0, 1): the summed energy sum_i E_i e^(sqrt(lam_i) xi - lam_i / 2), its log's
            # variance by Gauss-Hermite quadrature in xi; an input behind a per-example mask of keep
            # probability k has energy 0 (probability 1 - k) or E_i / k, every combination weighted
            terms = [[(1.0, 1.0)] if k is None else [(1.0 - k, 0.0), (k, 1.0 / k)] for k in keeps]
            totals, weights = [], []
            for combo in itertools.product(*terms):
                p = float(np.prod([c[0] for c in combo]))
                if p <= 0.0:
                    continue
                totals.append(sum(c[1] * e * np.exp(np.sqrt(lam) * _LATENT_Z - lam / 2.0)
                                  for c, e, lam in zip(combo, energy, lams)))
                weights.append(p * _LATENT_W)
            out.scale = _log_variance(np.concatenate(totals), np.concatenate(weights))
    maps = [given_of(m, per_example=False) for m in ms]
    nodes = {g.w.size for g in maps if g is not None}
    if len(nodes) == 1 and out.ch_mean is not None and all(m.channels == out.channels for m in ms):
        q = nodes.pop()
        first = next(g for g in maps if g is not None)
        dev = sum(g.deviation for g in maps if g is not None and g.w.size == q)
        zeros = np.zeros_like(dev)
        out.given = Given(first.lam, first.w, first.s, out.ch_mean[None, :] + dev, zeros, zeros, per_example=False)
    parts = [shared_of(m) for m in ms]
    if all(p is None for p in parts) or out.ch_mean is None:
        return out
    if any(m.channels != out.channels for m, p in zip(ms, parts) if p is not None):
        return out
    out.shared = sum(p for p in parts if p is not None)
    return out


def through_dropout(out: Moments, m_in: Moments, keep: float, per_example: bool) -> Moments:
    """Inverted dropout with keep probability `keep`; `per_example`: one mask for all positions."""
    carry_scale(out, m_in)
    g = given_of(m_in, per_example=True)
    if g is not None and out.ch_mean is not None and out.channels == g.channels:
        # one value per example and channel, each masked alone: given the node, E[x^2] / keep
        second = (g.spread + g.mean * g.mean) / keep
        return _from_given(Given(g.lam, g.w, g.s, g.mean, second - g.mean * g.mean, g.within))
    carry_given(out, m_in)
    if per_example and 0.0 < keep < 1.0:
        out.keep = float(keep)
    s = shared_of(m_in)
    if s is None or out.ch_mean is None or out.channels != s.size:
        return out
    if per_example:
        m2 = m_in.ch_mean ** 2
        out.shared = np.maximum((m2 + s) / keep - m2, 0.0)
    else:
        out.shared = s
    return out


def pooled_variance_gain(m_in: Moments, n_positions: int):
    """What a global average over `n_positions` adds to the independent-positions variance per channel,
    S (1 - 1 / n), or None."""
    s = shared_of(m_in)
    if s is None or n_positions <= 1:
        return None
    return s * (1.0 - 1.0 / n_positions)
