"""The AutoInit pass: walk the graph with `Moments`, let each rule choose weight scales, assign.

For every weighted layer the rule draws weights whose variance makes the layer's pre-activation
output have mean ~0 and variance `signal_variance` given the predicted second moment of its input
(Bingham & Miikkulainen, AutoInit):

    Var(W) = signal_variance / (fan_in_eff * E[x^2]),   E[x^2] = var_in + mean_in^2,

and the outgoing moments are computed from the weights actually drawn. Everything is validated and
computed first; weights are assigned at the very end (`variable.assign`, in place, in the variable's
dtype), so a failure part-way leaves the model untouched.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import keras
import numpy as np
from keras.src import tree

from autoinit_tf import distributions, graph, stability
from autoinit_tf.heap import HeapTrim
from autoinit_tf.moments import Moments, mix
from autoinit_tf.report import NodeRow, SignalReport
from autoinit_tf.rules import registry
from autoinit_tf.rules.registry import RuleContext, UnsupportedLayerError

logger = logging.getLogger("autoinit_tf")

__all__ = ["wrap", "analyze", "FallbackRuleWarning"]


class FallbackRuleWarning(UserWarning):
    """A layer had no registered rule; its output moments were measured on a probe instead."""


_warned_classes: set = set()


def _load_builtin_rules():
    # Importing the rule modules registers them.
    from autoinit_tf.rules import builtin  # noqa: F401


class _Engine:
    def __init__(self, *, signal_variance, distribution, seed, strict, rules, include_frozen, progress=None,
                 keep_drawn=True):
        self.progress = progress
        # keep_drawn=False (analyze): a drawn array is dropped once its layer's last call has been
        # visited, unless another layer of the graph holds the same variable, so analyze's memory does
        # not grow with the model's weight bytes. wrap keeps every array for its single assignment.
        self.keep_drawn = keep_drawn
        self.owners = None  # variable path -> number of graph ops holding it (keep_drawn=False only)
        self.visit_records = []  # variable paths first recorded during the current visit
        self.done = 0
        self.signal_variance = float(signal_variance)
        self.distribution = distributions.check_distribution(distribution)
        self.seed = seed
        self.strict = strict
        self.rules = dict(rules or {})
        self.include_frozen = include_frozen
        self.pending = {}  # variable path -> (variable, array)
        self.rows = []
        self.fit_inputs = {}  # id(op) -> combined input moments over all calls
        self.call_inputs = {}  # id(op) -> list of input-moment lists, one per call
        self.call_index = {}
        self.counts = {}
        self.ordinals = {}

    # -- weight bookkeeping ----------------------------------------------------------------------
    def may_reinit(self, op, variable) -> bool:
        return self.include_frozen or bool(getattr(op, "trainable", True))

    def ordinal(self, op) -> int:
        """The order in which `op` was first visited (stable across passes and model copies)."""
        return self.ordinals.setdefault(id(op), len(self.ordinals))

    def value(self, variable):
        hit = self.pending.get(variable.path)
        if hit is not None:
            return hit[1]
        return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)

    def record(self, op, variable, array):
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(
                f"Rule for '{op.name}' produced shape {array.shape} for {variable.path} of shape "
                f"{tuple(variable.shape)}."
            )
        _check_array_fits(variable, array)
        if variable.path not in self.pending:
            self.visit_records.append(variable.path)
        self.pending[variable.path] = (variable, array)

    # -- the walk ---------------------------------------------------------------------------------
    def run(self, fn, input_moments):
        self.trim = HeapTrim()  # freed per-node temporaries (drawn kernels' float64 blocks) go back to the OS
        self.counts = graph.count_calls(fn)
        if not self.keep_drawn:
            self.owners = {}
            for op in graph.leaf_ops(fn):
                for path in {v.path for v in getattr(op, "weights", ())}:
                    self.owners[path] = self.owners.get(path, 0) + 1
        shared = any(c > 1 for c in self.counts.values())
        self.total = sum(self.counts.values()) * (2 if shared else 1)
        out = self._one_pass(fn, input_moments)
        if shared:
            # Second pass: shared layers fit their weights to the combined moments of all calls.
            for key, calls in self.call_inputs.items():
                if len(calls) > 1:
                    self.fit_inputs[key] = [
                        mix([(1.0, c[i]) for c in calls]) for i in range(len(calls[0]))
                    ]
            self.pending.clear()
            self.rows = []
            self.call_inputs = {}
            out = self._one_pass(fn, input_moments)
        self.probe_values = {}
        return out

    def _one_pass(self, fn, input_moments):
        self.amplification = stability.Amplification(self.signal_variance)
        self.call_index = {}
        self.drawn_by = {}  # id(op) -> variable paths its calls drew so far (keep_drawn=False only)
        self.probe_values = {}  # realized outputs of probed ops, keyed by id(KerasTensor)
        return graph.walk(fn, input_moments, self._visit)

    def _visit(self, node, args, kwargs, path):
        self.trim()
        op = node.operation
        inputs = [a for a in tree.flatten((args, kwargs)) if isinstance(a, Moments)]
        key = id(op)
        self.ordinal(op)
        k = self.call_index.get(key, 0)
        self.call_index[key] = k + 1
        self.call_inputs.setdefault(key, []).append(inputs)
        ctx = RuleContext(op, node, inputs, args, kwargs, self.fit_inputs.get(key), self)
        rule, _ = registry.find_rule(op, self.rules)
        rule_name = getattr(rule, "__name__", type(rule).__name__) if rule is not None else "fallback"
        if rule is None:
            if self.strict:
                raise UnsupportedLayerError(_unsupported_message(op))
            _warn_fallback(op)
            from autoinit_tf.rules.fallback import fallback_rule

            rule = fallback_rule
            ctx.note("fallback rule used (measured on a probe)")
        self.visit_records = []
        outs = rule(ctx)
        if isinstance(outs, Moments):
            outs = [outs]
        outs = list(tree.flatten(outs))
        outs = [_fit_detail(m, kt) for m, kt in zip(outs, node.outputs)] if len(outs) == len(node.outputs) else outs
        for m in outs:
            if not isinstance(m, Moments):
                raise TypeError(f"The rule for '{op.name}' returned {m!r}; rules must return Moments.")
            if not m.is_finite():
                raise FloatingPointError(
                    f"The predicted signal became non-finite at '{op.name}' ({m}). Check the input moments "
                    "and the layer's configuration."
                )
        name = "/".join(path + (op.name,))
        if self.counts.get(key, 1) > 1:
            name += f"#{k}"
        self.amplification.visit(op, node, inputs, name)
        weighted = bool(self.visit_records) or ctx.weight_scale is not None
        if self.owners is not None:
            drawn = self.drawn_by.setdefault(key, [])
            drawn.extend(self.visit_records)
            if k + 1 == self.counts.get(key, 1):  # the op's last call: nobody reads its arrays again
                for p in drawn:
                    if self.owners.get(p, 0) <= 1:
                        self.pending.pop(p, None)
                drawn.clear()
        self.rows.append(
            NodeRow(
                name=name,
                type=type(op).__name__,
                inputs=inputs,
                outputs=outs,
                weight_scale=ctx.weight_scale,
                rule=rule_name,
                notes=ctx.notes,
                weighted=weighted,
            )
        )
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)
        return outs if len(outs) > 1 else outs[0]

    def replace_pending(self, values):
        """Replace drawn arrays by other values (``id(variable) -> value``, e.g. calibrated kernels)."""
        for path, (variable, _) in list(self.pending.items()):
            new = values.get(id(variable))
            if new is not None:
                self.pending[path] = (variable, new)

    def apply(self) -> list:
        """Assign every drawn array; returns the assigned variable paths. Each array is released once
        assigned, so the drawn copies and the variables' new buffers are not all alive at once."""
        paths = sorted(self.pending)
        while self.pending:
            _, (variable, array) = self.pending.popitem()
            if isinstance(array, np.ndarray):
                variable.assign(array.astype(_np_dtype(variable), copy=False))
            else:
                variable.assign(keras.ops.cast(array, variable.dtype))
            del array
        return paths


