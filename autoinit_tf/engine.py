"""The analytic pass: walk the graph with `Moments`, let each layer's rule choose weight scales.

For every weighted layer the rule draws weights whose variance makes the layer's pre-activation
output have mean ~0 and variance `signal_variance` given the predicted second moment of its input
(Bingham & Miikkulainen, AutoInit):

    Var(W) = signal_variance / (fan_in_eff * E[x^2]),   E[x^2] = var_in + mean_in^2,

and the outgoing moments are computed from the weights actually drawn. Rules only record what they
draw (`AnalyticPass.record`); `AnalyticPass.apply` assigns everything at the end (`variable.assign`,
in place, in the variable's dtype), so a failure part-way leaves the model untouched. A layer called
several times (shared) is fitted to the combined moments of all its calls, in a second pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable
import warnings

import keras
import numpy as np
from keras import tree

from autoinit_tf import declared, distributions, graph, stability, tracing
from autoinit_tf.heap import HeapTrim
from autoinit_tf.inputs import resolve_input_moments, with_constant_inputs
from autoinit_tf.moments import Moments, mix
from autoinit_tf.report import NodeRow
from autoinit_tf.rules import registry
from autoinit_tf.rules.context import RuleContext
from autoinit_tf.rules.builtin import register_builtin_rules
from autoinit_tf.rules.fallback import fallback_rule
from autoinit_tf.rules.registry import UnsupportedLayerError
from autoinit_tf.rules.raw_attention import projections_read
from autoinit_tf.rules.windows import carry as carry_windows
from autoinit_tf.variable_assign import HostAssigner

logger = logging.getLogger("autoinit_tf")

__all__ = ["AnalyticPass", "PassOptions", "FallbackRuleWarning", "run_analytic_pass", "unsupported_message"]


class FallbackRuleWarning(UserWarning):
    """A layer had no registered rule; its output moments were measured on a probe instead."""


_warned_classes: set = set()


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """The options of the analytic pass (the keyword arguments of `analyze` and `wrap`), checked."""

    input_moments: Any = None
    data: Any = None
    signal_variance: float = 1.0
    distribution: str = "truncated_normal"
    seed: int | None = None
    strict: bool = False
    rules: dict | None = None
    include_frozen: bool = False
    progress: Callable | None = None
    bn_gamma: float | None = None
    only: frozenset | None = None  # variable paths the pass may replace (wrap's only=); None: all
    # Rescale each drawn linear kernel so its predicted pre-activation variance is the target for the
    # drawn values (`rules.linear.exact_for_draw`); False: entries exactly as `distribution` draws them
    # (the reference-compatible `AutoInit` class: a uniform kernel stays within its bounds).
    exact_draw: bool = True

    def __post_init__(self):
        sv = self.signal_variance
        if not (isinstance(sv, (int, float)) and math.isfinite(sv) and sv > 0):
            raise ValueError(f"signal_variance must be a positive finite number, got {sv!r}.")
        if self.rules is not None and not isinstance(self.rules, dict):
            raise TypeError("rules must be a dict {LayerClass: rule}.")
        distributions.check_distribution(self.distribution)
        g = self.bn_gamma
        if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
            raise ValueError(f"bn_gamma must be a positive finite number or None, got {g!r}.")


class AnalyticPass:
    """One analytic pass: the walk with `Moments`, the rows, and the arrays the rules drew (``pending``)."""

    def __init__(self, options: PassOptions, keep_drawn=True):
        self.progress = options.progress
        # keep_drawn=False (analyze): a drawn array is dropped once its layer's last call has been
        # visited, unless another layer of the graph holds the same variable (or a raw-op attention reads it
        # later: `raw_attention.projections_read`), so analyze's memory does
        # not grow with the model's weight bytes. wrap keeps every array for its single assignment.
        self.keep_drawn = keep_drawn
        self.owners = None  # variable path -> number of graph ops holding it (keep_drawn=False only)
        self.visit_records = []  # variable paths first recorded during the current visit
        self.done = 0
        self.signal_variance = float(options.signal_variance)
        self.distribution = options.distribution
        self.exact_draw = bool(options.exact_draw)
        self.seed = options.seed
        self.strict = options.strict
        self.rules = dict(options.rules or {})
        self.include_frozen = options.include_frozen
        self.bn_gamma = None if options.bn_gamma is None else float(options.bn_gamma)
        self.only = None if options.only is None else frozenset(options.only)
        self.pending = {}  # variable path -> (variable, array)
        self.drawn_paths = set()  # every path ever recorded (analyze drops arrays from `pending` as it goes)
        self.raw_weights = {}  # path -> traced op whose raw ops read that matrix (no layer of the walk owns it)
        self.rows = []
        self.fit_inputs = {}  # id(op) -> combined input moments over all calls
        self.call_inputs = {}  # id(op) -> list of input-moment lists, one per call
        self.fallback_ops = {}  # id(op) -> op, for the layers measured on a probe (no rule, not traceable)
        self.counts = {}
        self.ordinals = {}
        self.op_state = {}  # id(op) -> dict a rule keeps across the walks of this pass (`RuleContext.state`)
        self.concrete_shapes = {}  # id(tensor) -> shape at the probe's size (`graph.concrete_shapes`)

    # -- weight bookkeeping ----------------------------------------------------------------------
    def _outside_only(self, variable) -> bool:
        return self.only is not None and variable.path not in self.only

    def may_reinit(self, op, variable) -> bool:
        if self._outside_only(variable):
            return False
        return self.include_frozen or bool(getattr(op, "trainable", True))

    def kept_reason(self, op, variable) -> str:
        """Why `may_reinit` refused: the word the rule's note uses ("frozen" or "outside only=")."""
        return "pretrained (outside only=)" if self._outside_only(variable) else "frozen"

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
        self.drawn_paths.add(variable.path)
        if variable.path not in self.pending:
            self.visit_records.append(variable.path)
            if getattr(variable, "trainable", True):
                self.visit_weighted = True  # a weight drawn for the signal (not BN's moving statistics)
        self.pending[variable.path] = (variable, array)

    # -- the walk ---------------------------------------------------------------------------------
    def run(self, fn, input_moments):
        self.trim = HeapTrim()  # freed per-node temporaries (drawn kernels' float64 blocks) go back to the OS
        # Layers without a rule are walked inside when their call traces (`tracing`).
        self.tracer = tracing.CallTracer(self.rules, length=getattr(self, "probe_length", None), moments=True)
        owned = self.tracer.settle(fn)
        # Unknown spatial / time sizes of float inputs (keras-hub's (None, None, 3) images) at the probe's size
        self.concrete_shapes = graph.concrete_shapes(fn, self.tracer.length)
        self.counts = graph.count_calls(fn, expand=self.tracer)
        # path -> traced op whose raw ops use that matrix (no layer of the walk owns it): kept as it is
        self.raw_weights = {path: op for op, view in self.tracer.traced_ops()
                            for path in tracing.unowned_matrices(op, view, owned)}
        if not self.keep_drawn:
            self.owners = {}
            for op in graph.leaf_ops(fn, expand=self.tracer):
                # a raw-op attention reads its projections' drawn kernels after their calls: another holder
                for holder in [op] + projections_read(op):
                    for path in {v.path for v in getattr(holder, "weights", ())}:
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
        self.exact_probes = set()
        self.fn = fn
        # Raw tables a rule drew (`RuleContext.raw_table`, `rules.ops.add_op_rule`) are initialized; the others
        # are kept, said once.
        _warn_unowned({p: op for p, op in self.raw_weights.items() if p not in self.drawn_paths})
        return out

    def untouched(self) -> dict:
        """``{path: reason}`` for every floating-point weight of two or more dimensions (kernels, tables) of
        the model that this pass leaves as it was, each with the reason (wrap's report: ``untouched``);
        integer variables (position ids kept as a weight) are indices, not weights to initialize."""
        owned = {}
        for op in graph.leaf_ops(self.fn, expand=self.tracer):
            for v in getattr(op, "weights", ()):
                owned.setdefault(v.path, op)
        raw = self.raw_weights
        out = {}
        for v in self.fn.weights:
            if len(v.shape) < 2 or "float" not in str(v.dtype) or v.path in self.drawn_paths or v.path in out:
                continue
            op = owned.get(v.path)
            if v.path in raw:
                where = f"raw ops inside '{raw[v.path].name}' ({type(raw[v.path]).__name__})"
                if "bias" in v.path.rsplit("/", 1)[-1]:
                    out[v.path] = f"a bias read by {where}: existing biases are kept"
                else:
                    out[v.path] = (f"used by {where}, not by a layer with a rule (a raw add or an einsum with the "
                                   "signal draws such a weight: this one is read another way, or computed on while "
                                   "tracing)")
            elif op is None:
                out[v.path] = "not used by the model's forward pass (its layer or call is never reached)"
            elif id(op) in self.fallback_ops:
                out[v.path] = f"'{op.name}' has no rule and could not be walked inside (probe fallback)"
            elif not self.may_reinit(op, v):
                out[v.path] = self.kept_reason(op, v)
            elif "bias" in v.path.rsplit("/", 1)[-1]:
                out[v.path] = "a bias: existing biases are kept"
            elif v.path.endswith("reverse_embeddings"):
                out[v.path] = ("the untied output table of a ReversibleEmbedding whose reverse call (the LM head) "
                               "this model never makes")
            else:
                out[v.path] = f"its layer's rule ({type(op).__name__}) keeps it"
        return out

    def _one_pass(self, fn, input_moments):
        self.amplification = stability.Amplification(self.signal_variance)
        # Where the prediction is known not to be exact: rows marked by their rule (`RuleContext.inexact`)
        # taint the values they produce; a weighted layer fed a tainted value (or marked itself) is listed
        # in `inexact` for calibrate="auto", and its own output is clean again (calibration fixes it).
        self.inexact = {}  # row name -> reason
        # A persistent taint (`RuleContext.inexact(..., persistent=True)`: a deviation of shape, not of scale, such
        # as the scale mixture after a per-example gate) passes normalizing and calibrated layers too.
        self.tainted = {}  # id(Moments) -> (Moments, reason, persistent); the object is held so its id stays unique
        self.drawn_by = {}  # id(op) -> variable paths its calls drew so far (keep_drawn=False only)
        self.probe_values = {}  # realized outputs of probed ops, keyed by id(KerasTensor)
        self.exact_probes = set()  # the keys of those drawn from the input's exact distribution
        return graph.walk(fn, input_moments, self._visit, expand=self.tracer)

    def _visit(self, node, args, kwargs, site):
        self.trim()
        op = node.operation
        inputs = [a for a in tree.flatten((args, kwargs)) if isinstance(a, Moments)]
        key = id(op)
        self.ordinal(op)
        k = site.index
        self.call_inputs.setdefault(key, []).append(inputs)
        ctx = RuleContext(op, node, inputs, args, kwargs, self.fit_inputs.get(key), self)
        folded = _folded_constant(op, node, args, kwargs, inputs)
        if folded is not None:
            rule, rule_name = (lambda _ctx: folded), "constant"
        else:
            rule, _ = registry.find_rule(op, self.rules)
            rule_name = getattr(rule, "__name__", type(rule).__name__) if rule is not None else "fallback"
        if rule is None:
            if self.strict:
                raise UnsupportedLayerError(unsupported_message(op))
            _warn_fallback(op, self.tracer.reason(op))
            self.fallback_ops[id(op)] = op
            rule = fallback_rule
            ctx.note("fallback rule used (measured on a probe)")
        self.visit_records = []
        self.visit_weighted = False
        self.visit_inexact = None
        self.visit_persistent = False
        self.visit_output_only = False
        if rule is fallback_rule:
            self.visit_inexact = "no rule: measured on a probe"
        outs = rule(ctx)
        if isinstance(outs, Moments):
            outs = [outs]
        outs = list(tree.flatten(outs))
        outs = [_fit_detail(m, kt) for m, kt in zip(outs, node.outputs)] if len(outs) == len(node.outputs) else outs
        outs = carry_windows(op, inputs, outs)
        for m in outs:
            if not isinstance(m, Moments):
                raise TypeError(f"The rule for '{op.name}' returned {m!r}; rules must return Moments.")
            if not m.is_finite():
                raise FloatingPointError(
                    f"The predicted signal became non-finite at '{op.name}' ({m}). Check the input moments "
                    "and the layer's configuration."
                )
        name = site.name
        self.amplification.visit(op, node, inputs, name)
        weighted = self.visit_weighted or ctx.weight_scale is not None
        self._taint(name, inputs, outs, weighted, bool(registry.spec_for(op).normalizes))
        if self.owners is not None:
            drawn = self.drawn_by.setdefault(key, [])
            drawn.extend(self.visit_records)
            if k + 1 == site.calls:  # the op's last call: nobody reads its arrays again
                for p in drawn:
                    if self.owners.get(p, 0) <= 1:
                        self.pending.pop(p, None)
                drawn.clear()
        self.rows.append(
            NodeRow(
                name=name,
                type=type(op).__name__,
                inputs=_without_element_maps(inputs),
                outputs=_without_element_maps(outs),
                weight_scale=ctx.weight_scale,
                target=ctx.target,
                rule=rule_name,
                notes=ctx.notes,
                weighted=weighted,
            )
        )
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)
        return outs if len(outs) > 1 else outs[0]

    def _taint(self, name, inputs, outs, weighted, normalizes):
        reason = self.visit_inexact and f"{name}: {self.visit_inexact}"
        persistent = reason is not None and self.visit_persistent
        hits = [self.tainted[id(m)] for m in inputs if id(m) in self.tainted]
        if reason is not None and self.visit_output_only:
            # exact weights, estimated output (`RuleContext.estimated_output`): what it feeds is calibrated,
            # the layer itself only when its inputs were estimates too
            if weighted and hits:
                self.inexact[name] = hits[0][1]
            persistent = persistent or any(h[2] for h in hits)
            for m in outs:
                self.tainted[id(m)] = (m, reason, persistent)
            return
        if reason is None:
            lasting = [h for h in hits if h[2]]
            if lasting:
                reason, persistent = lasting[0][1], True
            elif normalizes:
                return  # the layer sets its output's scale itself
            elif hits:
                reason = hits[0][1]
        if reason is None:
            return
        if weighted:
            self.inexact[name] = reason
            if not persistent:
                return  # calibration fixes this layer's scale, and with it what follows
        for m in outs:
            self.tainted[id(m)] = (m, reason, persistent)

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
        host = HostAssigner()
        while self.pending:
            _, (variable, array) = self.pending.popitem()
            if isinstance(array, np.ndarray):
                host.assign(variable, array.astype(_np_dtype(variable), copy=False))
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


