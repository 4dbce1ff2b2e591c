"""The measured signal: replay the graph on real tensors, side-effect free, and calibrate on it.

Three entry points share one replay (`graph.walk`, the walker of the analytic pass) in which every
layer runs through ``layer.stateless_call(trainable_values, non_trainable_values, ...)``: the layer
computes with the values it is handed and returns its would-be state updates, which are dropped. So
`measure` leaves every weight, BatchNormalization moving statistic, optimizer slot and seed-generator
(RNG) state exactly as it was, on every backend. Raw ops (``x + y``, ``ops.relu``...) are plain calls.

* `measure(model, x)` -> `SignalReport` whose rows hold the *measured* moments of every node's
  outputs, plus the Signal Propagation Plot quantities (Brock et al. 2021) per output: the average
  squared channel mean and the average channel variance (channels = last axis), and, for layers with
  a fused activation (``Dense(..., activation="relu")``), the pre-activation moments; for recurrent
  layers (SimpleRNN/LSTM/GRU, Bidirectional) the moments of the input contribution x W of every step
  to the gate pre-activations (all gates side by side), the quantity AutoInit's recurrent rule sets.
* `compare(model, x)` -> the analytic report (`analyze`) with the measured moments beside the
  predicted ones (`SignalReport.with_measurement`).
* `calibrate(model, "probe" | data)` (also ``wrap(..., calibrate=...)``): the same replay, but at each
  weighted layer (in topological order, on the already calibrated upstream signal) the main kernel is
  multiplied by the factor that makes the layer's realized **pre-activation** variance (the output
  before its fused activation; the output itself for layers without one) equal the target exactly on
  the calibration batch (LSUV, Mishkin & Matas 2016; data-free when the batch is a Gaussian probe with
  the model's input moments). The kernel is assigned in place (``variable.assign`` of value * s, in
  the variable's dtype); the scaled output is re-used downstream without a second call, so the pass is
  linear in the number of layers. Recurrent layers are not linear in their kernels, but AutoInit's
  target for them is: each gate's block of the input kernel is scaled so that the gate's input
  contribution x W has the target variance (exact, one scale per gate and direction), then the layer
  runs once.

Statistics are reduced on the backend (float32 for float32 tensors; E[y^2] in batch slices, so no
full-size temporary) and only scalars are copied out. Memory: the walk drops each value after its last
consumer; a calibrated layer holds at most its output and the scaled output at once; ``wrap`` without a
report replays without per-node statistics (`_Replay(record=False)`); on glibc, heap memory freed by
the replay is handed back to the OS as it goes (`autoinit_tf.heap.HeapTrim`).
"""

from __future__ import annotations

import contextlib

import logging
import math
import warnings

import keras
import numpy as np
from keras import ops
from keras.src import tree

from autoinit_tf import graph
from autoinit_tf.heap import HeapTrim
from autoinit_tf.moments import Moments
from autoinit_tf.report import NodeRow, SignalReport

__all__ = ["measure", "compare", "calibrate", "calibration_kernel", "CALIBRATION_KERNELS", "CalibrationWarning",
           "CALIBRATION_RSE"]

logger = logging.getLogger("autoinit_tf")

_PROBE_SALT = 0x5EED

#: Calibration wants every calibrated variance known to this relative standard error (RSE) or better on
#: its batch: a fresh batch of the same distribution then lands within +-5% of the target with a margin
#: of 2.5 standard errors. Worse triggers the automatic probe's growth, or a `CalibrationWarning`.
CALIBRATION_RSE = 0.02

#: When the automatic probe grows, it grows to reach this RSE (a margin of 3.3 standard errors, the
#: margin every one of a deep network's layers needs). Only networks worse than `CALIBRATION_RSE` pay for
#: it: most stay on the default probe.
_GROWTH_RSE = 0.015

#: An automatically sized probe grows (towards `_GROWTH_RSE`) only while its largest activation
#: holds at most this many elements (64 MiB of float32).
_GROWTH_ELEMENTS = 1 << 24


class CalibrationWarning(UserWarning):
    """Calibration could not fix a layer's variance to the intended precision on its batch."""


# -- which variable calibration scales ------------------------------------------------------------


def _mha_kernel(layer):
    dense = layer._output_dense
    return dense.kernel, getattr(dense, "bias", None)


def _attr_kernel(name, bias="bias"):
    def get(layer):
        return getattr(layer, name), getattr(layer, bias, None)

    get.__name__ = f"kernel_{name}"
    return get


# {layer class: layer -> (kernel variable, bias variable or None)}. The layer's main output must be
# linear in the kernel (plus the bias term), so scaling the kernel by s scales the weighted part by s.
# Extend it for custom layers: CALIBRATION_KERNELS[MyLayer] = lambda layer: (layer.w, layer.b).
CALIBRATION_KERNELS: dict = {
    keras.layers.Dense: _attr_kernel("kernel"),
    keras.layers.EinsumDense: _attr_kernel("kernel"),
    keras.layers.Conv1D: _attr_kernel("kernel"),
    keras.layers.Conv2D: _attr_kernel("kernel"),
    keras.layers.Conv3D: _attr_kernel("kernel"),
    keras.layers.Conv1DTranspose: _attr_kernel("kernel"),
    keras.layers.Conv2DTranspose: _attr_kernel("kernel"),
    keras.layers.Conv3DTranspose: _attr_kernel("kernel"),
    keras.layers.DepthwiseConv1D: _attr_kernel("kernel"),
    keras.layers.DepthwiseConv2D: _attr_kernel("kernel"),
    keras.layers.SeparableConv1D: _attr_kernel("pointwise_kernel"),
    keras.layers.SeparableConv2D: _attr_kernel("pointwise_kernel"),
    keras.layers.Embedding: _attr_kernel("embeddings", bias="__no_bias__"),
    keras.layers.MultiHeadAttention: _mha_kernel,
}


