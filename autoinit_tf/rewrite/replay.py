"""Graph index (what a swap rule sees), the swap plan, and the symbolic replay that builds the new model.

The replay follows keras3-field-notes §3 ("manual replay"): new `keras.Input`s with the old batch shape,
dtype and name; the old nodes replayed in topological order with `node.arguments.fill_in`; each op either
kept (same instance, same weights), recreated from its config (when its input shape changed or a recipe
overrides part of its config; weights copied when their shapes still match), replaced by what a rule
returns (a layer, an op, or a callable building a sub-graph), or removed (its first input passes
through). Results are cached by ``id(op)`` so shared layers stay shared; nested models are rebuilt
inside (or kept when nothing inside them changes).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import keras
from keras import tree

from autoinit_tf.graph import as_functional, is_model, topo_nodes, walk

logger = logging.getLogger("autoinit_tf.rewrite")

__all__ = ["NodeInfo", "GraphIndex", "SwapPlan", "PlanEntry", "SwapError", "SwapWarning", "replay"]


class SwapError(ValueError):
    """A swap is unknown, badly specified, or cannot apply to a matched node."""


class SwapWarning(UserWarning):
    """A swap recipe matched nothing."""


# --------------------------------------------------------------------------------------------------
# What a rule sees
# --------------------------------------------------------------------------------------------------
class NodeInfo:
    """One call of an op inside a (possibly nested) functional graph, as seen by `SwapRule.match`.

    Attributes: ``node`` (the Keras Node), ``op`` (its layer or raw op), ``inputs`` / ``outputs`` (flat
    lists of KerasTensors), ``path`` (names of the enclosing nested models), ``model`` (the functional
    graph holding the node), ``level`` (longest path from the graph's inputs). ``producers`` and
    ``consumers`` give the neighbouring `NodeInfo`s inside the same graph.
    """

    def __init__(self, index, fn, node, path):
        self._index = index
        self.model = fn
        self.node = node
        self.op = node.operation
        self.inputs = list(node.input_tensors)
        self.outputs = list(node.outputs)
        self.path = tuple(path)
        self.level = 0

    @property
    def name(self):
        return self.op.name

    @property
    def label(self):
        """Human name of the node: ``outer/inner/op`` plus ``[call i]`` for shared ops."""
        base = "/".join(self.path + (self.op.name,))
        calls = self._index.calls_of(self.model, self.op)
        if len(calls) > 1:
            base += f"[call {calls.index(self)}]"
        return base

    @property
    def input_shapes(self):
        return [tuple(t.shape) for t in self.inputs]

    @property
    def output_shapes(self):
        return [tuple(t.shape) for t in self.outputs]

    @property
    def producers(self):
        """One entry per input tensor: the producing `NodeInfo` (None for a model input)."""
        return [self._index.producer(self.model, t) for t in self.inputs]

    @property
    def consumers(self):
        """The `NodeInfo`s that take any output of this node (inside the same graph)."""
        return self._index.consumers(self.model, self)

    @property
    def is_model_output(self):
        return any(id(t) in self._index.output_ids(self.model) for t in self.outputs)

    @property
    def shared(self):
        """True when the op is called more than once in this graph."""
        return len(self._index.calls_of(self.model, self.op)) > 1

    def __repr__(self):
        return f"<NodeInfo {self.label} ({type(self.op).__name__})>"


class GraphIndex:
    """Every node of a model (nested graphs included, each once) with producer/consumer maps."""

    def __init__(self, model):
        self.model = model
        self.fn = as_functional(model)
        self.nodes = []  # NodeInfo in topological order, nested graphs expanded at their first call
        self._by_fn = {}  # id(fn) -> dict
        self.names = set()
        self._visit(self.fn, (), set())

    def _visit(self, fn, path, seen):
        tables = {"producer": {}, "consumers": {}, "calls": {}, "outputs": {id(t) for t in fn.outputs}}
        self._by_fn[id(fn)] = tables
        self.names.add(fn.name)
        for node in topo_nodes(fn):
            op = node.operation
            if op is None:
                continue
            self.names.add(op.name)
            if node.is_input:
                continue
            info = NodeInfo(self, fn, node, path)
            levels = [tables["producer"][id(t)].level + 1 for t in node.input_tensors if id(t) in tables["producer"]]
            info.level = max(levels, default=1)
            for t in node.outputs:
                tables["producer"][id(t)] = info
            for t in node.input_tensors:
                tables["consumers"].setdefault(id(t), []).append(info)
            tables["calls"].setdefault(id(op), []).append(info)
            if is_model(op):
                inner = as_functional(op)
                if id(inner) not in seen:
                    seen.add(id(inner))
                    self._visit(inner, path + (op.name,), seen)
            else:
                self.nodes.append(info)

    def tables(self, fn):
        return self._by_fn[id(fn)]

    def producer(self, fn, tensor):
        return self._by_fn[id(fn)]["producer"].get(id(tensor))

    def consumers(self, fn, info):
        cons = self._by_fn[id(fn)]["consumers"]
        out, seen = [], set()
        for t in info.outputs:
            for c in cons.get(id(t), []):
                if id(c) not in seen:
                    seen.add(id(c))
                    out.append(c)
        return out

    def calls_of(self, fn, op):
        return self._by_fn[id(fn)]["calls"].get(id(op), [])

    def output_ids(self, fn):
        return self._by_fn[id(fn)]["outputs"]


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
class PlanEntry:
    """One change: a node replaced or removed, or an op's config overridden (recreated)."""

    def __init__(self, recipe, kind, target, description, *, info=None, op=None, build=None, changes=None,
                 creates=(), removes=()):
        self.recipe = recipe  # recipe name (str)
        self.kind = kind  # "replace" | "remove" | "override"
        self.target = target  # label of the node (or op) changed
        self.description = description
        self.info = info
        self.op = op if op is not None else (info.op if info is not None else None)
        self.build = build  # replace: build(args, kwargs, ctx) -> outputs
        self.changes = dict(changes or {})  # override: config changes
        self.creates = list(creates)  # [(name, class name)] of the new layers this entry adds
        self.removes = list(removes)  # names of layers that leave the model

    def __str__(self):
        return f"[{self.recipe}] {self.kind:<8} {self.target}: {self.description}"


class SwapPlan:
    """What `rewrite` will do: every match and its replacement (printable; nothing is built)."""

    def __init__(self, model_name, recipes):
        self.model_name = model_name
        self.recipes = list(recipes)
        self.entries = []
        self.unmatched = []  # recipe names that matched nothing
        self._claimed = {}  # id(node) -> entry
        self._overrides = {}  # id(op) -> entry

    # -- building the plan (used by recipes) --
    def claim(self, entry):
        if entry.info is None:
            raise ValueError("replace/remove entries need a node")
        key = id(entry.info.node)
        if key in self._claimed:
            other = self._claimed[key]
            raise SwapError(
                f"swaps '{other.recipe}' and '{entry.recipe}' both change node '{entry.target}'; apply them "
                "in two rewrite calls or drop one."
            )
        self._claimed[key] = entry
        self.entries.append(entry)
        return entry

    def override(self, recipe, op, changes, description, target=None):
        key = id(op)
        if key in self._overrides:
            entry = self._overrides[key]
            for k, v in changes.items():
                if k in entry.changes and entry.changes[k] != v:
                    raise SwapError(
                        f"swaps '{entry.recipe}' and '{recipe}' set '{k}' of '{op.name}' to "
                        f"{entry.changes[k]!r} and {v!r}."
                    )
            entry.changes.update(changes)
            entry.description += f"; {description}"
            return entry
        entry = PlanEntry(recipe, "override", target or op.name, description, op=op, changes=changes)
        self._overrides[key] = entry
        self.entries.append(entry)
        return entry

    def claimed(self, info_or_node):
        return self._claimed.get(id(getattr(info_or_node, "node", info_or_node)))

    def overrides(self):
        return {k: e.changes for k, e in self._overrides.items()}

    # -- reading --
    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def __bool__(self):
        return True

    @property
    def new_layers(self):
        return [c for e in self.entries for c in e.creates]

    @property
    def removed_layers(self):
        return [n for e in self.entries for n in e.removes]

    def __str__(self):
        lines = [f"Swap plan for model '{self.model_name}': {len(self.entries)} change(s) from "
                 f"{len(self.recipes)} swap(s)"]
        for e in self.entries:
            lines.append("  " + str(e))
        if self.unmatched:
            lines.append("  matched nothing: " + ", ".join(self.unmatched))
        return "\n".join(lines)

    __repr__ = __str__


def unique_name(base, taken):
    """`base`, or `base_1`, `base_2`, ... whichever is not in `taken` (and reserve it)."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


# --------------------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------------------
def _same_specs(new_tensors, old_tensors):
    if len(new_tensors) != len(old_tensors):
        return False
    for n, o in zip(new_tensors, old_tensors):
        if not hasattr(n, "shape") or tuple(n.shape) != tuple(o.shape) or n.dtype != o.dtype:
            return False
    return True


class ReplayContext:
    """Per-rewrite state handed to build functions: op choice, caches, weight copies."""

    def __init__(self, plan, index):
        self.plan = plan
        self.index = index
        self.overrides = plan.overrides()
        self.recreated = {}  # id(old op) -> new layer
        self.kept = set()  # id(op) of ops kept as the same instance
        self.copy_pairs = []  # (old, new)
        self.cache = {}
        self.models = {}
        self.side_inputs = {}  # name -> a new model input a replacement needs (bn->darbn's noise mask)

    def side_input(self, name, shape, dtype="float32"):
        """A new input of the rewritten model (created once per name, appended after the original inputs)."""
        if name not in self.side_inputs:
            taken = set(self.index.names)
            if name in taken:
                raise SwapError(f"the rewritten model needs a new input '{name}', but a layer of the model already "
                                "has that name.")
            self.side_inputs[name] = keras.Input(shape=tuple(shape), dtype=dtype, name=name)
        return self.side_inputs[name]

    def cached(self, key, factory):
        """A value built once per key (use ``("name", id(op))`` keys so shared layers stay shared)."""
        if key not in self.cache:
            self.cache[key] = factory()
        return self.cache[key]

    def _recreate(self, op, changes):
        if id(op) not in self.recreated:
            config = {**op.get_config(), **changes}
            try:
                new = type(op).from_config(config)
            except Exception as exc:  # noqa: BLE001
                raise SwapError(f"cannot recreate '{op.name}' ({type(op).__name__}) from its config: {exc}") from exc
            self.recreated[id(op)] = new
            self.copy_pairs.append((op, new))
        return self.recreated[id(op)]

    def op_for(self, info_or_node, args, kwargs=None):
        """The op to call for this node: the same instance, or a recreated one (overrides / new shapes)."""
        node = getattr(info_or_node, "node", info_or_node)
        op = node.operation
        new_tensors = [t for t in tree.flatten((args, kwargs or {})) if isinstance(t, keras.KerasTensor)]
        if not isinstance(op, keras.layers.Layer):
            return op  # raw ops hold no weights or build state: reuse for any shape
        if id(op) in self.overrides:
            return self._recreate(op, self.overrides[id(op)])
        if id(op) in self.recreated:
            return self.recreated[id(op)]
        if _same_specs(new_tensors, node.input_tensors):
            self.kept.add(id(op))
            return op
        if id(op) in self.kept:
            raise SwapError(
                f"shared layer '{op.name}' is called with unchanged input shapes in one place and changed "
                "ones in another; it cannot stay shared. Rewrite with a recipe that changes all its calls."
            )
        return self._recreate(op, {})

    def copy_weights(self):
        for old, new in self.copy_pairs:
            ow, nw = old.get_weights(), new.get_weights()
            if ow and len(ow) == len(nw) and all(a.shape == b.shape for a, b in zip(ow, nw)):
                new.set_weights(ow)
                logger.debug("rewrite: recreated '%s' keeps its weights", new.name)
            else:
                logger.debug("rewrite: recreated '%s' has fresh weights (shapes changed)", new.name)


def _has_changes(fn, plan):
    """True when some plan entry touches a node or op inside `fn` (recursively)."""
    ids = set()
    for node in topo_nodes(fn):
        op = node.operation
        if op is None or node.is_input:
            continue
        ids.add(id(node))
        ids.add(("op", id(op)))
        if is_model(op) and _has_changes(as_functional(op), plan):
            return True
    for e in plan.entries:
        if e.info is not None and id(e.info.node) in ids:
            return True
        if e.kind == "override" and ("op", id(e.op)) in ids:
            return True
    return False


def _replay_graph(fn, new_inputs, ctx):
    """Replay `fn` symbolically on `new_inputs` (one `graph.walk`, this module's visitor)."""

    def visit(node, args, kwargs, site):
        op = node.operation
        entry = ctx.plan.claimed(node)
        if entry is not None and entry.kind == "remove":
            flat = [t for t in tree.flatten(args) if isinstance(t, keras.KerasTensor)]
            outs = [flat[0]]
        elif entry is not None:
            outs = entry.build(args, kwargs, ctx)
        else:
            layer = ctx.op_for(node, args, kwargs)
            try:
                outs = layer(*args, **kwargs)
            except SwapError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise SwapError(
                    f"rebuilding '{op.name}' ({type(op).__name__}) on its new inputs failed: {exc}"
                ) from exc
        return _checked(op, node, outs)

    def on_model(node, args, kwargs, site, descend):
        entry = ctx.plan.claimed(node)
        if entry is not None:
            return visit(node, args, kwargs, site)
        return _checked(node.operation, node, _replay_model_call(node, args, kwargs, ctx, descend))

    return walk(fn, new_inputs, visit, on_model=on_model)


def _checked(op, node, outs):
    outs = tree.flatten(outs)
    if len(outs) != len(node.outputs):
        raise SwapError(
            f"the replacement of '{op.name}' produced {len(outs)} outputs where the original has "
            f"{len(node.outputs)}."
        )
    return outs


def _replay_model_call(node, args, kwargs, ctx, descend):
    op = node.operation
    inner = as_functional(op)
    flat_args = [t for t in tree.flatten(args[0]) if isinstance(t, keras.KerasTensor)]
    if id(op) not in ctx.models:
        if not _has_changes(inner, ctx.plan) and _same_specs(flat_args, inner.inputs):
            ctx.models[id(op)] = op
        else:
            new_inputs = [
                keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=kt._keras_history[0].name)
                for t, kt in zip(flat_args, inner.inputs)
            ]
            outs = descend(new_inputs)
            ctx.models[id(op)] = keras.Model(
                tree.pack_sequence_as(inner._inputs_struct, new_inputs), outs, name=op.name
            )
    return ctx.models[id(op)](*args, **kwargs)


@contextlib.contextmanager
def build_scope(model):
    """Enter the model's tf.distribute strategy scope when it has one and none is active."""
    if keras.backend.backend() != "tensorflow":
        yield  # keras.distribution (JAX) is global: layers created now follow it
        return
    import tensorflow as tf

    strategy = getattr(model, "_distribute_strategy", None)
    if tf.distribute.has_strategy() or strategy is None or strategy is tf.distribute.get_strategy():
        yield
        return
    with strategy.scope():
        yield


def _recompile(old, new):
    if not getattr(old, "compiled", False) or getattr(old, "optimizer", None) is None:
        return
    try:
        config = old.get_compile_config()
    except Exception:  # noqa: BLE001
        config = None
    if config:
        try:
            new.compile_from_config(config)
            return
        except Exception as exc:  # noqa: BLE001 - fall back to the live objects
            logger.debug("compile_from_config failed (%s); compiling from the live objects", exc)
    opt = old.optimizer
    kwargs = {"optimizer": type(opt).from_config(opt.get_config())}
    cc = getattr(old, "_compile_config", None)
    cfg = getattr(cc, "config", None) or {}
    for k in ("loss", "loss_weights", "metrics", "weighted_metrics", "run_eagerly", "steps_per_execution",
              "jit_compile", "auto_scale_loss"):
        if k in cfg:
            kwargs[k] = cfg[k]
    if "loss" not in kwargs:
        kwargs["loss"] = getattr(old, "loss", None)
    new.compile(**kwargs)


def replay(model, plan, index):
    """Build the rewritten model described by `plan` (the input model is not modified)."""
    fn = index.fn
    ctx = ReplayContext(plan, index)
    with build_scope(model):
        new_inputs = []
        for kt in fn.inputs:
            layer = kt._keras_history[0]
            new_inputs.append(
                keras.Input(batch_shape=tuple(kt.shape), dtype=kt.dtype, sparse=bool(getattr(kt, "sparse", False)),
                            name=layer.name)
            )
        outs = _replay_graph(fn, new_inputs, ctx)
        struct = tree.pack_sequence_as(fn._inputs_struct, new_inputs)
        if ctx.side_inputs:  # inputs a replacement added: after the original ones
            if isinstance(struct, dict):
                struct = {**struct, **ctx.side_inputs}
            else:
                struct = (list(struct) if isinstance(struct, (list, tuple)) else [struct]) + list(ctx.side_inputs.values())
        new = keras.Model(struct, outs, name=model.name)
        ctx.copy_weights()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _recompile(model, new)
    return new