def _fit_detail(m, kt):
    """Keep per-element / per-channel detail only where it matches the output tensor's shape."""
    if not isinstance(m, Moments):
        return m
    shape = tuple(kt.shape[1:])
    if m.el_mean is not None and tuple(m.el_mean.shape) != shape:
        m = m.per_channel()
    if m.ch_mean is not None and (not shape or shape[-1] != m.channels):
        m = m.pooled()
    return m


def _check_array_fits(variable, array):
    """Refuse a drawn array that the variable's dtype cannot hold (before anything is assigned)."""
    a = np.asarray(array)
    if a.size == 0 or a.dtype.kind != "f":
        return
    dtype = _np_dtype(variable)
    if np.dtype(dtype).kind != "f":
        return
    amax = float(max(a.max(), -a.min()))
    if amax == 0.0:
        return
    distributions.check_representable(amax / 2.0 if np.isfinite(amax) else amax, dtype, where=variable.path)


def _np_dtype(variable):
    try:
        return np.dtype(str(variable.dtype))
    except TypeError:
        return np.float32


def _unsupported_message(op) -> str:
    cls = type(op)
    return (
        f"No propagation rule for layer '{op.name}' ({cls.__module__}.{cls.__name__}). Register one with "
        f"autoinit_tf.register_rule({cls.__name__}, rule) where rule(ctx) returns the output "
        "autoinit_tf.Moments from ctx.inputs (see the README, 'Writing a rule for a custom layer'), or pass "
        "rules={" + cls.__name__ + ": rule} to wrap()."
    )


