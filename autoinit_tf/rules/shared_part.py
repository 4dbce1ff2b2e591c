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

What this does not carry: the gate also makes the signal a scale mixture (each example's variance scaled by
its own g^2), which changes E[f] of a nonlinearity beyond its mean and variance (kurtosis 11-32 in
EfficientNetB0's later blocks). That is why the default `wrap` still calibrates the layers after a gate.
"""

from __future__ import annotations

import numpy as np

from autoinit_tf.moments import Moments, many_expectations, piecewise_polynomial_expectations

_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(8)
_GH_W = _GH_W / _GH_W.sum()


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
    """Set the shared part of y = g x (g constant over positions, per example and channel)."""
    if out.ch_mean is None:
        return out
    c = out.channels
    gm, g2 = _per_channel(g, c)
    xm, _ = _per_channel(x, c)
    if gm is None or xm is None:
        return out
    sx = shared_of(x)
    m2 = xm ** 2
    out.shared = np.maximum(g2 * (m2 + (0.0 if sx is None else sx)) - gm ** 2 * m2, 0.0)
    return out


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
    out.shared = np.maximum(out_shared, 0.0)
    return out


def through_linear(pre: Moments, m_in: Moments, w3, taps=None) -> Moments:
    """`pre` (a linear layer's output from `m_in`, kernel `w3` of shape (taps, cin, cout), `taps` its
    per-position real taps) with the shared part carried and its correlated-taps variance added."""
    s = shared_of(m_in)
    if s is None or pre.ch_mean is None or w3.shape[1] != s.size or w3.shape[2] != pre.channels:
        return pre
    return _through_taps(pre, s, np.asarray(w3, dtype=np.float64), taps, lambda s_, v: s_ @ v)


def through_depthwise(pre: Moments, m_in: Moments, w3, taps=None) -> Moments:
    """Like `through_linear` for a depthwise kernel `w3` of shape (taps, C, depth_multiplier) (output
    channel c * dm + d reads input channel c)."""
    s = shared_of(m_in)
    if s is None or pre.ch_mean is None or w3.shape[1] != s.size or w3.shape[1] * w3.shape[2] != pre.channels:
        return pre
    return _through_taps(pre, s, np.asarray(w3, dtype=np.float64), taps, lambda s_, v: (s_[:, None] * v).reshape(-1))


def through_batch_norm(out: Moments, m_in: Moments, gamma, epsilon) -> Moments:
    """Training-mode BatchNormalization on the last axis: S gamma^2 / (V + eps)."""
    s = shared_of(m_in)
    if s is None or out.ch_mean is None or out.channels != s.size:
        return out
    g2 = 1.0 if gamma is None else np.square(np.asarray(gamma, dtype=np.float64).reshape(-1))
    den = m_in.ch_var + float(epsilon)
    out.shared = np.where(den > 0, s * g2 / np.where(den > 0, den, 1.0), 0.0)  # a constant channel: none
    return out


def through_activation(fn, kinks, m_in: Moments, out: Moments, pieces=None) -> Moments:
    """S_out = Var_u(E_v fn(m + u + v)) per channel (module docstring); `fn` maps numpy to numpy, `pieces`
    (when fn is piecewise polynomial, `rules.activation.PIECEWISE_POLYNOMIAL`) gives E_v in closed form."""
    s = shared_of(m_in)
    if s is None or out.ch_mean is None or out.channels != s.size:
        return out
    c = s.size
    s = np.minimum(s, m_in.ch_var)
    mean = (m_in.ch_mean[:, None] + np.sqrt(s)[:, None] * _GH_Z[None, :]).reshape(-1)
    within = np.repeat(np.maximum(m_in.ch_var - s, 0.0), _GH_Z.size)
    if pieces is not None:
        h, _ = piecewise_polynomial_expectations(pieces, mean, np.sqrt(within))
    else:
        h, _ = many_expectations(fn, mean, within, kinks)
    h = np.asarray(h, dtype=np.float64).reshape(c, -1)
    avg = h @ _GH_W
    out.shared = np.maximum(np.square(h) @ _GH_W - avg * avg, 0.0)
    return out


def added(ms, out: Moments) -> Moments:
    """Sum of independent inputs: the shared parts add (an input without one contributes 0)."""
    parts = [shared_of(m) for m in ms]
    if all(p is None for p in parts) or out.ch_mean is None:
        return out
    if any(m.channels != out.channels for m, p in zip(ms, parts) if p is not None):
        return out
    out.shared = sum(p for p in parts if p is not None)
    return out


def through_dropout(out: Moments, m_in: Moments, keep: float, per_example: bool) -> Moments:
    """Inverted dropout with keep probability `keep`; `per_example`: one mask for all positions."""
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
