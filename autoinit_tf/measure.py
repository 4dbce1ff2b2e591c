"""The measured signal: replay the graph on real tensors, side-effect free, and calibrate on it.

Three entry points share one replay (`graph.walk`, the walker of the analytic pass) in which every
layer runs through ``layer.stateless_call(trainable_values, non_trainable_values, ...)``: the layer
computes with the values it is handed and returns its would-be state updates, which are dropped. So
`measure` leaves every weight, BatchNormalization moving statistic, optimizer slot and seed-generator
(RNG) state exactly as it was, on every backend. Raw ops (``x + y``, ``ops.relu``...) are plain calls.

* `measure(model, x)` -> `SignalReport` whose rows hold the *measured* moments of every node's
  outputs, plus the Signal Propagation Plot quantities (Brock et al. 2021) per output: the average
  squared channel mean and the average channel variance (channels = last axis), and, for layers with
  a fused activation (``Dense(..., activation="relu")``), the pre-activation moments.
* `compare(model, x)` -> the analytic report (`analyze`) with the measured moments beside the
  predicted ones (`SignalReport.with_measurement`).
* `calibrate(model, "probe" | data)` (also ``wrap(..., calibrate=...)``): the same replay, but at each
  weighted layer (in topological order, on the already calibrated upstream signal) the main kernel is
  multiplied by the factor that makes the layer's realized **pre-activation** variance (the output
  before its fused activation; the output itself for layers without one) equal the target exactly on
  the calibration batch (LSUV, Mishkin & Matas 2016; data-free when the batch is a Gaussian probe with
  the model's input moments). The kernel is assigned in place (``variable.assign``); the scaled output
  is re-used downstream without a second call, so the pass is linear in the number of layers.

Statistics are reduced on the backend (float32 for float32 tensors) and only scalars are copied out.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops
from keras.src import tree

from autoinit_tf import graph
from autoinit_tf.moments import Moments
from autoinit_tf.report import NodeRow, SignalReport

__all__ = ["measure", "compare", "calibrate", "calibration_kernel", "CALIBRATION_KERNELS"]

_PROBE_SALT = 0x5EED


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
    tv = [overrides.get(id(v), v.value) for v in op.trainable_variables]
    ntv = [overrides.get(id(v), v.value) for v in op.non_trainable_variables]
    outs, _ = op.stateless_call(tv, ntv, *args, **kwargs)
    return outs


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


def _small(y):
    n = 1
    for d in y.shape:
        n *= int(d)
    return n <= _NUMPY_MAX


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
        if rank == 1:
            cm = ops.mean(y, keepdims=True)
            cv = ops.var(y, keepdims=True)
        else:
            axes = tuple(range(rank - 1))
            cm = ops.mean(y, axis=axes)
            cv = ops.var(y, axis=axes)
        vec = ops.stack([ops.mean(cm), ops.mean(cv), ops.var(cm), ops.mean(ops.square(cm))])
        mean, within, between, msq = (float(v) for v in np.asarray(ops.convert_to_numpy(vec), dtype=np.float64))
    # Equal counts per channel: total variance = mean within-channel variance + variance of means.
    return _Stats(_moments(mean, within + between), msq, within)


def _moments(mean, var):
    if not (math.isfinite(mean) and math.isfinite(var)):
        m = Moments.__new__(Moments)
        m.mean, m.var = float(mean), float(var)
        return m
    return Moments(mean, max(var, 0.0))


def _var_cov(u, c=None):
    """Var(u), and when `c` is given Cov(u, c) and Var(c)."""
    u = ops.convert_to_tensor(u)
    if _small(u):
        a = _np(u).astype(np.float64).reshape(-1)
        if c is None:
            return float(a.var()), 0.0, 0.0
        b = _np(c).astype(np.float64).reshape(-1)
        return float(a.var()), float(np.mean((a - a.mean()) * (b - b.mean()))), float(b.var())
    u = _as_float(u)
    if c is None:
        return float(ops.convert_to_numpy(ops.var(u))), 0.0, 0.0
    c = _as_float(c)
    mu, mc = ops.mean(u), ops.mean(c)
    vec = ops.stack([ops.var(u), ops.mean(u * c) - mu * mc, ops.var(c)])
    vu, cov, vc = (float(v) for v in np.asarray(ops.convert_to_numpy(vec), dtype=np.float64))
    return vu, cov, vc


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
    out = []
    for kt, a in zip(fn.inputs, arrays):
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
    """One walk over the graph with real tensors; optionally calibrates weighted layers."""

    def __init__(self, fn, *, training, calibrate=False, targets=None, signal_variance=1.0, only=None):
        self.fn = fn
        self.training = training
        self.calibrate = calibrate
        self.targets = targets or {}
        self.signal_variance = float(signal_variance)
        self.only = only  # names of rows to calibrate (None: every calibratable layer)
        self.counts = graph.count_calls(fn)
        self.call_index = {}
        self.stats = {}  # id(KerasTensor) -> _Stats (symbolic ids are stable; values are freed by the walk)
        self.rows = []
        self.factors = {}  # row name -> scale factor applied
        self.calibrated_ops = set()
        self.pending = []  # (variable, new value)

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
        for kt, v in zip(self.fn.inputs, tree.flatten(inputs)):
            self.stats_of(v, kt, produced=True)
        return graph.walk(self.fn, inputs, self.visit)

    def visit(self, node, args, kwargs, path):
        op = node.operation
        key = id(op)
        k = self.call_index.get(key, 0)
        self.call_index[key] = k + 1
        name = "/".join(path + (op.name,))
        if self.counts.get(key, 1) > 1:
            name += f"#{k}"
        sym = tree.flatten((node.arguments.args, node.arguments.kwargs))
        filled = tree.flatten((args, kwargs))
        in_stats = [self.stats_of(v, kt).moments for kt, v in zip(sym, filled) if isinstance(kt, keras.KerasTensor)]
        act = _fused_activation(op)
        kern = calibration_kernel(op) if isinstance(op, keras.layers.Layer) else None
        notes = []
        pre_stats = None
        if self.calibrate and kern is not None and self._wants(op, name):
            outs, pre_stats, note = self._calibrated_call(op, name, args, kwargs, kern, act)
            notes.append(note)
        else:
            with _NoActivation(op, act is not None):
                outs = _call(op, args, kwargs, self.training)
            if act is not None:
                pre_stats = _stats(outs)
                outs = act(outs)
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
                weighted=kern is not None,
                channel=[s.channel() for s in out_stats],
                preactivation=None if pre_stats is None else pre_stats.moments,
            )
        )
        return outs

    def _wants(self, op, name):
        if id(op) in self.calibrated_ops:
            return False  # a shared layer is calibrated on its first call
        if not getattr(op, "trainable", True):
            return False
        return self.only is None or name in self.only

    def _calibrated_call(self, op, name, args, kwargs, kern, act):
        kernel, bias = kern
        target = float(self.targets.get(name, self.signal_variance))
        k_val = kernel.value
        has_bias = bias is not None and bool(np.any(ops.convert_to_numpy(bias.value) != 0))
        with _NoActivation(op, act is not None):
            full = _call(op, args, kwargs, self.training)
            if has_bias:
                const = _call(op, args, kwargs, self.training, {id(kernel): ops.zeros_like(k_val)})
        flat = tree.flatten(full)
        y = flat[0]
        c = tree.flatten(const)[0] if has_bias else None
        u = y - c if has_bias else y
        vu, cov, vc = _var_cov(u, c)
        s, how = _solve_scale(vu, cov, vc, target)
        self.calibrated_ops.add(id(op))
        if s is None:
            note = f"not calibrated ({how})"
            pre = y
        else:
            new_k = ops.convert_to_numpy(k_val).astype(np.float64) * s
            kernel.assign(new_k.astype(_np_dtype(kernel)))
            pre = u * s + c if has_bias else y * s
            self.factors[name] = s
            note = f"calibrated: kernel x{s:.4g} (pre-activation var {vu + 2 * cov + vc:.4g} -> {target:.4g})"
            if how:
                note += f" [{how}]"
        pre_stats = _stats(pre) if act is not None else None
        out0 = act(pre) if act is not None else pre
        flat = [out0] + list(flat[1:])
        outs = tree.pack_sequence_as(full, flat) if len(flat) > 1 else out0
        return outs, pre_stats, note


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
              training=True, batch_size=None, targets=None) -> SignalReport:
    """Rescale each weighted layer's kernel so its realized pre-activation variance hits the target.

    One replay in topological order: at each calibratable layer (see `CALIBRATION_KERNELS`) the layer is
    run on the already-calibrated upstream signal, the kernel is multiplied by ``s`` so that the
    variance of the layer's output *before its fused activation* equals the target exactly on this
    batch (with a nonzero bias, ``s`` solves ``Var(s*Wx + b) = target``), the kernel is assigned in place
    and the scaled output is passed on. Frozen layers are left alone; a layer called several times is
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
        batch_size: the probe's batch size (None: about 2**17 input elements, between 8 and 1024) or
            the number of examples of `data` used.
        targets: optional ``{row name: target variance}`` overriding `signal_variance` per layer.

    Returns:
        The report (the given one, updated in place, or a new measured one).
    """
    fn = graph.as_functional(model)
    if batch_size is None:
        batch_size = _auto_batch(fn) if (data is None or isinstance(data, str)) else None
    inputs, source = _inputs(fn, data, batch_size, seed, input_moments)
    only = None
    if report is not None:
        only = {r.name for r in report.rows if r.weighted}
    replay = _Replay(fn, training=training, calibrate=True, targets=targets, signal_variance=signal_variance,
                     only=only)
    replay.run(inputs)
    if report is None:
        out = SignalReport(model.name, replay.rows, assigned=[], source="measured")
        out.calibration = dict(replay.factors)
        return out
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
    report.calibrated_on = source
    return report
