"""Which layer calls the passes walk inside: layers without a rule whose ``call`` replays on symbolic
tensors (`graph.trace_call`).

keras-hub and keras.applications models are made of subclassed blocks (TransformerEncoder, a ViT
layer, a decoder block) built from Keras layers and ``keras.ops``. A block without a rule of its own is
traced: its ``call`` replayed on fresh symbolic inputs gives a functional view whose nodes are the
block's own sublayer calls and raw ops, and the walk goes inside, so every inner Dense, EinsumDense,
MultiHeadAttention, normalization or embedding gets its own rule and its own weights. Traces are
recursive (a traced block's inner blocks are traced in turn) and cached per call node and shape for the
life of the model, so a NAS loop calling `wrap` thousands of times traces each block once.

A call is first traced with the shapes it was made with (unknown batch and sequence dimensions kept
unknown). A call that needs concrete shapes (``ops.arange(ops.shape(x)[1])``, a causal mask built from
``ops.shape(x)[0]``) is traced again at concrete shapes: the shapes of the real tensors a replay
calls it with, or, for the analytic pass (whose values are moments), batch `RETRY_BATCH` and the model's
probe length. If that fails too the layer keeps the probe fallback, and `reason(op)` says why for the
warning.
"""

from __future__ import annotations

import weakref

import keras
from keras import tree

from autoinit_tf import graph
from autoinit_tf.execute import DEFAULT_PROBE_LENGTH
from autoinit_tf.moments import Moments
from autoinit_tf.rules import registry

__all__ = ["CallTracer", "weights_read_outside", "unowned_matrices", "RETRY_BATCH"]

#: Batch size of a trace at concrete shapes for the analytic pass (2, not 1: nothing squeezes it away).
RETRY_BATCH = 2

# node -> {shapes (None: as recorded): view, or the TraceError message}; lives as long as the model's nodes.
_TRACES = weakref.WeakKeyDictionary()


def _traced(node, shapes):
    per_node = _TRACES.setdefault(node, {})
    if shapes not in per_node:
        try:
            per_node[shapes] = graph.trace_call(node, shapes=shapes)
        except graph.TraceError as exc:
            per_node[shapes] = str(exc)
    return per_node[shapes]


def _concrete_shapes(node, values, length):
    """Shapes for a trace at concrete shapes: those of the real `values`, else batch `RETRY_BATCH` and
    `length` for every unknown dimension."""
    tensors = node.arguments.keras_tensors
    if values is not None and all(hasattr(v, "shape") and not isinstance(v, Moments) for v in values):
        return tuple(tuple(int(d) for d in v.shape) for v in values)
    return tuple(tuple((RETRY_BATCH if i == 0 else length) if d is None else int(d) for i, d in enumerate(kt.shape))
                 for kt in tensors)


class CallTracer:
    """``expand`` for `graph.walk`: the functional view of a call to walk inside, or None.

    Args:
        rules: the pass's ``rules=`` overrides (a layer with a rule there or in the registry is never traced).
        length: the length unknown dimensions get when a call must be traced at concrete shapes and no
            real tensors give them (the model's probe length).
    """

    def __init__(self, rules=None, length=None, moments=False):
        self.rules = rules or {}
        self.moments = moments  # the analytic pass: values are Moments
        self.length = length or DEFAULT_PROBE_LENGTH
        self.reasons = {}  # id(op) -> why its call could not be traced
        self._ops = {}  # id(node) -> (op, view) for the traced calls
        self.refused = {}  # id(op) -> reason: kept whole although its call traces

    def wants(self, op) -> bool:
        """Layers (not raw ops, not models) with no rule."""
        if not isinstance(op, keras.layers.Layer) or graph.is_model(op) or isinstance(op, keras.layers.InputLayer):
            return False
        rule, _ = registry.find_rule(op, self.rules)
        return rule is None

    def __call__(self, node, values=None):
        op = node.operation
        if id(op) in self.refused or not self.wants(op):
            return None
        view = _traced(node, None)
        if isinstance(view, str):
            first = view
            view = _traced(node, _concrete_shapes(node, values, self.length))
            if isinstance(view, str):
                self.reasons[id(op)] = first if view == first else f"{first}; at concrete shapes: {view}"
                return None
        self._ops[id(node)] = (op, view)
        return view

    def settle(self, fn):
        """Trace the calls of `fn` and refuse the traces that would read stale weights: a traced call
        that computed eagerly with weights a layer of the walk owns (a tied ``ops.transpose(other.kernel)``)
        keeps its layer whole, so passes that change those weights see the change. Returns the paths of
        the weights the walk's layers own."""
        while True:
            self._ops = {}
            owned = {v.path for op in graph.leaf_ops(fn, expand=self) for v in getattr(op, "weights", ())}
            stale = [(op, sorted(weights_read_outside(op, view) & owned)) for op, view in self.traced_ops()]
            stale = [(op, paths) for op, paths in stale if paths]
            if not stale:
                return owned
            for op, paths in stale:
                self.refuse(op, f"its call computes with {paths} outside the symbolic graph, where the "
                                "passes cannot see their new values")

    def refuse(self, op, reason):
        """Keep `op` whole from now on (its calls are not walked inside), with the reason for the warning."""
        self.refused[id(op)] = reason
        self.reasons[id(op)] = reason
        self._ops = {k: (o, v) for k, (o, v) in self._ops.items() if o is not op}

    def constant(self, tensor):
        """The value a lifted constant input (`graph.lifted_constants`) or a constant output of a traced call
        (`graph.with_constant_outputs`) has in this pass: its moments in
        the analytic pass (values are `Moments`), the tensor itself in a replay."""
        if self.moments:
            import numpy as np

            a = np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float64)
            return Moments(float(a.mean()), float(a.var())) if a.size else Moments(0.0, 0.0)
        return tensor

    def traced_ops(self):
        """(op, view) for every call traced in this pass."""
        return list(self._ops.values())

    def reason(self, op):
        """Why `op`'s call could not be traced (None when it was, or was not tried)."""
        return self.reasons.get(id(op))


def _direct_variables(view):
    """Paths of the variables that appear as arguments of the view's nodes (``x * self.scale``): the
    passes read those live."""
    paths = set()
    for node in graph.topo_nodes(view):
        if node.operation is None:
            continue
        for leaf in tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if isinstance(leaf, keras.Variable):
                paths.add(leaf.path)
    return paths


def weights_read_outside(op, view):
    """Paths of `op`'s weights that no layer inside its traced `view` owns and no node of the view takes
    as an argument: the call computed with them eagerly while tracing (``ops.transpose(self.kernel)``,
    a sublayer called on constants), so the view holds their values at trace time as constants."""
    inner = {v.path for inner_op in graph.leaf_ops(view) for v in getattr(inner_op, "weights", ())}
    direct = _direct_variables(view)
    return {v.path for v in getattr(op, "weights", ()) if v.path not in inner and v.path not in direct}


def unowned_matrices(op, view, owned):
    """Floating-point weights of `op` with two or more dimensions that no layer of the walk owns (`owned`:
    their paths): they enter the traced graph as constants of raw ops (``x @ self.kernel``), so no rule
    re-initializes them. Integer variables (position ids a layer keeps as a weight: keras-hub's CLIP) are
    indices, not weights to initialize."""
    inner = {v.path for inner_op in graph.leaf_ops(view) for v in getattr(inner_op, "weights", ())}
    return [v.path for v in getattr(op, "weights", ())
            if len(v.shape) >= 2 and "float" in str(v.dtype) and v.path not in inner and v.path not in owned]