# Classes whose output is exactly (weighted part) + (bias broadcast over the batch), so the bias term can
# be computed on one example (exact types only: a subclass may change `call`).
_BIAS_SPLIT = frozenset(CALIBRATION_KERNELS) - {keras.layers.Embedding}


def calibration_kernel(op):
    """``(kernel, bias)`` that calibration scales for `op`, or None when `op` is not calibratable."""
    for cls in type(op).__mro__:
        if cls in CALIBRATION_KERNELS:
            try:
                kernel, bias = CALIBRATION_KERNELS[cls](op)
            except AttributeError:
                return None
            return (kernel, bias) if kernel is not None else None
    return None


def _rnn_cell(layer):
    """The cell of a SimpleRNN/LSTM/GRU-like layer with a 2-D input kernel of ``gates * units`` columns."""
    if not isinstance(layer, keras.layers.RNN):
        return None
    cell = getattr(layer, "cell", None)
    kernel = getattr(cell, "kernel", None)
    units = getattr(cell, "units", None)
    if kernel is None or not isinstance(units, int) or units <= 0 or len(kernel.shape) != 2:
        return None
    return cell if int(kernel.shape[-1]) % units == 0 else None


def _recurrent_cells(op):
    """The cells whose input kernels calibration scales (both directions of a Bidirectional), or None."""
    if isinstance(op, keras.layers.Bidirectional):
        cells = [_rnn_cell(op.forward_layer), _rnn_cell(op.backward_layer)]
        return cells if all(c is not None for c in cells) else None
    cell = _rnn_cell(op)
    return None if cell is None else [cell]


def _sequence_input(args, kwargs):
    """The (batch, steps, features) input of a recurrent layer call, or None."""
    x = args[0] if args else kwargs.get("sequences", kwargs.get("inputs"))
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if x is None or not hasattr(x, "shape") or len(x.shape) != 3:
        return None
    return x


def _gate_inputs(x, cells, value=lambda v: v.value):
    """The input contribution x W of every step to the gate pre-activations: (examples * steps, columns),
    the columns of all `cells` side by side (``value(variable)``: the kernel's value in this replay)."""
    x = _as_float(x)
    x = ops.reshape(x, (-1, int(x.shape[-1])))
    parts = [ops.matmul(x, ops.cast(value(cell.kernel), x.dtype)) for cell in cells]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


# -- calling one node without side effects ----------------------------------------------------------


def _accepts_training(op) -> bool:
    from autoinit_tf.rules.fallback import _accepts_training as accepts

    return accepts(op)


def _fused_activation(op):
    """The fused activation of a Dense/Conv-like layer when it is not the identity, else None."""
    act = getattr(op, "activation", None)
    if act is None or not callable(act) or not isinstance(op, keras.layers.Layer):
        return None
    if act is keras.activations.linear or getattr(act, "__name__", "") == "linear":
        return None
    if calibration_kernel(op) is None:
        return None  # only layers whose call ends with `self.activation(...)` in the known classes
    return act


class _NoActivation:
    """Temporarily set ``layer.activation = None`` (restored on exit) to read the pre-activation."""

    def __init__(self, op, active):
        self.op = op
        self.active = active

    def __enter__(self):
        if self.active:
            self.saved = self.op.__dict__.get("activation", _MISSING)
            object.__setattr__(self.op, "activation", None)
        return self

    def __exit__(self, *exc):
        if self.active:
            if self.saved is _MISSING:
                self.op.__dict__.pop("activation", None)
            else:
                object.__setattr__(self.op, "activation", self.saved)
        return False


_MISSING = object()


def _call(op, args, kwargs, training, overrides=None):
    """Run `op` on real tensors; layers through `stateless_call` (state updates are discarded)."""
    if not isinstance(op, keras.layers.Layer):
        return op(*args, **kwargs)
    if training is not None and _accepts_training(op):
        # As keras.Model.__call__(training=...) does: the call's mode overrides the recorded one.
        kwargs = dict(kwargs, training=training)
    overrides = overrides or {}

    def value(v):
        o = overrides.get(id(v))
        return v.value if o is None else ops.convert_to_tensor(o, dtype=v.dtype)

    tv = [value(v) for v in op.trainable_variables]
    ntv = [value(v) for v in op.non_trainable_variables]
    with _autocast(op):
        args, kwargs = _convert_inputs(op, args, kwargs)
        outs, _ = op.stateless_call(tv, ntv, *args, **kwargs)
    return outs


def _autocast(op):
    """The autocast scope ``Layer.__call__`` would enter (``stateless_call`` enters none): under a mixed
    policy (``mixed_float16``/``mixed_bfloat16``) the float32 variables are read in the compute dtype."""
    from keras.src.backend import AutocastScope, get_autocast_scope, is_float_dtype

    current = get_autocast_scope()
    if not getattr(op, "autocast", True) or not is_float_dtype(op.compute_dtype):
        return AutocastScope(None) if current is not None else contextlib.nullcontext()
    if (current is None and op.compute_dtype != op.variable_dtype) or (
        current is not None and current.dtype != op.compute_dtype
    ):
        return AutocastScope(op.compute_dtype)
    return contextlib.nullcontext()