def unsupported_message(op) -> str:
    cls = type(op)
    return (
        f"No propagation rule for layer '{op.name}' ({cls.__module__}.{cls.__name__}). Register one with "
        f"autoinit_tf.register_rule({cls.__name__}, rule) where rule(ctx) returns the output "
        "autoinit_tf.Moments from ctx.inputs (see the README, 'Writing a rule for a custom layer'), or pass "
        "rules={" + cls.__name__ + ": rule} to wrap()."
    )


def _warn_fallback(op, trace_failure=None):
    cls = type(op)
    if cls in _warned_classes:
        return
    _warned_classes.add(cls)
    why = (f" Its call() could not be walked inside ({trace_failure})." if trace_failure else "")
    warnings.warn(
        unsupported_message(op) + why
        + " Its output moments were measured on a small deterministic Gaussian probe instead, and its "
        "weights (if any) were left as they are. strict=True turns this into an error.",
        FallbackRuleWarning,
        stacklevel=4,
    )


def _warn_unowned(raw_weights):
    """Traced layers whose own matrices enter raw ops (``x @ self.kernel``) keep those matrices."""
    by_op = {}
    for path, op in raw_weights.items():
        by_op.setdefault(id(op), (op, []))[1].append(path)
    for op, left in by_op.values():
        if type(op) not in _warned_classes:
            _warned_classes.add(type(op))
            warnings.warn(
                f"Layer '{op.name}' ({type(op).__name__}) has no rule and was walked inside; its weights "
                f"{left} are used by raw ops, not by a layer with a rule, so they keep their values. "
                f"Register a rule for {type(op).__name__} (autoinit_tf.register_rule) to initialize them.",
                FallbackRuleWarning,
                stacklevel=4,
            )


