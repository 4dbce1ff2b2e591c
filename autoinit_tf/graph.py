"""From a Keras model to its functional graph, and the one walker every pass uses.

The walker visits the nodes of a functional graph in topological order (decreasing depth, as Keras'
own `Functional._run_through_graph` does), rebuilds each call's arguments with the values computed so
far (`node.arguments.fill_in`) and asks a `visit` callback for the node's outputs, handing it the
call's `Site` (row name ``outer/inner/op#k``, call index, call count): every pass names its rows and
counts calls the same way because only the walk does it. What the values are (moments for the analytic
pass, real tensors for measurement and calibration, symbolic tensors for rewriting) is the caller's
business. Nested models are walked inside, with their own value table (or handed to ``on_model``).
The walk is iterative over nodes, so depth is no limit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref

import keras
import numpy as np
from keras import tree

__all__ = ["as_functional", "is_model", "topo_nodes", "walk", "Site", "count_calls", "leaf_ops", "GraphError",
           "trace_call", "TraceError", "lifted_constants", "lifted_value", "layer_tree"]


def layer_tree(model, include_self=True) -> list:
    """`model` and every layer inside it, recursively (sublayers of subclassed layers too), each once."""
    flatten = getattr(model, "_flatten_layers", None)  # Keras 3's own recursive traversal
    if flatten is not None:
        return list(flatten(include_self=include_self, recursive=True))
    return ([model] if include_self else []) + list(getattr(model, "layers", []) or [])


class GraphError(TypeError):
    """The model cannot be viewed as a layer graph."""


class TraceError(GraphError):
    """A layer's call could not be replayed on symbolic tensors (the message says why)."""


def is_model(op) -> bool:
    return isinstance(op, keras.Model)


def _subclassed_view(model):
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    shape = None
    if len(shapes) == 1:
        shape = next(iter(shapes.values()))
    message = (
        f"'{model.name}' is a subclassed {type(model).__name__}: it has no layer graph. Supported: "
        "Functional models and built Sequential models. If call() uses only Keras layers and "
        "keras.ops with no data-dependent Python control flow, build a functional view and pass "
        "that instead: inp = keras.Input(shape); view = keras.Model(inp, model.call(inp)) (it shares "
        "the same layers, so wrapping the view initializes the original model)."
    )
    if shape is None or not isinstance(shape, (tuple, list)):
        raise GraphError(message + " (The model has no single recorded input shape to do this for you.)")
    try:
        inp = keras.Input(batch_shape=tuple(shape))
        return keras.Model(inp, model.call(inp), name=f"{model.name}_functional_view")
    except Exception as exc:  # noqa: BLE001 - any failure means: no symbolic view possible
        raise GraphError(message + f" (Tracing call() symbolically failed: {exc})") from exc