def _warn_fallback(op):
    cls = type(op)
    if cls in _warned_classes:
        return
    _warned_classes.add(cls)
    warnings.warn(
        _unsupported_message(op)
        + " Its output moments were measured on a small deterministic Gaussian probe instead, and its "
        "weights (if any) were left as they are. strict=True turns this into an error.",
        FallbackRuleWarning,
        stacklevel=4,
    )


# -- input moments -------------------------------------------------------------------------------


def _check_moments(m, where):
    try:
        mean, var = (float(v) for v in m)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a (mean, var) pair of numbers, got {m!r}.") from exc
    if not (math.isfinite(mean) and math.isfinite(var)):
        raise ValueError(f"{where} must be finite, got mean={mean}, var={var}.")
    if var < 0:
        raise ValueError(f"{where}: the variance must be positive, got {var}.")
    if var == 0:
        raise ValueError(
            f"{where}: the input variance is zero, so there is no signal to scale weights against. "
            "Pass the variance of your real inputs (e.g. input_moments=(0.0, 1.0)) or data=..."
        )
    return Moments(mean, var)


def resolve_input_moments(fn, input_moments=None, data=None):
    """One `Moments` per model input (flat, in `fn.inputs` order)."""
    n = len(fn.inputs)
    if input_moments is not None and data is not None:
        raise ValueError("Pass either input_moments or data, not both.")
    if data is not None:
        from autoinit_tf.data_moments import moments_from_data

        return moments_from_data(fn, data)
    if input_moments is None:
        return [Moments(0.0, 1.0)] * n
    if isinstance(input_moments, Moments):
        return [_check_moments(input_moments, "input_moments")] * n
    if isinstance(input_moments, dict):
        names = [kt.name for kt in fn.inputs]
        missing = [k for k in names if k not in input_moments]
        if missing:
            raise ValueError(f"input_moments is missing entries for inputs {missing} (inputs: {names}).")
        return [_check_moments(input_moments[k], f"input_moments[{k!r}]") for k in names]
    items = list(input_moments)
    if len(items) == 2 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in items):
        return [_check_moments(items, "input_moments")] * n
    if len(items) != n:
        raise ValueError(
            f"input_moments has {len(items)} entries but the model has {n} inputs; pass one (mean, var) "
            "pair for all inputs or one per input."
        )
    return [_check_moments(m, f"input_moments[{i}]") for i, m in enumerate(items)]


# -- public API ----------------------------------------------------------------------------------


def _run(model, *, input_moments, data, signal_variance, distribution, seed, strict, rules, include_frozen,
         progress=None, keep_drawn=True, warn_unstable=True):
    _load_builtin_rules()
    fn = graph.as_functional(model)
    if not (isinstance(signal_variance, (int, float)) and math.isfinite(signal_variance) and signal_variance > 0):
        raise ValueError(f"signal_variance must be a positive finite number, got {signal_variance!r}.")
    if rules is not None and not isinstance(rules, dict):
        raise TypeError("rules must be a dict {LayerClass: rule}.")
    moments = resolve_input_moments(fn, input_moments, data)
    engine = _Engine(
        signal_variance=signal_variance,
        distribution=distribution,
        seed=seed,
        strict=strict,
        rules=rules,
        include_frozen=include_frozen,
        progress=progress,
        keep_drawn=keep_drawn,
    )
    engine.input_moments = moments
    engine.run(fn, moments)
    if warn_unstable and engine.amplification.worst[0] > stability.AMPLIFICATION_LIMIT:
        warnings.warn(engine.amplification.message(), stability.UnstableSignalWarning, stacklevel=3)
    return engine