# -- the entry point ---------------------------------------------------------------------------------


def _without_element_maps(values):
    """The values a report row keeps: per-element maps (up to 16 MB each) dropped, the per-channel and
    pooled moments kept, so a report of a CNN does not hold every feature map of the pass."""
    return [v.per_channel() if isinstance(v, Moments) and v.el_mean is not None else v for v in values]


def _folded_constant(op, node, args, kwargs, inputs):
    """The outputs of a plain op (not a layer) whose every signal input is a constant (`Moments.const`: a
    mask made from the probe's all-ones padding mask), computed on those values; None otherwise or where
    the op does not run on them. So a causal mask merged with the padding mask reaches the attention that
    reads it as the exact matrix, not as pooled moments."""
    if not inputs or isinstance(op, keras.layers.Layer) or any(getattr(m, "const", None) is None for m in inputs):
        return None

    def value(a):
        return keras.ops.convert_to_tensor(a.const) if isinstance(a, Moments) else a

    try:
        out = op(*tree.map_structure(value, list(args)), **tree.map_structure(value, dict(kwargs)))
        outs = [np.asarray(keras.ops.convert_to_numpy(o)) for o in tree.flatten(out)]
    except Exception:  # noqa: BLE001 - an op that needs its symbolic shapes: the rule handles it
        return None
    if len(outs) != len(node.outputs):
        return None
    return [Moments.constant(o) for o in outs]