def _convert_inputs(op, args, kwargs):
    """Float inputs cast to the layer's compute dtype, as ``Layer.__call__`` does (masks kept)."""
    policy = getattr(op, "dtype_policy", None)
    if policy is None or op.compute_dtype == op.variable_dtype:
        return args, kwargs

    def convert(x):
        if not hasattr(x, "dtype") or not keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype)):
            return x
        mask = keras.backend.get_keras_mask(x) if hasattr(keras.backend, "get_keras_mask") else None
        y = policy.convert_input(x, op.autocast, op.input_dtype)
        if mask is not None:
            keras.backend.set_keras_mask(y, mask)
        return y

    return tree.map_structure(convert, args), tree.map_structure(convert, kwargs)


# -- statistics -------------------------------------------------------------------------------------


class _Stats:
    """Moments of one tensor plus the per-channel (last axis) SPP quantities."""

    __slots__ = ("moments", "channel_mean_sq", "channel_var")

    def __init__(self, moments, channel_mean_sq, channel_var):
        self.moments = moments
        self.channel_mean_sq = channel_mean_sq
        self.channel_var = channel_var

    def channel(self):
        return {"mean_sq": self.channel_mean_sq, "var": self.channel_var}


def _as_float(y):
    y = ops.convert_to_tensor(y)
    dtype = str(y.dtype)
    if "float" not in dtype:
        y = ops.cast(y, "float32")
    return y


_NUMPY_MAX = 1 << 20  # tensors up to this many elements are reduced in numpy (fewer eager dispatches)


# _var_cov (calibration) copies to the host only below this size: above it the backend's reductions need
# no float64 host copies of whole activations.
_HOST_MAX = 1 << 16


def _small(y, limit=_NUMPY_MAX):
    n = 1
    for d in y.shape:
        n *= int(d)
    return n <= limit


def _np(y):
    a = np.asarray(ops.convert_to_numpy(y))
    if a.dtype.kind != "f":
        a = a.astype(np.float32)
    return a


def _stats(y) -> _Stats:
    y = ops.convert_to_tensor(y)
    rank = len(y.shape)
    if rank == 0:
        v = float(ops.convert_to_numpy(y))
        return _Stats(_moments(v, 0.0), v * v, 0.0)
    if _small(y):
        a = _np(y)
        a = a.reshape(-1, a.shape[-1]) if rank > 1 else a.reshape(-1, 1)
        if a.size == 0:
            return _Stats(_moments(float("nan"), float("nan")), float("nan"), float("nan"))
        cm = a.mean(axis=0, dtype=np.float64)
        cv = a.var(axis=0, dtype=np.float64)
        mean, within, between, msq = float(cm.mean()), float(cv.mean()), float(cm.var()), float(np.mean(cm * cm))
    else:
        y = _as_float(y)
        cm = ops.mean(y, axis=tuple(range(rank - 1))) if rank > 1 else ops.mean(y, keepdims=True)
        cm = np.asarray(ops.convert_to_numpy(cm), dtype=np.float64)
        mean, between, msq = float(cm.mean()), float(cm.var()), float(np.mean(cm * cm))
        # Mean within-channel variance = E[y^2] - mean of squared channel means (no full-size temporary).
        within = max(_mean_square(y) - msq, 0.0)
    # Equal counts per channel: total variance = mean within-channel variance + variance of means.
    return _Stats(_moments(mean, within + between), msq, within)


