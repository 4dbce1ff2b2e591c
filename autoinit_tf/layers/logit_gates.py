"""Logical activation functions in logit space (Lowe et al., NeurIPS 2022, arXiv 2110.11940).

Groups of ``k`` consecutive channels on the LAST axis (channels-last) are reduced to one value, so
the output has ``C / k`` channels, like MaxOut. With ``x_1..x_k`` the logits of one group:

Exact logit-space operators (independent probabilities ``p_i = sigmoid(x_i)``):

* ``AND_IL(x) = logit(prod_i p_i)``
* ``OR_IL(x) = logit(1 - prod_i (1 - p_i)) = -AND_IL(-x)``
* ``XNOR_IL(x) = logit(P[an even number of the k events is active])
  = 2 artanh((-1)^k prod_i tanh(x_i / 2))`` (for k = 2: ``logit(p1 p2 + (1-p1)(1-p2))``).
  Probabilities are clamped to ``[1e-7, 1 - 1e-7]`` inside the logit (computed in float32).

AIL approximations (comparison and addition only):

* ``OR_AIL(x) = s if s > 0 else max_i x_i`` with ``s = sum_i relu(x_i)``
* ``AND_AIL(x) = s if s < 0 else min_i x_i`` with ``s = -sum_i relu(-x_i)``
* ``XNOR_AIL(x) = (-1)^k sign(prod_i x_i) min_i |x_i|``, the sign treated as a constant in backprop.

Normalized variants ("NAIL", ``normalize=True``): ``(f(x) - mu_k) / sigma_k`` with the mean and
standard deviation of ``f`` for i.i.d. N(0, 1) inputs, computed exactly by 1-D quadrature (k = 2:
OR/AND ``mu = +/-0.68104, sigma = 0.97229``; XNOR ``mu = 0, sigma = 0.60281``).

Activation-function forms (``and_ail, or_ail, xnor_ail``, NAIL ``and_nail, or_nail, xnor_nail``,
exact ``and_il, or_il, xnor_il``; k = 2, registered under ``autoinit_tf>name``) can be passed as
``activation=`` where a C/k output is acceptable: eager or subclassed code, or a ``Lambda`` layer.
In a Functional graph ``Dense(..., activation=or_ail)`` still REPORTS C output channels (Keras
infers the shape from the layer, not the activation), so use the `LogitGate` layers there.

Ensembles of several functions: ``combine="dup"`` applies every function to the same groups and
concatenates (output ``n C / k`` channels); ``combine="part"`` splits the ``C / k`` groups into ``n``
equal contiguous slices, one function each (output ``C / k``; needs ``C`` divisible by ``n k``).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

__all__ = [
    "LogitGate",
    "AND_AIL",
    "OR_AIL",
    "XNOR_AIL",
    "AND_IL",
    "OR_IL",
    "XNOR_IL",
    "and_ail",
    "or_ail",
    "xnor_ail",
    "and_nail",
    "or_nail",
    "xnor_nail",
    "and_il",
    "or_il",
    "xnor_il",
    "nail_constants",
    "GATE_FUNCTIONS",
]

AIL_FUNCTIONS = ("and_ail", "or_ail", "xnor_ail")
IL_FUNCTIONS = ("and_il", "or_il", "xnor_il")
GATE_FUNCTIONS = AIL_FUNCTIONS + IL_FUNCTIONS
_PROB_EPS = 1e-7


# ------------------------------------------------------------------------------------------------
# Exact moments of the AIL functions for k i.i.d. N(mean, var) inputs (1-D quadrature).
# ------------------------------------------------------------------------------------------------
def ail_moments(name: str, k: int, mean=0.0, var=1.0):
    """(E[f], E[f^2]) of the AIL gate ``name`` for k independent N(mean_i, var_i) inputs.

    ``mean`` and ``var`` are scalars (i.i.d. inputs) or length-k sequences (one per input of the
    group, e.g. per-channel moments). OR_AIL: the events {some x_i > 0} and {all x_i <= 0} are
    disjoint; on the first the output is sum relu(x_i), on the second it is max_i x_i, whose density
    is sum_i phi_i prod_(j != i) Phi_j. AND_AIL is -OR_AIL(-x). XNOR_AIL: E[f] = (-1)^k
    int_0^inf prod_i (P(X_i > t) - P(X_i < -t)) dt and E[f^2] = E[min |x_i|^2] =
    int_0^inf 2 t prod_i P(|X_i| > t) dt.
    """
    from scipy import integrate
    from scipy.special import ndtr

    k = int(k)
    name = name.lower()
    mu = np.broadcast_to(np.asarray(mean, dtype=np.float64), (k,)).copy()
    sd = np.sqrt(np.maximum(np.broadcast_to(np.asarray(var, dtype=np.float64), (k,)), 0.0))
    if name == "and_ail":
        e1, e2 = ail_moments("or_ail", k, -mu, sd * sd)
        return -e1, e2
    if name not in ("or_ail", "xnor_ail"):
        raise ValueError(f"ail_moments: unknown AIL function {name!r}.")
    if np.all(sd == 0.0):
        y = _numpy_gate(name, mu[None, :], k)[0]
        return float(y), float(y * y)
    if np.any(sd == 0.0):  # a constant input among random ones: a tiny spread keeps the integrals exact enough
        sd = np.maximum(sd, 1e-9 * max(1.0, float(sd.max())))
    c = 1.0 / (sd * math.sqrt(2 * math.pi))

    def phi(x):
        return c * np.exp(-0.5 * ((x - mu) / sd) ** 2)

    def cdf(x):
        return ndtr((x - mu) / sd)

    if name == "or_ail":
        hi = float(np.max(mu + 14 * sd))
        lo = float(np.min(mu - 14 * sd))
        r1 = np.zeros(k)
        r2 = np.zeros(k)
        for i in range(k):  # E[relu(x_i)], E[relu(x_i)^2] in closed form
            z = mu[i] / sd[i]
            pz, cz = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi), float(ndtr(z))
            r1[i] = mu[i] * cz + sd[i] * pz
            r2[i] = (mu[i] ** 2 + sd[i] ** 2) * cz + mu[i] * sd[i] * pz
        up = min(0.0, hi)
        if lo < up:
            def dens(x):
                p, f = phi(x), cdf(x)
                total = 0.0
                for i in range(k):
                    total += p[i] * np.prod(np.delete(f, i))
                return total

            m1 = integrate.quad(lambda x: x * dens(x), lo, up, limit=200)[0]
            m2 = integrate.quad(lambda x: x * x * dens(x), lo, up, limit=200)[0]
        else:
            m1 = m2 = 0.0
        e1 = float(r1.sum()) + m1
        e2 = float(r2.sum()) + float(r1.sum() ** 2 - (r1 * r1).sum()) + m2
        return e1, e2
    top = float(np.max(np.abs(mu) + 14 * sd))
    sign = (-1.0) ** k
    f1 = lambda t: float(np.prod((1.0 - cdf(t)) - cdf(-t)))  # noqa: E731
    f2 = lambda t: 2.0 * t * float(np.prod((1.0 - cdf(t)) + cdf(-t)))  # noqa: E731
    e1 = sign * integrate.quad(f1, 0.0, top, limit=200)[0]
    e2 = integrate.quad(f2, 0.0, top, limit=200)[0]
    return e1, e2


_NAIL_CACHE: dict = {}


def nail_constants(name: str, k: int = 2):
    """(mu, sigma) of the AIL gate ``name`` for k i.i.d. N(0, 1) inputs (the NAIL constants)."""
    key = (name.lower(), int(k))
    if key not in _NAIL_CACHE:
        e1, e2 = ail_moments(key[0], key[1], 0.0, 1.0)
        _NAIL_CACHE[key] = (float(e1), float(math.sqrt(max(e2 - e1 * e1, 0.0))))
    return _NAIL_CACHE[key]


def _numpy_gate(name, x, k):
    """Reference used only for degenerate (zero-variance) moments; x has shape (n, k)."""
    if name == "or_ail":
        s = np.maximum(x, 0).sum(-1)
        return np.where(s > 0, s, x.max(-1))
    if name == "and_ail":
        return -_numpy_gate("or_ail", -x, k)
    if name == "xnor_ail":
        return (-1.0) ** k * np.sign(np.prod(x, -1)) * np.abs(x).min(-1)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------
# The reductions. ``parts`` is the list of the k group members, each of shape (..., C/k): the
# strided channel slices x[..., i::k] (group j = channels j k .. j k + k - 1, i.e. the reshape to
# (..., C/k, k) read column by column). Reductions over a tiny minor axis (ops.max/min/sum/prod
# over k after that reshape) lower badly under XLA on CPU (the backward of a max reduction alone
# is ~5x a ReLU's cost) and even reshape-then-index costs more inside a conv net than the strided
# slices, so the k members are combined with elementwise maximum/minimum/add/multiply (k is static).
#
# k = 2 closed forms (identical values; identical gradients wherever the inputs are nonzero and
# distinct, i.e. almost everywhere):
#   OR_AIL(a, b)   = max(a, b) + relu(min(a, b))       (both > 0: a + b; otherwise the max)
#   AND_AIL(a, b)  = min(a, b) - relu(-max(a, b))      (= -OR_AIL(-a, -b))
#   XNOR_AIL(a, b) = max(min(a, b), -max(a, b))        (= sign(ab) min(|a|, |b|); the selected
#                    input enters with slope sign(ab) sign(x_j), the constant-sign gradient)
# At an exact zero input XNOR's constant-sign form has gradient 0 and the closed form a one-sided
# slope +/-1 (both are subgradients); general k keeps the sign(prod) form.
# ------------------------------------------------------------------------------------------------
def _tree(fn, parts):
    parts = list(parts)
    while len(parts) > 1:
        nxt = [fn(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


def _add(a, b):
    return a + b


def _mul(a, b):
    return a * b


def _reduce_parts(name, parts):
    k = len(parts)
    if name == "or_ail":
        if k == 2:
            a, b = parts
            return ops.maximum(a, b) + ops.relu(ops.minimum(a, b))
        s = _tree(_add, [ops.relu(p) for p in parts])
        return ops.where(s > 0, s, _tree(ops.maximum, parts))
    if name == "and_ail":
        if k == 2:
            a, b = parts
            return ops.minimum(a, b) - ops.relu(-ops.maximum(a, b))
        s = -_tree(_add, [ops.relu(-p) for p in parts])
        return ops.where(s < 0, s, _tree(ops.minimum, parts))
    if name == "xnor_ail":
        if k == 2:
            a, b = parts
            return ops.maximum(ops.minimum(a, b), -ops.maximum(a, b))
        sgn = ops.stop_gradient(ops.sign(_tree(_mul, parts)))
        if k % 2:
            sgn = -sgn
        return sgn * _tree(ops.minimum, [ops.abs(p) for p in parts])
    if name in ("and_il", "or_il"):
        if name == "or_il":
            parts = [-p for p in parts]
        lp = _tree(_add, [ops.log_sigmoid(p) for p in parts])  # log prod p_i
        lp = ops.clip(lp, math.log(_PROB_EPS), math.log1p(-_PROB_EPS))
        out = lp - ops.log(-ops.expm1(lp))
        return -out if name == "or_il" else out
    if name == "xnor_il":
        q = _tree(_mul, [ops.tanh(0.5 * p) for p in parts])
        if k % 2:
            q = -q
        lim = 1.0 - 2.0 * _PROB_EPS
        return 2.0 * ops.arctanh(ops.clip(q, -lim, lim))
    raise ValueError(f"Unknown logit gate function {name!r}; expected one of {GATE_FUNCTIONS}.")


def gate_reduce(name, g, k):
    """The gate on a tensor ``g`` of shape (..., k) whose last axis holds the group members."""
    return _reduce_parts(name, [g[..., i] for i in range(int(k))])


def _check_name(name):
    if not isinstance(name, str) or name.lower() not in GATE_FUNCTIONS:
        raise ValueError(f"Unknown logit gate function {name!r}; expected one of {GATE_FUNCTIONS}.")
    return name.lower()


def _group(x, k):
    c = x.shape[-1]
    if c is None:
        raise ValueError("LogitGate needs a static channel (last) dimension.")
    if c % k:
        raise ValueError(
            f"LogitGate: the channel count {c} is not divisible by the group size k={k}; "
            "groups are formed from k consecutive channels on the last axis."
        )
    if k == 1:
        return [x]
    return [x[..., i::k] for i in range(k)]  # member i of every group: channels i, i + k, ...


def apply_gate(x, name, k=2, normalize=False):
    """Apply one gate function to the last axis of ``x`` (functional form)."""
    name = _check_name(name)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if name in IL_FUNCTIONS:  # the 1e-7 clamps need float32 (they round away in float16)
        dtype = x.dtype
        out = ops.cast(_reduce_parts(name, _group(ops.cast(x, "float32"), k)), dtype)
    else:
        out = _reduce_parts(name, _group(x, k))
    if normalize:
        if name not in AIL_FUNCTIONS:
            raise ValueError("normalize=True (NAIL) is defined for the AIL functions only.")
        mu, sigma = nail_constants(name, k)
        out = (out - ops.cast(mu, out.dtype)) / ops.cast(sigma, out.dtype)
    return out


# Activation-function forms (k = 2), usable as ``activation=`` where C/2 output channels are fine.
def _make_activation(name, normalize):
    def fn(x, k=2):
        return apply_gate(x, name, k, normalize)

    fn.__name__ = name.replace("_ail", "_nail") if normalize else name
    fn.__qualname__ = fn.__name__
    fn.__doc__ = (
        f"{fn.__name__.upper()} activation: reduces groups of k consecutive channels (last axis) "
        "to one; the output has C/k channels. See `autoinit_tf.layers.logit_gates`."
    )
    return keras.saving.register_keras_serializable(package="autoinit_tf", name=fn.__name__)(fn)


and_ail = _make_activation("and_ail", False)
or_ail = _make_activation("or_ail", False)
xnor_ail = _make_activation("xnor_ail", False)
and_nail = _make_activation("and_ail", True)
or_nail = _make_activation("or_ail", True)
xnor_nail = _make_activation("xnor_ail", True)
and_il = _make_activation("and_il", False)
or_il = _make_activation("or_il", False)
xnor_il = _make_activation("xnor_il", False)


@keras.saving.register_keras_serializable(package="autoinit_tf")
class LogitGate(keras.layers.Layer):
    """Logit-space logical gate over groups of ``k`` consecutive channels (Lowe et al., 2022).

    Args:
        functions: one name or a list of names among ``and_ail, or_ail, xnor_ail, and_il, or_il,
            xnor_il`` (see the module docstring for the formulas).
        k: group size (channels reduced into one), default 2.
        combine: ``"dup"`` (each function on all groups, outputs concatenated: ``n C / k``
            channels) or ``"part"`` (groups split into n contiguous slices, one function each:
            ``C / k`` channels). Irrelevant for a single function.
        normalize: the NAIL variants (AIL functions only): ``(f - mu_k) / sigma_k``.

    Input ``(..., C)``, channels last; ``C`` must be divisible by ``k`` ("dup") or ``n k`` ("part").
    """

    def __init__(self, functions="or_ail", k=2, combine="dup", normalize=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(functions, str):
            functions = [functions]
        self.functions = [_check_name(f) for f in functions]
        if not self.functions:
            raise ValueError("LogitGate needs at least one function.")
        self.k = int(k)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if combine not in ("dup", "part"):
            raise ValueError(f"combine must be 'dup' or 'part', got {combine!r}.")
        self.combine = combine
        self.normalize = bool(normalize)
        if self.normalize:
            bad = [f for f in self.functions if f not in AIL_FUNCTIONS]
            if bad:
                raise ValueError(f"normalize=True (NAIL) is defined for the AIL functions only, got {bad}.")
            for f in self.functions:  # computed once, in Python, outside any trace
                nail_constants(f, self.k)
        self.supports_masking = True

    def _check_channels(self, c):
        n = len(self.functions)
        if c is None:
            raise ValueError("LogitGate needs a static channel (last) dimension.")
        div = self.k * (n if self.combine == "part" else 1)
        if c % div:
            what = f"k={self.k}" if div == self.k else f"n*k={n}*{self.k}={div} (combine='part')"
            raise ValueError(
                f"LogitGate: the channel count {c} is not divisible by {what}; groups are formed "
                "from k consecutive channels on the last axis."
            )

    def build(self, input_shape):
        self._check_channels(input_shape[-1])

    def compute_output_shape(self, input_shape):
        c = input_shape[-1]
        self._check_channels(c)
        groups = c // self.k
        n = len(self.functions)
        out_c = groups * n if self.combine == "dup" else groups
        return tuple(input_shape[:-1]) + (out_c,)

    def call(self, inputs):
        n = len(self.functions)
        if n == 1:
            return apply_gate(inputs, self.functions[0], self.k, self.normalize)
        if self.combine == "dup":
            outs = [apply_gate(inputs, f, self.k, self.normalize) for f in self.functions]
            return ops.concatenate(outs, axis=-1)
        c = inputs.shape[-1]
        width = c // n
        outs = [
            apply_gate(inputs[..., i * width : (i + 1) * width], f, self.k, self.normalize)
            for i, f in enumerate(self.functions)
        ]
        return ops.concatenate(outs, axis=-1)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {
            **super().get_config(),
            "functions": list(self.functions),
            "k": self.k,
            "combine": self.combine,
            "normalize": self.normalize,
        }


def _fixed(name, doc):
    class _Gate(LogitGate):
        __doc__ = doc

        def __init__(self, k=2, normalize=False, **kwargs):
            kwargs.pop("functions", None)
            kwargs.pop("combine", None)
            super().__init__(functions=name, k=k, normalize=normalize, **kwargs)

        def get_config(self):
            cfg = super().get_config()
            cfg.pop("functions")
            cfg.pop("combine")
            return cfg

    cls_name = name.upper()
    _Gate.__name__ = cls_name
    _Gate.__qualname__ = cls_name
    _Gate.__module__ = __name__
    return keras.saving.register_keras_serializable(package="autoinit_tf", name=cls_name)(_Gate)


AND_AIL = _fixed("and_ail", "AND_AIL gate layer: ``s = -sum relu(-x_i)``; ``s if s < 0 else min x_i``.")
OR_AIL = _fixed("or_ail", "OR_AIL gate layer: ``s = sum relu(x_i)``; ``s if s > 0 else max x_i``.")
XNOR_AIL = _fixed("xnor_ail", "XNOR_AIL gate layer: ``(-1)^k sign(prod x_i) min |x_i|`` (sign constant).")
AND_IL = _fixed("and_il", "Exact AND in logit space: ``logit(prod sigmoid(x_i))``.")
OR_IL = _fixed("or_il", "Exact OR in logit space: ``logit(1 - prod sigmoid(-x_i))``.")
XNOR_IL = _fixed("xnor_il", "Exact XNOR (parity) in logit space: ``2 artanh((-1)^k prod tanh(x_i/2))``.")