def as_functional(model):
    """The functional graph behind `model` (the model itself, a Sequential's inner graph, or a view)."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a keras.Model, got {type(model).__name__}. Build your network as a Keras "
            "Functional or Sequential model first."
        )
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise GraphError(
                f"Sequential model '{model.name}' is not built, so its input shape is unknown. Build it "
                "first with model.build((None, ...)), give its first layer an input shape "
                "(keras.Input(shape=...) as the first entry), or call it once on a batch."
            )
        return fn
    if hasattr(model, "_nodes_by_depth") and getattr(model, "_nodes_by_depth", None) is not None and hasattr(
        model, "_run_through_graph"
    ):
        return model
    return _subclassed_view(model)


def topo_nodes(fn):
    """The nodes of a functional graph in topological order (inputs first)."""
    by_depth = fn._nodes_by_depth
    return [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]


class Site:
    """Where a call happens in the walk, handed to every visitor with the call.

    Attributes:
        path: names of the enclosing nested models, outermost first.
        op: the layer or operation called.
        index: which call of `op` this is in the walk (0, 1, ...; nested models' calls included).
        calls: how many times the walk calls `op` in all.
        name: the row name every pass uses for this call: ``outer/inner/op``, plus ``#index`` when
            `op` is called more than once (``dense#1``).
    """

    __slots__ = ("path", "op", "index", "calls", "label")

    def __init__(self, path, op, index, calls, label=None):
        self.path = path
        self.op = op
        self.index = index
        self.calls = calls
        self.label = label  # a raw op inside a traced call: its stable name there (see `trace_call`)

    @property
    def name(self) -> str:
        name = "/".join(self.path + (self.label or self.op.name,))
        return name + f"#{self.index}" if self.calls > 1 else name

    def __repr__(self):
        return f"<Site {self.name}>"


class _Walk:
    """The call counts of the whole walk (computed once) and the running call index of every op."""

    def __init__(self, fn, visit, on_model, expand=None):
        self.counts = count_calls(fn, expand=expand)
        self.index = {}
        self.visit = visit
        self.on_model = on_model
        self.expand = expand

    def site(self, op, path, label=None):
        key = id(op)
        k = self.index.get(key, 0)
        self.index[key] = k + 1
        return Site(path, op, k, self.counts.get(key, 1), label)


def walk(fn, input_values, visit, *, on_model=None, expand=None):
    """Replay the functional graph `fn` on `input_values` (one per `fn.inputs`, or their structure).

    `visit(node, args, kwargs, site)` returns the node's outputs (a value or a structure with one leaf
    per output tensor); `site` is the call's `Site` (its row name, call index and count). Nested models
    are walked inside, with their own value table, and `visit` is not called for the nested model node
    itself, unless `on_model` is given: then ``on_model(node, args, kwargs, site, descend)`` returns that
    node's outputs, where ``descend(values)`` walks the nested graph on `values` (a visitor may keep a
    nested model whole instead). ``expand(node, values)``, when given, returns a functional view of a
    layer call (`trace_call`) to walk inside instead of visiting the layer, or None; `values` are the
    call's values in ``node.arguments.keras_tensors`` order (the order of the view's inputs), or None
    when only the graph's structure is asked for (`count_calls`, `leaf_ops`). Returns the output values packed
    like the model's outputs.
    """
    return _walk(fn, input_values, (), _Walk(fn, visit, on_model, expand))


def _walk(fn, input_values, path, state):
    flat = tree.flatten(input_values)
    if len(flat) != len(fn.inputs):
        raise ValueError(f"Model '{fn.name}' has {len(fn.inputs)} inputs, got {len(flat)} values.")
    values = {id(kt): v for kt, v in zip(fn.inputs, flat)}
    nodes = topo_nodes(fn)
    labels = _RAW_OP_LABELS.get(fn, {})
    # Drop each value after its last consumer, so replays with real tensors hold only the live ones.
    remaining = {}
    for node in nodes:
        if not node.is_input:
            for x in node.input_tensors:
                remaining[id(x)] = remaining.get(id(x), 0) + 1
    keep = {id(kt) for kt in fn.outputs}
    for node in nodes:
        if node.is_input or node.operation is None:
            continue
        if any(id(x) not in values for x in node.input_tensors):
            continue  # a node of another model sharing this layer
        args, kwargs = node.arguments.fill_in(values)
        op = node.operation
        call_values = None
        view = None
        if state.expand is not None and not is_model(op):
            call_values = [values[id(x)] for x in node.arguments.keras_tensors]
            view = state.expand(node, call_values)
            if view is not None and lifted_constants(view):
                call_values = call_values + [state.expand.constant(c) for c in lifted_constants(view)]
        for x in node.input_tensors:
            remaining[id(x)] -= 1
            if remaining[id(x)] == 0 and id(x) not in keep:
                values.pop(id(x), None)
        if view is not None:
            outs = with_constant_outputs(view, _walk(view, call_values, path + (op.name,), state),
                                         getattr(state.expand, "constant", lambda c: c))
        elif is_model(op):
            inner = as_functional(op)
            inner_path = path + (op.name,)

            def descend(inner_values, inner=inner, inner_path=inner_path):
                return _walk(inner, inner_values, inner_path, state)

            if state.on_model is None:
                outs = descend(args[0])
            else:
                outs = state.on_model(node, args, kwargs, Site(path, op, 0, 1), descend)
        else:
            outs = state.visit(node, args, kwargs, state.site(op, path, labels.get(id(op))))
        outs = tree.flatten(outs)
        if len(outs) != len(node.outputs) and any(o is None for o in outs):
            outs = [o for o in outs if o is not None]  # (y, None): a None output is no node output
        if len(outs) != len(node.outputs):
            raise RuntimeError(
                f"'{op.name}' produced {len(outs)} values for {len(node.outputs)} output tensors."
            )
        for kt, v in zip(node.outputs, outs):
            values[id(kt)] = v
    return tree.pack_sequence_as(fn._outputs_struct, [values[id(kt)] for kt in fn.outputs])


def concrete_shapes(fn, length):
    """``{id(tensor): shape}`` for the tensors of `fn` (nested models included) whose declared shape has an
    unknown non-batch dimension, at the shapes they take when every unknown dimension of a float input is
    `length` (the probe's: `execute.probe_shape`), or {} when no float input has one. keras-hub's vision
    backbones declare images of shape (None, None, 3): a rule that reads the spatial size (global average
    pooling: the number of positions averaged) reads it here, at the size the probe and calibration run at.
    The shapes come from each op's ``compute_output_spec`` on symbolic tensors; where that fails, the
    declared shapes stand from there on."""
    def unknown(kt):
        return any(d is None for d in tuple(kt.shape)[1:])

    if not any(unknown(kt) and "float" in str(kt.dtype) for kt in fn.inputs):
        return {}
    shapes = {}

    def concrete(kt):
        shape = tuple(kt.shape)
        if "float" not in str(kt.dtype):
            return kt
        return keras.KerasTensor((None,) + tuple(length if d is None else d for d in shape[1:]), dtype=kt.dtype)

    def visit(node, args, kwargs, site):
        try:
            outs = node.operation.compute_output_spec(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the declared shapes stand
            return list(node.outputs)
        flat = [o for o in tree.flatten(outs) if o is not None]
        if len(flat) != len(node.outputs) or not all(isinstance(o, keras.KerasTensor) for o in flat):
            return list(node.outputs)
        for kt, o in zip(node.outputs, flat):
            if unknown(kt) and len(o.shape) == len(kt.shape):
                shapes[id(kt)] = tuple(o.shape)
        return flat

    try:
        walk(fn, [concrete(kt) for kt in fn.inputs], visit)
    except Exception:  # noqa: BLE001 - shapes are a refinement: without them the declared shapes stand
        return shapes
    return shapes


def count_calls(fn, path=(), counts=None, expand=None):
    """{id(op): number of calls} for every non-model op reachable in `fn` (nested models included, and
    the inside of the calls `expand` traces instead of the traced layers)."""
    counts = {} if counts is None else counts
    for node in topo_nodes(fn):
        op = node.operation
        if node.is_input or op is None:
            continue
        view = expand(node, None) if expand is not None and not is_model(op) else None
        if view is not None:
            count_calls(view, path + (op.name,), counts, expand)
        elif is_model(op):
            count_calls(as_functional(op), path + (op.name,), counts, expand)
        else:
            counts[id(op)] = counts.get(id(op), 0) + 1
    return counts


def leaf_ops(fn, expand=None):
    """Every distinct non-model op reachable in `fn` (nested models included; traced calls, see
    `walk`'s ``expand``, by their inner ops), in walk order."""
    seen, ops = set(), []

    def visit(g):
        for node in topo_nodes(g):
            op = node.operation
            if node.is_input or op is None:
                continue
            view = expand(node, None) if expand is not None and not is_model(op) else None
            if view is not None:
                visit(view)
            elif is_model(op):
                visit(as_functional(op))
            elif id(op) not in seen:
                seen.add(id(op))
                ops.append(op)

    visit(fn)
    return ops


@contextlib.contextmanager
def _tracing_patches(op):
    """While tracing: sublayers whose ``compute_output_spec`` takes fewer keywords than their ``call``
    (keras-hub's CachedMultiHeadAttention: ``cache=None`` reaches MultiHeadAttention's spec) get an
    instance-level spec that drops the keywords it does not know; and a sublayer call's node leaves out
    None outputs (DeiT's blocks return ``(y, None)``: Keras' Layer.__call__ cannot make a node of that
    on symbolic tensors, and raises). An EinsumDense's spec takes its output shape from the einsum of
    the actual input shape, not from its ``output_shape`` argument, whose None entries (keras-hub's
    ``(None, heads, head_dim)``) would make the sequence length unknown at concrete shapes and bake it
    into a later ``ops.reshape(x, ops.shape(x))`` (Gemma's attention). A sublayer whose spec comes from
    a ``compute_output_shape`` written outside Keras gets the structure its ``call`` really returns where
    the two disagree (`_spec_checked_by_call`: ESM's rotary layer returns ``(q, k)`` but inherits one
    shape). Removed afterwards."""
    patched = []
    flatten = getattr(op, "_flatten_layers", None)
    for layer in (flatten(include_self=False, recursive=True) if flatten else ()):
        if isinstance(layer, keras.layers.EinsumDense) and "compute_output_spec" not in vars(layer):
            object.__setattr__(layer, "compute_output_spec", functools.partial(_einsum_dense_spec, layer))
            patched.append(layer)
            continue
        if (type(layer).compute_output_spec is keras.layers.Layer.compute_output_spec
                and "compute_output_spec" not in vars(layer) and _shape_declared_outside_keras(layer)):
            object.__setattr__(layer, "compute_output_spec", functools.partial(_spec_checked_by_call, layer))
            patched.append(layer)
            continue
        spec = getattr(type(layer), "compute_output_spec", None)
        if spec is None or spec is keras.layers.Layer.compute_output_spec or "compute_output_spec" in vars(layer):
            continue
        try:
            params = inspect.signature(spec).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        known = set(params)

        def lenient(*args, _spec=spec, _layer=layer, _known=known, **kwargs):
            return _spec(_layer, *args, **{k: v for k, v in kwargs.items() if k in _known})

        object.__setattr__(layer, "compute_output_spec", lenient)
        patched.append(layer)
    from keras.src.layers import layer as layer_module

    keras_node = layer_module.Node
    layer_module.Node = _node_without_none(keras_node)
    arithmetic = _variable_arithmetic_deferring()
    try:
        yield
    finally:
        layer_module.Node = keras_node
        for name, method in arithmetic.items():
            setattr(_KERAS_VARIABLE, name, method)
        for layer in patched:
            object.__delattr__(layer, "compute_output_spec")


from keras.src.backend.common.variables import Variable as _KERAS_VARIABLE  # noqa: E402

_VARIABLE_OPERATORS = ("__add__", "__sub__", "__mul__", "__truediv__", "__floordiv__", "__mod__", "__pow__",
                       "__matmul__")


def _variable_arithmetic_deferring():
    """While tracing, ``variable * symbolic`` (keras-hub's T5LayerNorm: ``self.weight * hidden_states``) defers to
    the symbolic tensor's reflected operator, a keras.ops call (Keras' Variable computes on its value with the
    backend, which cannot take a KerasTensor). Returns the original methods, for restoring."""
    saved = {}
    for name in _VARIABLE_OPERATORS:
        original = _KERAS_VARIABLE.__dict__.get(name)
        if original is None:
            continue
        saved[name] = original

        def deferring(self, other, _original=original):
            if isinstance(other, keras.KerasTensor):
                return NotImplemented
            return _original(self, other)

        setattr(_KERAS_VARIABLE, name, deferring)
    return saved


def _shape_declared_outside_keras(layer) -> bool:
    """Whether `layer`'s ``compute_output_shape`` comes from a class outside Keras itself (keras-hub, user code)."""
    fn = getattr(type(layer), "compute_output_shape", None)
    if fn is None or fn is keras.layers.Layer.compute_output_shape:
        return False
    return not str(getattr(fn, "__module__", "")).startswith("keras.")


def _spec_checked_by_call(layer, *args, **kwargs):
    """The output spec of a sublayer call while tracing: Keras' spec from the layer's declared
    ``compute_output_shape``, unless its structure differs from what ``call`` returns when run on symbolic
    tensors (an inherited ``compute_output_shape`` that does not fit the subclass's ``call``); then the
    call's. Where the call cannot run symbolically, the declared spec."""
    from keras.src.ops.operation import Operation

    declared = keras.layers.Layer.compute_output_spec(layer, *args, **kwargs)
    try:
        actual = Operation.compute_output_spec(layer, *args, **kwargs)
    except Exception:  # noqa: BLE001 - the declared spec stands
        return declared
    if len(tree.flatten(actual)) != len(tree.flatten(declared)):
        return actual
    return declared


def _einsum_dense_spec(layer, inputs, *args, **kwargs):
    """The output spec of an EinsumDense call: the einsum of the input's shape with the kernel's."""
    from keras.src.ops.numpy import Einsum

    kernel = keras.KerasTensor(tuple(layer.kernel.shape), dtype=layer.compute_dtype)
    out = Einsum(layer.equation).compute_output_spec(inputs, kernel)
    return keras.KerasTensor(out.shape, dtype=layer.compute_dtype)


def _node_without_none(keras_node):
    """Keras' Node class, as Layer.__call__ uses it, recording only the tensor outputs of a call whose
    outputs hold None (where Keras would raise)."""

    def make(operation, call_args=None, call_kwargs=None, outputs=None):
        flat = tree.flatten(outputs) if outputs is not None else []
        if any(o is None for o in flat):
            outputs = [o for o in flat if o is not None]
        return keras_node(operation, call_args=call_args, call_kwargs=call_kwargs, outputs=outputs)

    return make


def trace_call(node, shapes=None):
    """A functional view of one call of a layer (`node`): ``layer.call`` replayed on fresh symbolic
    inputs shaped like the call's tensors, so every sublayer call and ``keras.ops`` operation inside
    becomes a node of its own. The view's inputs are the call's tensors in
    ``node.arguments.keras_tensors`` order and its layers are the layer's own sublayers (assigning their
    weights initializes the layer). ``shapes``: concrete shapes for those tensors (batch included), for
    calls that need them (``ops.arange(ops.shape(x)[1])``, causal masks built from ``ops.shape(x)[0]``).
    Raises `TraceError` with the reason when the call cannot be replayed symbolically (backend-specific
    ops, data-dependent Python control flow, ...). A sublayer the call runs on a constant the layer holds
    (``self.position_embedding(self.position_ids)``) would run eagerly while tracing; then the layer's
    integer tensor attributes become extra inputs of the view, after the call's own (`lifted_constants`:
    the walk feeds them), so that call is a node too.
    """
    view = _trace(node, shapes, lift=())
    missing = _sublayers_not_called(node.operation, view)
    if missing:
        # Sublayers called on constant tensors the layer holds (ViT: position_embedding(self.position_ids))
        # ran eagerly while tracing. Trace again with the layer's integer tensor attributes as extra
        # symbolic inputs, so those calls become nodes (their weights then get rules).
        lift = _integer_tensor_attributes(node.operation)
        if lift:
            try:
                lifted = _trace(node, shapes, lift=lift)
            except TraceError:
                lifted = None
            if lifted is not None and len(_sublayers_not_called(node.operation, lifted)) < len(missing):
                view = lifted
    _VIEWS[node] = view
    for i, kt in enumerate(list(view.inputs)[:len(node.arguments.keras_tensors)]):
        object.__setattr__(kt, _OUTER, (weakref.ref(node), i))  # `outer_tensor`; lives as long as the view
    return view


_VIEWS = weakref.WeakKeyDictionary()  # node -> the view `trace_call` last made of that call
_OUTER = "_autoinit_outer"  # attribute of a view input: (weakref to the traced call's node, argument index)


def outer_tensor(tensor):
    """For an input of a traced view (`trace_call`), the tensor the traced call received there; else None."""
    entry = getattr(tensor, _OUTER, None)
    node = entry[0]() if entry is not None else None
    return None if node is None else list(node.arguments.keras_tensors)[entry[1]]


def traced_view(node):
    """The functional view `trace_call` made of this call (the last one), or None when it was never traced."""
    return _VIEWS.get(node)


def lifted_constants(view):
    """The constant tensors a traced view takes as extra inputs after the call's own (see `trace_call`); a
    lifted integer variable as its value now (traces are cached for the model's life: ids a preset loads
    after the first wrap are read)."""
    return tuple(_current(v) for v in _LIFTED.get(view, ()))


def _current(value):
    return value.value if isinstance(value, keras.Variable) else value


_LIFTED_VALUE = "_autoinit_lifted_value"


def lifted_value(tensor):
    """The value (a numpy array) of a traced view's input that stands for one of its layer's constant integer
    tensors (`lifted_constants`: ViT's position ids), or None for any other tensor."""
    value = getattr(tensor, _LIFTED_VALUE, None)
    return None if value is None else np.asarray(keras.ops.convert_to_numpy(_current(value)))


def _integer_tensor_attributes(op):
    """(name, tensor) for the integer backend tensors `op` holds as attributes (position ids, indices), and
    (name, variable) for its non-trainable integer variables (keras-hub's CLIP keeps its position ids as one:
    read at their current value where used, `lifted_constants` / `lifted_value`)."""
    out = []
    for name, value in vars(op).items():
        if isinstance(value, keras.KerasTensor):
            continue
        if isinstance(value, keras.Variable):
            if value.trainable or "int" not in str(value.dtype):
                continue
        elif not keras.ops.is_tensor(value):
            continue
        if "int" in str(getattr(value, "dtype", "")) and len(tuple(getattr(value, "shape", ()))) >= 1:
            out.append((name, value))
    return out


def _sublayers_not_called(op, view):
    """`op`'s sublayers that own weights but are called nowhere in `view` (nested calls included)."""
    called = set()
    stack = [view]
    while stack:
        g = stack.pop()
        for n in topo_nodes(g):
            if n.operation is None or n.is_input:
                continue
            called.add(id(n.operation))
            if is_model(n.operation):
                stack.append(as_functional(n.operation))
    flatten = getattr(op, "_flatten_layers", None)
    subs = list(flatten(include_self=False, recursive=False)) if flatten else []
    return [layer for layer in subs if layer.weights and id(layer) not in called]


def _trace(node, shapes, lift):
    op = node.operation
    tensors = list(node.arguments.keras_tensors)
    saved = {name: vars(op)[name] for name, _ in lift}  # the attributes themselves (a variable, not its value)
    try:
        fresh = []
        for i, kt in enumerate(tensors):
            shape = tuple(kt.shape) if shapes is None else tuple(shapes[i])
            # Dense inputs: keras marks some symbolic tensors sparse that never are at run time.
            fresh.append(keras.Input(shape=shape[1:], batch_size=shape[0] if shape else None, dtype=kt.dtype))
        args, kwargs = node.arguments.fill_in({id(a): b for a, b in zip(tensors, fresh)})
        extra = []
        for name, value in lift:
            shape = tuple(int(d) for d in value.shape)
            dtype = keras.backend.standardize_dtype(keras.ops.convert_to_numpy(_current(value)).dtype)
            extra.append(keras.Input(shape=shape[1:], batch_size=shape[0], dtype=dtype, name=f"{op.name}_{name}"))
            object.__setattr__(extra[-1], _LIFTED_VALUE, value)  # `lifted_value`
            object.__setattr__(op, name, extra[-1])
        try:
            with _tracing_patches(op):
                outputs = op.call(*args, **kwargs)
        finally:
            for name, value in saved.items():
                object.__setattr__(op, name, value)
        # None outputs ((y, None) when attention scores are not asked for) are no node outputs; constant
        # outputs (ops.empty placeholders computed from static shapes) are fed back by the walk.
        flat = [o for o in tree.flatten(outputs) if o is not None]
        symbolic = [o for o in flat if isinstance(o, keras.KerasTensor)]
        constants = {i: o for i, o in enumerate(flat) if not isinstance(o, keras.KerasTensor)}
        if not symbolic or any(not keras.ops.is_tensor(c) for c in constants.values()):
            raise TraceError(f"call() of '{op.name}' returned something other than tensors.")
        if len(flat) != len(node.outputs):
            raise TraceError(f"call() of '{op.name}' returned {len(flat)} tensors, the layer's node has "
                             f"{len(node.outputs)}.")
        plain = len(symbolic) == len(tree.flatten(outputs))
        view = keras.Model(fresh + extra, outputs if plain else symbolic, name=f"{op.name}_call")
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a symbolic replay means: keep the layer whole
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(f"{type(exc).__name__}: {message[:300]}") from exc
    if any(inner.operation is op for inner in topo_nodes(view)):  # would recurse forever
        raise TraceError(f"call() of '{op.name}' calls the layer itself.")
    baked = _unknown_in_constant_shape(view)
    if baked is not None:  # e.g. ops.reshape(x, (None, t, h, d)) from ops.shape(x) of a symbolic input
        raise TraceError(f"'{baked}' got an unknown dimension as a constant shape; the call needs concrete shapes.")
    _RAW_OP_LABELS[view] = _raw_op_labels(view)
    if lift:
        _LIFTED[view] = tuple(value for _, value in lift)
    if constants:
        _CONSTANT_OUTPUTS[view] = (len(flat), constants)
    return view


def with_constant_outputs(view, outs, constant):
    """The outputs of a traced call: the view's own outputs `outs` with the call's constant outputs
    (see `trace_call`) put back at their places, each as ``constant(tensor)``."""
    total, constants = _CONSTANT_OUTPUTS.get(view, (None, None))
    if not constants:
        return outs
    it = iter(tree.flatten(outs))
    return [constant(constants[i]) if i in constants else next(it) for i in range(total)]


def _unknown_in_constant_shape(view):
    """The name of a node of `view` whose constant arguments hold a shape with an unknown (None) entry
    beside known ones, or None."""

    def bad(value):
        if isinstance(value, (tuple, list)):
            if any(v is None for v in value) and any(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return True
            return any(bad(v) for v in value)
        if isinstance(value, dict):
            return any(bad(v) for v in value.values())
        return False

    for node in topo_nodes(view):
        op = node.operation
        if op is not None and not node.is_input:
            if bad(node.arguments.args) or bad(node.arguments.kwargs):
                return op.name
            # raw ops keep their constant arguments as attributes (ops.reshape -> Reshape(newshape))
            if not isinstance(op, keras.layers.Layer) and any(bad(v) for v in vars(op).values()):
                return op.name
    return None


# traced view -> the constant tensors it takes as extra inputs (lifted integer attributes of the layer)
_LIFTED = weakref.WeakKeyDictionary()

# traced view -> (number of call outputs, {output index: constant tensor}) for calls returning constants
_CONSTANT_OUTPUTS = weakref.WeakKeyDictionary()

# traced view -> {id(raw op): its name in that view}; Keras names raw ops from a global counter
# (``multiply_17``), so two traces of one call would name their rows differently.
_RAW_OP_LABELS = weakref.WeakKeyDictionary()


def _raw_op_labels(view):
    """Names for the raw ops (``keras.ops`` calls, not layers) of a traced view, by type and order of
    appearance: ``multiply``, ``multiply_1``... the same for every trace of the same call."""
    labels, seen = {}, {}
    for node in topo_nodes(view):
        op = node.operation
        if node.is_input or op is None or isinstance(op, keras.layers.Layer) or id(op) in labels:
            continue
        base = "".join("_" + c.lower() if c.isupper() else c for c in type(op).__name__).lstrip("_")
        k = seen.get(base, 0)
        seen[base] = k + 1
        labels[id(op)] = base if k == 0 else f"{base}_{k}"
    return labels