def _mean_square(y) -> float:
    """E[y^2] over all elements, in slices along the batch axis of at most ~2**20 elements, so the only
    temporary is one slice's square (first-axis slices share the tensor's buffer)."""
    n = int(y.shape[0]) if len(y.shape) else 1
    size = 1
    for d in y.shape:
        size *= int(d)
    if size == 0:
        return float("nan")
    step = max(1, _NUMPY_MAX // max(size // max(n, 1), 1))
    if len(y.shape) == 0 or step >= n:
        return float(ops.convert_to_numpy(ops.mean(ops.square(y))))
    parts = [ops.sum(ops.square(y[i:i + step])) for i in range(0, n, step)]
    return float(np.sum(np.asarray(ops.convert_to_numpy(ops.stack(parts)), dtype=np.float64))) / size


def _moments(mean, var):
    if not (math.isfinite(mean) and math.isfinite(var)):
        m = Moments.__new__(Moments)
        m.mean, m.var = float(mean), float(var)
        return m
    return Moments(mean, max(var, 0.0))


def _example_moments(u):
    """Per-example mean and mean square of `u` over all its non-batch axes (float64 numpy vectors),
    reduced in batch slices of at most ~2**20 elements, so no full-size temporary is made."""
    n = int(u.shape[0])
    per = 1
    for d in u.shape[1:]:
        per *= int(d)
    axes = tuple(range(1, len(u.shape)))
    if not axes or n * per <= _NUMPY_MAX:  # small: one host copy, reduced in numpy (fewer dispatches)
        a = _np(u).reshape(n, -1)
        return a.mean(axis=1, dtype=np.float64), np.mean(np.square(a, dtype=np.float64), axis=1)
    step = max(1, _NUMPY_MAX // max(per, 1))
    m1, m2 = [], []
    for i in range(0, n, step):
        part = u[i:i + step]
        m1.append(ops.mean(part, axis=axes))
        m2.append(ops.mean(ops.square(part), axis=axes))
    both = np.asarray(ops.convert_to_numpy(ops.stack([ops.concatenate(m1), ops.concatenate(m2)])),
                      dtype=np.float64)
    return both[0], both[1]


def _relative_se(m1, m2):
    """Relative standard error of the pooled variance estimated from per-example moments.

    The pooled variance is the batch mean of q_e = E_e[(u - mu)^2] (mu the pooled mean), so its relative
    standard error is std(q) / (mean(q) sqrt(n)). Heavy-tailed signals (a few examples carrying most of
    the energy) have a large one: their variance is only known to that precision on this batch.
    """
    n = m1.size
    if n < 2:
        return float("inf")
    mu = float(m1.mean())
    q = m2 - 2.0 * mu * m1 + mu * mu
    mean_q = float(q.mean())
    if not (math.isfinite(mean_q) and mean_q > 0):
        return float("inf")
    return float(q.std(ddof=1)) / (mean_q * math.sqrt(n))


def _var_cov(u, c=None):
    """Var(u), the relative standard error of that estimate (`_relative_se`), and when `c` is given
    Cov(u, c) and Var(c), over all elements: ``(var_u, rse_u, cov, var_c)``.

    `c` has the batch size of `u` or 1 (a term that is the same for every example, broadcast over the
    batch: then Cov(u, c) = mean over positions of mean_batch(u) * (c - mean(c))).
    """
    u = ops.convert_to_tensor(u)
    if c is not None:
        c = ops.convert_to_tensor(c)
    shared = c is not None and len(u.shape) > 0 and int(c.shape[0]) == 1 and int(u.shape[0]) != 1
    if len(u.shape) == 0:
        return 0.0, float("inf"), 0.0, 0.0
    if _small(u, _HOST_MAX):
        a = _np(u).astype(np.float64)
        vu = float(a.var())
        flat = a.reshape(a.shape[0], -1)
        rse = _relative_se(flat.mean(axis=1), np.mean(flat * flat, axis=1))
        if c is None:
            return vu, rse, 0.0, 0.0
        b = _np(c).astype(np.float64)
        b = b - b.mean()
        cov = float(np.mean(a.mean(axis=0) * b[0])) if shared else float(np.mean(a * b))
        return vu, rse, cov, float(np.mean(b * b))
    u = _as_float(u)
    m1, m2 = _example_moments(u)
    mu = float(m1.mean())
    vu = max(float(m2.mean()) - mu * mu, 0.0)  # no full-size temporary (ops.var makes three)
    rse = _relative_se(m1, m2)
    if c is None:
        return vu, rse, 0.0, 0.0
    c = _as_float(c)
    c = c - ops.mean(c)
    cov = ops.mean(ops.mean(u, axis=0) * c[0]) if shared else ops.mean(u * c)
    vec = ops.stack([cov, ops.mean(ops.square(c))])
    cov, vc = (float(v) for v in np.asarray(ops.convert_to_numpy(vec), dtype=np.float64))
    return vu, rse, cov, vc


def _first_example(args, kwargs):
    """`(args, kwargs)` with every batched tensor cut to its first example."""
    def cut(t):
        if t is not None and hasattr(t, "shape") and hasattr(t, "dtype") and len(t.shape) > 0:
            return t[:1]
        return t

    return tree.map_structure(cut, (args, kwargs))


# -- inputs -----------------------------------------------------------------------------------------


def _probe(fn, input_moments, batch_size, seed):
    from autoinit_tf.autoinit import resolve_input_moments

    moments = resolve_input_moments(fn, input_moments)
    rng = np.random.default_rng([_PROBE_SALT, 0 if seed is None else int(seed)])
    arrays = []
    for kt, m in zip(fn.inputs, moments):
        shape = [batch_size if (i == 0 or d is None) else int(d) for i, d in enumerate(kt.shape)]
        dtype = str(kt.dtype)
        if "int" in dtype or "bool" in dtype:
            hi = max(int(round(m.mean + 3.0 * math.sqrt(m.var))) + 1, 2)
            arrays.append(rng.integers(0, hi, size=shape).astype(dtype))
        else:
            x = rng.standard_normal(shape) * math.sqrt(m.var) + m.mean
            arrays.append(x.astype(dtype if "float" in dtype else "float32"))
    return arrays


def _input_arrays(fn, x, batch_size):
    """The flat list of input tensors (one per ``fn.inputs``) from an array/dict/list/dataset."""
    from autoinit_tf.data_moments import _first_batch

    batch = _first_batch(x)
    names = [kt.name for kt in fn.inputs]
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"x is missing the model inputs {missing}; it has keys {sorted(batch)}.")
        arrays = [batch[n] for n in names]
    elif isinstance(batch, (list, tuple)) and len(fn.inputs) > 1:
        arrays = list(batch)
    else:
        arrays = [batch]
    if len(arrays) != len(fn.inputs):
        raise ValueError(f"x provides {len(arrays)} arrays but the model has {len(fn.inputs)} inputs ({names}).")
    from autoinit_tf.data_moments import check_input_array

    out = []
    for kt, a in zip(fn.inputs, arrays):
        check_input_array(ops.convert_to_numpy(a) if not isinstance(a, np.ndarray) else a, kt.name, "calibrate")
        t = ops.convert_to_tensor(a)
        want, got = tuple(kt.shape[1:]), tuple(t.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(f"x for input '{kt.name}' has shape {tuple(t.shape)}, but the model expects "
                             f"(batch,) + {want}.")
        if batch_size is not None and t.shape[0] is not None and t.shape[0] > batch_size:
            t = t[:batch_size]
        dtype = str(kt.dtype)
        if str(t.dtype) != dtype:
            t = ops.cast(t, dtype)
        out.append(t)
    return out


def _inputs(fn, x, batch_size, seed, input_moments):
    if x is None or (isinstance(x, str) and x == "probe"):
        return [ops.convert_to_tensor(a) for a in _probe(fn, input_moments, batch_size, seed)], "probe"
    if isinstance(x, str):
        raise ValueError(f"Expected 'probe', None or a data sample, got the string {x!r}.")
    return _input_arrays(fn, x, batch_size), "data"


def _auto_batch(fn, lo=8, hi=1024, elements=1 << 17):
    feats = []
    for kt in fn.inputs:
        feats.append(max(int(np.prod([d for d in kt.shape[1:] if d is not None] or [1])), 1))
    return int(np.clip(elements // max(feats), lo, hi))


# -- the replay --------------------------------------------------------------------------------------


class _Replay:
    """One walk over the graph with real tensors; optionally calibrates weighted layers.

    ``record=False`` (calibration whose report nobody reads) skips the statistics and rows of the nodes
    that are not calibrated: less time and no full-size temporaries for them.
    """

    def __init__(self, fn, *, training, calibrate=False, targets=None, signal_variance=1.0, only=None,
                 record=True, prior=None, values=None):
        self.fn = fn
        # id(variable) -> the value it stands for during this replay (the analytic pass's drawn
        # arrays, then the calibrated kernels): calibration writes here and never assigns, so a
        # failure anywhere leaves every variable as it was.
        self.values = {} if values is None else values
        self.training = training
        self.calibrate = calibrate
        self.targets = targets or {}
        self.signal_variance = float(signal_variance)
        self.only = only  # names of rows to calibrate (None: every calibratable layer)
        self.record = record
        self.counts = graph.count_calls(fn)
        self.call_index = {}
        self.stats = {}  # id(KerasTensor) -> _Stats (symbolic ids are stable; values are freed by the walk)
        self.rows = []
        self.trim = HeapTrim(trim_now=True)
        self.factors = {}  # row name -> scale factor applied (a tuple per gate for recurrent layers)
        self.rse = {}  # row name -> relative standard error of its calibrated variance on this batch
        self.prior = prior or {}  # row name -> factor an earlier calibration round applied
        self.widest = 0  # the most elements per example of any node output seen
        self.batch = None
        self.calibrated_ops = set()

    def stats_of(self, v, kt=None, produced=False):
        """Statistics of value `v` of symbolic tensor `kt`.

        Values are recorded when produced (overwriting an earlier call of the same nested model) and looked
        up by their consumers; a value not recorded (a nested model's input) is measured again.
        """
        if not produced and kt is not None:
            hit = self.stats.get(id(kt))
            if hit is not None:
                return hit
        s = _stats(v)
        if produced and kt is not None:
            self.stats[id(kt)] = s
        return s

    def run(self, inputs):
        if self.record:
            for kt, v in zip(self.fn.inputs, tree.flatten(inputs)):
                self.stats_of(v, kt, produced=True)
        return graph.walk(self.fn, inputs, self.visit)

    def visit(self, node, args, kwargs, path):
        self.trim()
        for kt in node.outputs:
            self.widest = max(self.widest, _per_example(kt))
        op = node.operation
        key = id(op)
        k = self.call_index.get(key, 0)
        self.call_index[key] = k + 1
        name = "/".join(path + (op.name,))
        if self.counts.get(key, 1) > 1:
            name += f"#{k}"
        record = self.record
        in_stats = []
        if record:
            sym = tree.flatten((node.arguments.args, node.arguments.kwargs))
            filled = tree.flatten((args, kwargs))
            in_stats = [self.stats_of(v, kt).moments for kt, v in zip(sym, filled)
                        if isinstance(kt, keras.KerasTensor)]
        layer = isinstance(op, keras.layers.Layer)
        act = _fused_activation(op)
        kern = calibration_kernel(op) if layer else None
        cells = _recurrent_cells(op) if layer and kern is None else None
        notes = []
        pre_stats = None
        if self.calibrate and (kern is not None or cells is not None) and self._wants(op, name):
            if kern is not None:
                outs, pre_stats, note = self._calibrated_call(op, name, args, kwargs, kern, act)
            else:
                outs, pre_stats, note = self._calibrated_recurrent(op, name, args, kwargs, cells)
            notes.append(note)
        else:
            with _NoActivation(op, act is not None):
                outs = _call(op, args, kwargs, self.training, self.values)
            if act is not None:
                pre_stats = _stats(outs) if record else None
                outs = act(outs)
            elif cells is not None and record:
                x = _sequence_input(args, kwargs)
                pre_stats = None if x is None else _stats(_gate_inputs(x, cells, self.value))
        if not record:
            if notes:
                self.rows.append(NodeRow(name=name, type=type(op).__name__, inputs=[], outputs=[],
                                         rule="measured", notes=notes, weighted=True))
            return outs
        flat = tree.flatten(outs)
        out_kts = node.outputs if len(node.outputs) == len(flat) else [None] * len(flat)
        out_stats = [self.stats_of(v, kt, produced=True) for v, kt in zip(flat, out_kts)]
        self.rows.append(
            NodeRow(
                name=name,
                type=type(op).__name__,
                inputs=in_stats,
                outputs=[s.moments for s in out_stats],
                rule="measured",
                notes=notes,
                weighted=kern is not None or cells is not None,
                channel=[s.channel() for s in out_stats],
                preactivation=None if pre_stats is None else pre_stats.moments,
            )
        )
        return outs

    def value(self, variable):
        """The value `variable` stands for in this replay."""
        v = self.values.get(id(variable))
        return variable.value if v is None else ops.convert_to_tensor(v, dtype=variable.dtype)

    def _set(self, variable, value):
        self.values[id(variable)] = value

    def _overrides(self, extra):
        return {**self.values, **extra}

    def _wants(self, op, name):
        if id(op) in self.calibrated_ops:
            return False  # a shared layer is calibrated on its first call
        if not getattr(op, "trainable", True):
            return False
        return self.only is None or name in self.only

    def _calibrated_recurrent(self, op, name, args, kwargs, cells):
        """Scale each gate's block of the input kernel so its input contribution x W hits the target.

        AutoInit's recurrent rule targets the input contribution x W to each gate's pre-activation (the
        recurrent blocks are orthogonal and keep their scale). x W is linear in the kernel, so one scale per
        gate (and direction) computed on the layer's own input makes it exact on this batch; the layer is
        then run once with the new kernels.
        """
        target = float(self.targets.get(name, self.signal_variance))
        self.calibrated_ops.add(id(op))
        x = _sequence_input(args, kwargs)
        factors, problems, rse = [], [], 0.0
        if x is not None:
            for cell in cells:
                units = int(cell.units)
                z = _gate_inputs(x, [cell], self.value)
                rse = max(rse, _relative_se(*_example_moments(_as_float(z))))
                gates = int(z.shape[-1]) // units
                var = np.asarray(ops.convert_to_numpy(ops.var(ops.reshape(z, (-1, gates, units)), axis=(0, 2))),
                                 dtype=np.float64)
                del z
                if not np.all(np.isfinite(var) & (var > 0)):
                    problems.append(f"zero or non-finite gate input variance {var.tolist()}")
                    continue
                s = np.sqrt(target / var)
                kernel = cell.kernel
                cols = ops.convert_to_tensor(np.repeat(s, units).astype(_np_dtype(kernel)))
                self._set(kernel, ops.multiply(self.value(kernel), ops.cast(cols, kernel.dtype)))
                factors.extend(float(v) for v in s)
        else:
            problems.append("no sequence input found")
        outs = _call(op, args, kwargs, self.training, self.values)
        pre_stats = _stats(_gate_inputs(x, cells, self.value)) if (self.record and x is not None) else None
        if factors:
            self.factors[name] = _combine(self.prior.get(name), tuple(factors))
            self.rse[name] = rse
            note = (f"calibrated: input kernel x{_fmt(self.factors[name])} per gate (gate input variance -> "
                    f"{target:.4g}, +-{100 * rse:.2g}% on {int(x.shape[0])} examples)")
            if problems:
                note += f" [{'; '.join(problems)}]"
        else:
            note = f"not calibrated ({'; '.join(problems)})"
        return outs, pre_stats, note

    def _calibrated_call(self, op, name, args, kwargs, kern, act):
        kernel, bias = kern
        target = float(self.targets.get(name, self.signal_variance))
        has_bias = bias is not None and bool(np.any(ops.convert_to_numpy(self.value(bias)) != 0))
        c = None
        with _NoActivation(op, act is not None):
            if has_bias and type(op) in _BIAS_SPLIT:
                # Known layers: output = (weighted part u, linear in the kernel) + bias broadcast. Run once
                # with a zero bias (u) and once on the first example with a zero kernel (the bias term c,
                # the same for every example), so no full-size copy of the constant part is made.
                full = _call(op, args, kwargs, self.training, self._overrides({id(bias): ops.zeros_like(bias.value)}))
                first_args, first_kwargs = _first_example(args, kwargs)
                c = tree.flatten(_call(op, first_args, first_kwargs, self.training,
                                       self._overrides({id(kernel): ops.zeros_like(kernel.value)})))[0]
            else:
                full = _call(op, args, kwargs, self.training, self.values)
                if has_bias:
                    # A registered custom layer: its constant part may depend on the input, so split
                    # y = u + c with a second full call at zero kernel.
                    c = tree.flatten(_call(op, args, kwargs, self.training,
                                           self._overrides({id(kernel): ops.zeros_like(kernel.value)})))[0]
        flat = tree.flatten(full)
        struct = full if len(flat) > 1 else None
        u, rest = flat[0], flat[1:]
        del full, flat
        if c is not None and type(op) not in _BIAS_SPLIT:
            u = u - c
        vu, rse, cov, vc = _var_cov(u, c)
        self.rse[name] = rse
        s, how = _solve_scale(vu, cov, vc, target)
        self.calibrated_ops.add(id(op))
        if s is None:
            note = f"not calibrated ({how})"
            pre = u if c is None else u + c
        else:
            # Rescale in the variable's dtype (no float64 or host copy); assigned by the caller once
            # the whole replay succeeded.
            self._set(kernel, ops.multiply(self.value(kernel), ops.cast(s, kernel.dtype)))
            u = u * s  # the unscaled output is freed here, before the bias is added
            pre = u if c is None else u + c
            self.factors[name] = _combine(self.prior.get(name), s)
            note = (f"calibrated: kernel x{_fmt(self.factors[name])} (pre-activation var {vu + 2 * cov + vc:.4g} -> "
                    f"{target:.4g}, +-{100 * rse:.2g}% on {int(u.shape[0])} examples)")
            if how:
                note += f" [{how}]"
        del u, c
        pre_stats = _stats(pre) if (act is not None and self.record) else None
        out0 = act(pre) if act is not None else pre
        del pre
        outs = tree.pack_sequence_as(struct, [out0] + rest) if struct is not None else out0
        return outs, pre_stats, note


def _per_example(kt) -> int:
    n = 1
    for d in tuple(kt.shape)[1:]:
        n *= int(d) if d is not None else 1
    return n


def _combine(prior, s):
    """The total factor of two calibration rounds (elementwise for recurrent tuples)."""
    if prior is None:
        return s
    if isinstance(s, tuple):
        return tuple(float(a) * float(b) for a, b in zip(prior, s))
    return float(prior) * float(s)


def _fmt(factor) -> str:
    if isinstance(factor, tuple):
        return "(" + ", ".join(f"{v:.4g}" for v in factor) + ")"
    return f"{factor:.4g}"


def _np_dtype(variable):
    try:
        return np.dtype(str(variable.dtype))
    except TypeError:
        return np.float32


def _solve_scale(vu, cov, vc, target):
    """s > 0 with Var(s u + c) = s^2 Var(u) + 2 s Cov(u, c) + Var(c) = target, and a reason if inexact."""
    if not (math.isfinite(vu) and vu > 0):
        return None, f"zero or non-finite weighted output variance {vu}"
    if vc == 0.0 and cov == 0.0:
        return math.sqrt(target / vu), ""
    a, b, c0 = vu, 2.0 * cov, vc - target
    disc = b * b - 4.0 * a * c0
    if disc < 0 or c0 >= 0 and b >= 0:
        s = math.sqrt(target / vu)
        return s, f"the bias alone carries variance {vc:.4g} >= target; scaled the weighted part only"
    s = (-b + math.sqrt(disc)) / (2.0 * a)
    if s <= 0:
        return math.sqrt(target / vu), "no positive exact solution; scaled the weighted part only"
    return s, ""


# -- public API -------------------------------------------------------------------------------------


def measure(model, x=None, *, training=True, batch_size=256, seed=None, input_moments=None) -> SignalReport:
    """Measure the mean and variance of every node's output on a batch; change nothing.

    Args:
        model: a built `keras.Model` (Functional, built Sequential, or traceable subclassed model).
        x: a batch of inputs (array, list/dict of arrays, tf.data dataset or iterable: its first
            batch is used). None: a deterministic Gaussian probe with `input_moments`.
        training: run layers in training mode (BatchNormalization uses batch statistics, Dropout is
            active with a fixed, throw-away RNG state).
        batch_size: the probe's batch size; `x` is cut to this many examples.
        seed: the probe's seed (None means 0: the probe is deterministic).
        input_moments: ``(mean, var)`` of the probe (per input or for all). Default ``(0, 1)``.

    Returns:
        A `SignalReport` (``source="measured"``) with one row per call of each layer or op, named like
        the rows of `analyze`. ``row.outputs`` are the measured moments, ``row.channel`` the average
        squared channel mean and average channel variance per output (channels = last axis), and
        ``row.preactivation`` the moments before a fused activation.
    """
    fn = graph.as_functional(model)
    inputs, _ = _inputs(fn, x, batch_size, seed, input_moments)
    replay = _Replay(fn, training=training)
    replay.run(inputs)
    return SignalReport(model.name, replay.rows, assigned=[], source="measured")


def compare(model, x=None, *, training=True, batch_size=256, probe_seed=None, input_moments=None,
            **analyze_kwargs):
    """The analytic report (`autoinit_tf.analyze`) with the measured moments beside the predicted ones.

    The predictions are those of the analytic pass (what `wrap` would leave, drawn with
    ``analyze_kwargs.get("seed")``); the measurements use the model's current weights. So call it on a
    model wrapped with the same ``seed`` (or on a fresh model to see how far its default initialization
    is from the AutoInit signal). When `x` is given and neither ``input_moments`` nor ``data`` is, the
    analytic pass takes its input moments from `x`; otherwise the probe (seed `probe_seed`) and the
    analytic pass share ``input_moments``. Other keyword arguments go to `analyze`.
    """
    from autoinit_tf.autoinit import analyze

    if x is not None and input_moments is None and "data" not in analyze_kwargs:
        analyze_kwargs["data"] = x
    elif input_moments is not None:
        analyze_kwargs["input_moments"] = input_moments
    predicted = analyze(model, **analyze_kwargs)
    measured = measure(model, x, training=training, batch_size=batch_size, seed=probe_seed,
                       input_moments=input_moments)
    return predicted.with_measurement(measured)


def calibrate(model, data="probe", *, report=None, input_moments=None, seed=None, signal_variance=1.0,
              training=True, batch_size=None, targets=None, only=None) -> SignalReport:
    """Rescale each weighted layer's kernel so its realized pre-activation variance hits the target.

    One replay in topological order: at each calibratable layer (see `CALIBRATION_KERNELS`; recurrent
    layers: see the module docstring, their factor is a tuple, one per gate and direction) the layer is
    run on the already-calibrated upstream signal, the kernel is multiplied by ``s`` so that the
    variance of the layer's output *before its fused activation* equals the target exactly on this
    batch (with a nonzero bias, ``s`` solves ``Var(s*Wx + b) = target``), and the scaled output is passed
    on. The kernels are assigned in place at the end, once the whole replay succeeded (a failure leaves
    every variable as it was). Frozen layers are left alone; a layer called several times is
    calibrated on its first call.

    Args:
        model: the model (usually just initialized by the analytic pass).
        data: ``"probe"`` (a Gaussian probe with `input_moments`, data-free) or a batch of real inputs
            (LSUV-style; an array, list/dict of arrays, or a dataset whose first batch is used).
        report: the analytic `SignalReport` of this model: only its weighted rows are calibrated, and it
            gets the scale factors (``report.calibration`` and a note per row) and the realized moments
            (``row.measured``). None: every calibratable layer, and a measured report is returned.
        input_moments, seed: the probe's moments and seed (None: ``(0, 1)`` and 0).
        signal_variance: the target pre-activation variance.
        training: run layers in training mode.
        batch_size: the probe's batch size (None: about 2**17 input elements, between 8 and 1024, grown
            where a calibrated variance is known to worse than `CALIBRATION_RSE`, see
            `_calibration_replay`) or the number of examples of `data` used.
        targets: optional ``{row name: target variance}`` overriding `signal_variance` per layer.
        only: optional set of row names to calibrate (default: the weighted rows of `report`, or every
            calibratable layer when there is no report).

    Returns:
        The report (the given one, updated in place, or a new measured one).
    """
    report, values = calibrated_values(model, data, report=report, input_moments=input_moments, seed=seed,
                                       signal_variance=signal_variance, training=training, batch_size=batch_size,
                                       targets=targets, only=only)
    assign_values(model, values)
    return report


def calibrated_values(model, data="probe", *, report=None, input_moments=None, seed=None, signal_variance=1.0,
                      training=True, batch_size=None, targets=None, only=None, values=None, record=True):
    """`calibrate` without assigning anything: ``(report, values)`` with ``values`` the calibrated
    kernels as ``id(variable) -> value``.

    ``values`` (optional) maps variables to the values they stand for before calibration (`wrap`
    passes the analytic pass's drawn arrays, so calibration runs before anything is assigned); the
    calibrated kernels are written into it. ``record=False`` keeps no per-node statistics and returns
    no report (``report`` must then be None; ``only`` names the rows to calibrate).
    """
    if only is None and report is not None:
        only = {r.name for r in report.rows if r.weighted}
    replay, source = _calibration_replay(model, data, only=only, record=record, input_moments=input_moments,
                                         seed=seed, signal_variance=signal_variance, training=training,
                                         batch_size=batch_size, targets=targets, values=values)
    if not record:
        return None, replay.values
    if report is None:
        out = SignalReport(model.name, replay.rows, assigned=[], source="measured")
        out.calibration = dict(replay.factors)
        out.calibration_error = dict(replay.rse)
        out.calibration_batch = replay.batch
        return out, replay.values
    by_name = {r.name: r for r in replay.rows}
    for row in report.rows:
        got = by_name.get(row.name)
        if got is None:
            continue
        row.measured = list(got.outputs)
        row.channel = got.channel
        row.preactivation = got.preactivation
        for note in got.notes:
            row.notes.append(note + f" on the {source}")
    report.calibration = dict(replay.factors)
    report.calibration_error = dict(replay.rse)
    report.calibration_batch = replay.batch
    report.calibrated_on = source
    return report, replay.values


def assign_values(model, values):
    """Assign ``values`` (``id(variable) -> value``) to the model's variables, after every check passed."""
    for variable in model.variables:
        v = values.get(id(variable))
        if v is not None:
            variable.assign(ops.cast(v, variable.dtype))


def _calibration_replay(model, data, *, only, record, input_moments=None, seed=None, signal_variance=1.0,
                        training=True, batch_size=None, targets=None, values=None):
    """The calibration replay of `calibrate`; ``record=False`` keeps no per-node statistics (for `wrap`
    without a report). Returns the `_Replay` (its ``factors``, ``rse`` and ``batch``) and the source
    ("probe" or "data").

    With an automatically sized probe (``data="probe"``, ``batch_size=None``) the probe grows when a
    calibrated variance is known to worse than `CALIBRATION_RSE` on it (heavy-tailed signals, where a few
    examples carry most of the energy: for per-example energies q the relative standard error of the
    variance is std(q) / (mean(q) sqrt(n))): the replay runs again on about n (rse / _GROWTH_RSE)^2
    examples, refining the kernels already calibrated, while the largest activation stays within
    `_GROWTH_ELEMENTS`. A layer still short of `CALIBRATION_RSE` gets a `CalibrationWarning`.
    """
    fn = graph.as_functional(model)
    probe = data is None or isinstance(data, str)
    grow = probe and batch_size is None
    if batch_size is None:
        batch_size = _auto_batch(fn) if probe else None
    replay = None
    values = {} if values is None else values
    for _ in range(3):  # the first round, then up to two growths (each grown probe re-estimates the RSE)
        inputs, source = _inputs(fn, data, batch_size, seed, input_moments)
        n = int(tree.flatten(inputs)[0].shape[0])
        replay = _Replay(fn, training=training, calibrate=True, targets=targets, signal_variance=signal_variance,
                         only=None if only is None else set(only), record=record,
                         prior=None if replay is None else replay.factors, values=values)
        replay.run(inputs)
        replay.batch = n
        del inputs
        worst = max(replay.rse.values(), default=0.0)
        if not grow or worst <= CALIBRATION_RSE:
            break
        cap = max(n, _GROWTH_ELEMENTS // max(replay.widest, 1))
        want = min(math.ceil(1.1 * n * (worst / _GROWTH_RSE) ** 2), cap)
        if want < 1.25 * n:
            break
        logger.info("autoinit: a calibrated variance is known to +-%.1f%% on %d probe examples; "
                    "calibrating again on %d.", 100 * worst, n, want)
        batch_size = want
    _warn_imprecise(replay, source, grow)
    return replay, source


def _warn_imprecise(replay, source, grew):
    name, rse = max(replay.rse.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if name is None or not rse > CALIBRATION_RSE:
        return
    n = replay.batch
    need = math.ceil(n * (rse / CALIBRATION_RSE) ** 2) if math.isfinite(rse) else None
    where = "probe" if source == "probe" else "data sample"
    limit = " (the automatic probe stops growing there to bound memory)" if grew else ""
    advice = (f"Calibrate on about {need} examples (calibrate(..., batch_size={need})"
              + (", or more real data" if source != "probe" else "") + ")") if need else "Use more examples"
    warnings.warn(
        f"Calibration fixes the variance of '{name}' only to +-{100 * rse:.1f}% (one standard error of a "
        f"variance estimated on the {where} of {n} examples{limit}; the examples' energies at that layer vary "
        f"by {rse * math.sqrt(n):.2g}x their mean), so another batch may land further from the target. "
        f"{advice} for +-{100 * CALIBRATION_RSE:.0f}%.",
        CalibrationWarning,
        stacklevel=4,
    )