_PASS_OPTIONS = ("input_moments", "data", "signal_variance", "distribution", "seed", "strict", "rules",
                 "include_frozen", "progress")


def _pass_options(scope: dict) -> dict:
    """The analytic-pass options among a public function's arguments."""
    return {name: scope[name] for name in _PASS_OPTIONS}


def analyze(
    model,
    *,
    input_moments=None,
    data=None,
    signal_variance=1.0,
    distribution="truncated_normal",
    seed=None,
    strict=False,
    rules=None,
    include_frozen=False,
    progress=None,
) -> SignalReport:
    """Predict the mean and variance at every node as `wrap` would leave them; change nothing.

    Returns a `SignalReport` (one row per call of each layer or op, in topological order).
    """
    engine = _run(model, **_pass_options(locals()), keep_drawn=False)
    report = SignalReport(model.name, engine.rows, assigned=[])
    report.amplification = engine.amplification.worst[:2]
    return report


def wrap(
    model,
    *,
    input_moments=None,
    data=None,
    signal_variance=1.0,
    distribution="truncated_normal",
    seed=None,
    strict=False,
    rules=None,
    include_frozen=False,
    swaps=None,
    calibrate=None,
    return_report=False,
    progress=None,
):
    """Re-initialize every weight tensor of `model` in place so the signal keeps its scale.

    Args:
        model: a built `keras.Model` (Functional, built Sequential, or a subclassed model whose
            `call` can be traced symbolically).
        input_moments: ``(mean, var)`` of the inputs, one pair for all inputs or one per input
            (list, or dict keyed by input name). Default ``(0, 1)``.
        data: a sample of real inputs (array, dict of arrays, tf.data dataset or iterable of batches)
            to compute the input moments from instead.
        signal_variance: the target variance of every weighted layer's pre-activation output.
        distribution: ``truncated_normal`` | ``untruncated_normal`` | ``uniform`` | ``orthogonal``.
        seed: an int makes the weights depend only on the seed and each layer's place in the graph.
        strict: raise `UnsupportedLayerError` for a layer without a rule instead of warning.
        rules: ``{LayerClass: rule}`` overriding the registry for this call.
        include_frozen: also re-initialize layers with ``trainable=False``.
        swaps: swap recipes applied first (a new model is built; see `autoinit_tf.rewrite`).
        calibrate: ``None``, ``"probe"`` or a data sample: after the analytic pass, rescale each
            weighted layer so its realized output variance hits the target exactly.
        return_report: also return the `SignalReport`.
        progress: optional ``callable(done, total, node_name)`` called after every node of the walk
            (the CLI draws its progress bar with it).

    Returns:
        The same model object (or the rewritten model when `swaps` are given), with new weights.
    """
    t0 = time.perf_counter()
    from autoinit_tf import distribute as _distribute

    _distribute.check_assign_context()  # tf.distribute: assign from cross-replica context only
    seed = _distribute.consensus_seed(seed, model)  # multi-worker: every worker draws the same weights
    if swaps:
        from autoinit_tf.rewrite import rewrite

        model = rewrite(model, swaps=swaps)
    # Calibration is the remedy for an unstable prediction: no warning when it runs.
    engine = _run(model, **_pass_options(locals()), warn_unstable=calibrate is None)
    # Everything is computed before anything is assigned: the analytic arrays, then (with
    # `calibrate`) the calibrated kernels on a replay that reads the drawn arrays in place of the
    # variables. A failure anywhere leaves every variable bit-identical.
    report = SignalReport(model.name, engine.rows, assigned=sorted(engine.pending))
    report.amplification = engine.amplification.worst[:2]
    if calibrate is not None:
        from autoinit_tf.measure import calibrated_values

        # With data=..., the probe takes the data's moments.
        resolved = input_moments if data is None else [(m.mean, m.var) for m in engine.input_moments]
        values = {id(variable): array for variable, array in engine.pending.values()}
        only = {r.name for r in report.rows if r.weighted}
        report, values = calibrated_values(
            model, calibrate, report=report if return_report else None, only=only, values=values,
            record=return_report, input_moments=resolved, seed=seed, signal_variance=signal_variance,
        )
        engine.replace_pending(values)
        del values
    assigned = engine.apply()
    n_assigned = len(assigned)
    logger.info(
        "autoinit: %d weight tensors re-initialized in '%s' (%.2fs).",
        n_assigned,
        model.name,
        time.perf_counter() - t0,
    )
    return (model, report) if return_report else model
