"""Is the predicted signal stable? How much a deviation of the variance grows along the graph.

AutoInit scales each weighted layer for the second moment its input is *predicted* to have. If one drawn
network's realized second moment deviates by a relative amount d at some layer, the next weighted layer's
output deviates by the same d, and an activation f turns a relative change d of its input variance into

    e * d,   e = d log E[f(z)^2] / d log Var(z),  z ~ N(mu, var)  (mu held fixed),

its *variance elasticity* at the operating point. Along a chain of layers the deviations multiply by the
product of the elasticities: ReLU (positively homogeneous) has e = 1 exactly, tanh and SELU e < 1 (they
pull the variance back), but GELU, SiLU/swish, Mish, hard-SiLU have e > 1 around unit variance, so a
finite-width deviation of one drawn network grows geometrically with depth, whatever the analytic rule.
Normalization layers (BatchNormalization and the like) rescale to a fixed variance and reset the product.

`Amplification` tracks the largest product along any path (elasticities at the predicted operating
points; linear layers and merges pass it on, a merge takes the largest of its inputs), so the analytic
pass can say when its prediction of one drawn network cannot be trusted and calibration is the remedy.
"""

from __future__ import annotations

import math

import keras

from autoinit_tf.moments import Moments
from autoinit_tf.rules.activation import VECTOR_ACTIVATIONS, activation_moments, activation_name

__all__ = ["variance_elasticity", "Amplification", "UnstableSignalWarning", "AMPLIFICATION_LIMIT"]

#: Above this amplification the analytic pass warns (a 5% finite-width deviation at the first layer
#: would end 20% or more off).
AMPLIFICATION_LIMIT = 4.0

#: Layers that rescale their output to a fixed variance (in training mode): the product restarts at 1.
NORMALIZERS = frozenset({
    "BatchNormalization", "SyncBatchNormalization", "LayerNormalization", "GroupNormalization",
    "UnitNormalization", "RMSNormalization", "SpectralNormalization", "ProxyNormalization",
    "DARBatchNormalization", "IterNormWhitening",
})

_STEP = 0.05  # central difference in log variance


class UnstableSignalWarning(UserWarning):
    """The analytic prediction amplifies deviations of one drawn network (calibrate instead)."""


def variance_elasticity(fn, m: Moments) -> float:
    """d log E[f(z)^2] / d log Var(z) for z ~ N(m.mean, m.var), by a central difference of the exact
    (quadrature) second moments at Var(z) * exp(+-0.05). 1.0 for the identity and for vector activations
    (softmax and the like, whose output scale does not follow the input's)."""
    f = keras.activations.get(fn) if isinstance(fn, str) else fn
    name = activation_name(f)
    if f is None or name in ("linear", "softmax", "log_softmax") or name in VECTOR_ACTIVATIONS:
        return 1.0
    var = float(m.var)
    if not (math.isfinite(var) and var > 0):
        return 1.0
    up = activation_moments(f, Moments(float(m.mean), var * math.exp(_STEP)))
    down = activation_moments(f, Moments(float(m.mean), var * math.exp(-_STEP)))
    s_up, s_down = up.mean ** 2 + up.var, down.mean ** 2 + down.var
    if not (s_up > 0 and s_down > 0 and math.isfinite(s_up) and math.isfinite(s_down)):
        return 1.0
    return (math.log(s_up) - math.log(s_down)) / (2.0 * _STEP)


class Amplification:
    """The largest product of variance elasticities along any path to each tensor of one walk."""

    def __init__(self, signal_variance: float):
        self.signal_variance = float(signal_variance)
        self.gains = {}  # id(KerasTensor) -> amplification of that tensor
        self.worst = (1.0, None, None)  # (amplification, node name, activation name)
        self._cache = {}

    def visit(self, op, node, inputs, name):
        """Record the amplification of `node`'s outputs; `inputs` are its input Moments."""
        gain = max((self.gains.get(id(kt), 1.0) for kt in node.input_tensors), default=1.0)
        if type(op).__name__ in NORMALIZERS:
            gain = 1.0
        else:
            act = getattr(op, "activation", None)
            if callable(act):
                # An Activation layer acts on its input; a fused activation on the pre-activation, which
                # AutoInit set to second moment `signal_variance` (pooled mean ~ 0).
                point = inputs[0] if type(op).__name__ == "Activation" and inputs else Moments(
                    0.0, self.signal_variance)
                gain *= self._elasticity(act, point)
        for kt in node.outputs:
            self.gains[id(kt)] = gain
        if gain > self.worst[0]:
            act = getattr(op, "activation", None)
            self.worst = (gain, name, getattr(act, "__name__", None))

    def _elasticity(self, act, m):
        key = (id(act), round(float(m.mean), 4), round(float(m.var), 4))
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = variance_elasticity(act, Moments(float(m.mean), float(m.var)))
            except Exception:  # noqa: BLE001 - a custom activation without a rule: no opinion
                hit = 1.0
            self._cache[key] = hit
        return hit

    def message(self) -> str:
        gain, name, act = self.worst
        what = f" ('{act}' has variance elasticity > 1 at its operating point)" if act else ""
        return (
            f"The predicted signal is unstable: up to '{name}', a relative deviation of the variance grows "
            f"{gain:.3g}x{what}. One drawn network drifts from the prediction geometrically with depth, so "
            "its realized variance can be far from the target. Use wrap(..., calibrate='probe') (exact on the "
            "realized network) or add normalization layers."
        )
