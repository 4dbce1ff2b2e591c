"""What a propagation rule receives: `RuleContext`, one call of one layer or op in the analytic pass.

A *rule* is a function ``rule(ctx) -> Moments | list[Moments]`` registered for a layer or operation
class (`autoinit_tf.rules.registry`). It reads the incoming moments from ``ctx.inputs`` (one per input
tensor, in call order) and returns the moments of each output. Rules that own weights choose their
scale with ``ctx.draw`` (a fresh tensor of a given variance, recorded for assignment) and read weights
with ``ctx.value``; they never assign anything themselves, so the same rule serves dry runs
(`analyze`) and `wrap`. Everything a rule needs is a public attribute or method of the context.
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf import distributions
from autoinit_tf.execute import DEFAULT_PROBE_LENGTH
from autoinit_tf.moments import Moments
from autoinit_tf.rules.fallback import probe_moments
from autoinit_tf.rules.registry import find_rule

__all__ = ["RuleContext"]


class RuleContext:
    """What a rule sees about one call of one layer or op.

    Attributes:
        op: the layer or operation (also as ``layer``).
        node: the Keras graph node of this call.
        inputs: list of `Moments`, one per input tensor of the call (flattened, call order).
        args, kwargs: the call's arguments with tensors replaced by `Moments` (constants kept).
        fit_inputs: the moments to choose weight scales from; for a layer called several times these
            combine all its calls, else they equal ``inputs``.
        signal_variance: the target variance of every weighted layer's pre-activation output.
        input_shapes, output_shapes: static shapes of the call's tensors (batch dim may be None).
    """

    def __init__(self, op, node, inputs, args, kwargs, fit_inputs, engine, input_shapes=None,
                 output_shapes=None):
        self._input_shapes = input_shapes
        self._output_shapes = output_shapes
        self.op = op
        self.node = node
        self.inputs = inputs
        self.args = args
        self.kwargs = kwargs
        self.fit_inputs = fit_inputs if fit_inputs is not None else inputs
        self._engine = engine
        self.notes: list[str] = []
        self.weight_scale = None
        # the variance this node's output is aimed at where it is not `signal_variance` (a position table
        # added to a projection: a per-position bias of it, `provenance.POSITION_BIAS_STD`)
        self.target = None
        self._drawn: dict[str, np.ndarray] = {}  # variable path -> the array `draw` made (owned here)

    # -- read-only facts -----------------------------------------------------------------------
    @property
    def layer(self):
        return self.op

    @property
    def signal_variance(self) -> float:
        return self._engine.signal_variance

    @property
    def distribution(self) -> str:
        return self._engine.distribution

    @property
    def exact_draw(self) -> bool:
        """Whether drawn linear kernels are rescaled to hit the target for the drawn values."""
        return self._engine.exact_draw

    @property
    def bn_gamma(self) -> float | None:
        """The constant every batch-normalizing layer's gamma is set to (Davis & Frank's revisited BN
        initialization, beta set to 0), or None to keep gamma and beta."""
        return getattr(self._engine, "bn_gamma", None)

    def _shape(self, tensor):
        """The tensor's static shape, its unknown non-batch sizes at the probe's where the pass knows them
        (`graph.concrete_shapes`: images declared (None, None, 3))."""
        known = getattr(self._engine, "concrete_shapes", None)
        return known.get(id(tensor), tuple(tensor.shape)) if known else tuple(tensor.shape)

    @property
    def input_shapes(self):
        if self._input_shapes is not None:
            return self._input_shapes
        return [self._shape(t) for t in self.node.input_tensors]

    @property
    def output_shapes(self):
        if self._output_shapes is not None:
            return self._output_shapes
        return [self._shape(t) for t in self.node.outputs]

    def sub(self, op, inputs=None, input_shapes=None, output_shapes=None, share_notes=True):
        """A context for an inner layer (of a wrapper) sharing this pass; notes flow back here unless
        ``share_notes=False``."""
        inputs = self.inputs if inputs is None else inputs
        child = RuleContext(op, self.node, inputs, self.args, self.kwargs,
                            self.fit_inputs if inputs is self.inputs else inputs, self._engine,
                            input_shapes=input_shapes, output_shapes=output_shapes)
        if share_notes:
            child.notes = self.notes
        return child

    def rule_for(self, op):
        """The rule this pass uses for `op` (the call's ``rules=`` overrides first, then the registry);
        ``None`` when there is none."""
        rule, _ = find_rule(op, self._engine.rules)
        return rule

    @property
    def probe_cache(self):
        """Realized outputs of the ops this pass ran on probes (``id(KerasTensor) -> tensor``), so a
        chain of probed layers sees the real structure of its input; None outside a pass."""
        return getattr(self._engine, "probe_values", None)

    @property
    def exact_probes(self) -> set:
        """The keys of `probe_cache` whose values are samples of the exact distribution the model gives that
        tensor on its declared inputs (a recurrent layer simulated on the rows of the Embedding that feeds it,
        say), not a Gaussian stand-in with the same moments; a rule that realizes such a value adds its key."""
        store = getattr(self._engine, "exact_probes", None)
        return set() if store is None else store

    @property
    def state(self) -> dict:
        """A dict for this op that lives through all walks of the pass (a shared layer's rule may
        record in one call what another call needs; the engine walks twice when a layer is shared)."""
        return self.state_of(self.op)

    def state_of(self, op) -> dict:
        """`state` of another op: a rule leaves there what that op's rule is to do on the next walk (a tied LM
        head asks the normalization before it to scale its output)."""
        store = getattr(self._engine, "op_state", None)
        if store is None:
            return {}
        return store.setdefault(id(op), {})

    def inputs_of(self, op) -> list:
        """The input moments of each call of `op` the walk has made so far, in order (a rule reading a pattern
        across nodes: the tokens an attention's projections read)."""
        return list(getattr(self._engine, "call_inputs", {}).get(id(op), []))

    @property
    def calls(self) -> int:
        """How many times the walk calls this op."""
        return self.calls_of(self.op)

    def calls_of(self, op) -> int:
        """How many times the walk calls `op`."""
        counts = getattr(self._engine, "counts", None) or {}
        return int(counts.get(id(op), 1))

    @property
    def probe_length(self) -> int:
        """The length unknown non-batch dimensions of a probe get: the model's declared sequence length
        (`declared.probe_length`), or `execute.DEFAULT_PROBE_LENGTH` outside a pass."""
        return getattr(self._engine, "probe_length", None) or DEFAULT_PROBE_LENGTH

    @property
    def input(self) -> Moments:
        """The single input's moments (first input for multi-input calls)."""
        return self.inputs[0]

    @property
    def fit_input(self) -> Moments:
        return self.fit_inputs[0]

    # -- weights ---------------------------------------------------------------------------------
    def may_reinit(self, variable, op=None) -> bool:
        """Whether this pass may replace `variable` of this op (or of `op`): frozen layers keep theirs by
        default."""
        return self._engine.may_reinit(self.op if op is None else op, variable)

    def drew(self, variable) -> bool:
        """Whether this call drew (recorded) a new value for `variable`."""
        return variable.path in self._engine.visit_records

    def value(self, variable) -> np.ndarray:
        """The value `variable` will have after this pass (pending assignment or current value)."""
        return self._engine.value(variable)

    def draw(self, variable, var: float, distribution: str | None = None) -> np.ndarray:
        """Draw a new value for `variable` with entry variance `var` and record it for assignment.

        When the variable may not be re-initialized (a frozen layer) its current value is returned
        unchanged and a note is added. Returns the value the variable will hold.
        """
        if not self.may_reinit(variable):
            self.note(f"kept {self._engine.kept_reason(self.op, variable)} weight {variable.path}")
            return self.value(variable)
        dist = distribution or self.distribution
        rng = self.rng(variable)
        arr = distributions.sample(tuple(variable.shape), var, dist, rng)
        self.assign(variable, arr)
        self._drawn[variable.path] = arr
        return arr

    def raw_table(self, value) -> bool:
        """Whether `value` (an argument of this raw op) is a trainable table of two or more dimensions
        that no layer of the walk owns: a traced layer's own weight its ``call`` reads directly
        (``ops.add(x, self.position_embedding)``), so no layer rule draws it."""
        return (isinstance(value, keras.Variable) and len(value.shape) >= 2 and bool(value.trainable)
                and value.path in getattr(self._engine, "raw_weights", {}))

    def rescale(self, variable, factor: float) -> None:
        """Multiply the value `variable` will have by `factor`: in place when it is an array this call's
        `draw` made (no second copy of a large kernel), else into a new array."""
        w = self.value(variable)
        f = np.asarray(factor, dtype=w.dtype)
        if self._drawn.get(variable.path) is w:
            w *= f
        else:
            w = (w * f).astype(w.dtype, copy=False)
        self.assign(variable, w)

    def rng(self, variable, salt: str = ""):
        """The generator for `variable`: it depends only on the seed and the variable's place in the
        walk (not on auto-generated names), so identical architectures get identical weights."""
        prefix = getattr(self.op, "path", None) or self.op.name
        path = variable.path
        local = path[len(prefix) + 1 :] if path.startswith(prefix + "/") else path.rsplit("/", 2)[-2:]
        local = local if isinstance(local, str) else "/".join(local)
        key = f"{self._engine.ordinal(self.op)}/{local}{salt}"
        return distributions.rng_for(self._engine.seed, key)

    def assign(self, variable, value) -> None:
        """Record `value` for `variable` (applied by the engine at the end, if at all)."""
        if not self.may_reinit(variable):
            self.note(f"kept {self._engine.kept_reason(self.op, variable)} weight {variable.path}")
            return
        self._engine.record(self.op, variable, np.asarray(value))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- helpers ---------------------------------------------------------------------------------
    def probe(self, *args, **kwargs):
        """Run the op on a deterministic Gaussian probe with the incoming moments (see fallback); the
        result is an estimate, so the call is marked `inexact`."""
        self.inexact("measured on a probe")
        return probe_moments(self, *args, **kwargs)

    def inexact(self, reason: str, persistent: bool = False) -> None:
        """Say that this call's predicted output is known not to be exact (a probe estimate, an
        attention mask the rule does not model...). ``wrap(calibrate="auto")`` then calibrates the
        weighted layers it affects on a probe. ``persistent``: the deviation is one of the signal's shape,
        not its scale (a per-example gate makes it a scale mixture), so neither a normalizing layer nor
        a calibrated one removes it: every weighted layer downstream is calibrated."""
        if getattr(self._engine, "visit_inexact", None) is None and hasattr(self._engine, "visit_inexact"):
            self._engine.visit_inexact = reason
        if persistent and hasattr(self._engine, "visit_persistent"):
            self._engine.visit_persistent = True

    def estimated_output(self, reason: str) -> None:
        """Say that this call's weights are exact for its inputs (drawn from their moments) but its
        predicted output is an estimate (a recurrent layer's state, simulated on a probe): the weighted
        layers it feeds are calibrated by ``calibrate="auto"``, this one only when its inputs were
        estimates too."""
        self.inexact(reason)
        if hasattr(self._engine, "visit_output_only"):
            self._engine.visit_output_only = True