def run_analytic_pass(model, options: PassOptions | None = None, *, keep_drawn=True, warn_unstable=True, **kwargs):
    """The analytic pass over `model` (nothing assigned): the `AnalyticPass` holds the rows, the drawn
    arrays (``pending``; ``keep_drawn=False`` drops each once its layer's last call is visited, for
    `analyze`) and the amplification of the signal. ``warn_unstable``: an `UnstableSignalWarning` when
    a deviation would grow past `stability.AMPLIFICATION_LIMIT`. The options are a `PassOptions` or its
    fields as keyword arguments."""
    options = PassOptions(**kwargs) if options is None else options
    register_builtin_rules()
    fn = graph.as_functional(model)
    moments = resolve_input_moments(fn, options.input_moments, options.data)
    if options.data is None and not isinstance(options.input_moments, (dict, list)):
        # masks and segment ids as the probe fills them, unless the caller gave each input its moments
        moments = with_constant_inputs(fn, moments, declared.probe_length(fn))
    engine = AnalyticPass(options, keep_drawn=keep_drawn)
    engine.input_moments = moments
    engine.probe_length = declared.probe_length(fn)
    engine.run(fn, moments)
    gain, where, _ = engine.amplification.worst
    if gain > stability.AMPLIFICATION_LIMIT:
        # A deviation would grow past the limit: no prediction downstream can be trusted exactly.
        for row in engine.rows:
            if row.weighted:
                engine.inexact.setdefault(row.name, f"{where}: a deviation of the variance grows {gain:.1f}x")
    if warn_unstable and engine.amplification.worst[0] > stability.AMPLIFICATION_LIMIT:
        warnings.warn(engine.amplification.message(), stability.UnstableSignalWarning, stacklevel=3)
    return engine
