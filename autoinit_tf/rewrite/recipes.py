"""The swap rules: the user-facing `SwapRule` and the built-in named recipes.

Every rule adds entries to a `SwapPlan` from a `GraphIndex` of the ORIGINAL model (all swaps of one
`rewrite` call see the same graph; two swaps changing the same node is an error). Entries are built later
by the replay, so a plan is a faithful dry run.
"""

from __future__ import annotations

import keras
from keras import ops as kops  # noqa: F401  (raw-op activations build through keras.activations)

from autoinit_tf import layers as paper
from autoinit_tf.rewrite.replay import PlanEntry, SwapError, unique_name

__all__ = ["SwapRule", "Recipe", "RECIPES", "GATES", "activation_of", "list_recipes"]


# --------------------------------------------------------------------------------------------------
# Helpers: activations, channels
# --------------------------------------------------------------------------------------------------
_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
# raw keras.ops activation classes (keras.src.ops.nn / numpy) -> activation name
_RAW_ACTS = {
    "Relu": "relu", "Relu6": "relu6", "Elu": "elu", "Selu": "selu", "Gelu": "gelu", "Silu": "silu",
    "Sigmoid": "sigmoid", "HardSigmoid": "hard_sigmoid", "HardSilu": "hard_silu", "Softplus": "softplus",
    "Softsign": "softsign", "LeakyRelu": "leaky_relu", "Tanh": "tanh", "Mish": "mish", "Celu": "celu",
    "Glu": None, "LogSigmoid": "log_sigmoid", "SparsePlus": "sparse_plus", "Exp": None,
}
GATES = {
    "and_ail": dict(functions="and_ail"),
    "or_ail": dict(functions="or_ail"),
    "xnor_ail": dict(functions="xnor_ail"),
    "ail_dup": dict(functions=["and_ail", "or_ail", "xnor_ail"], combine="dup"),
    "ail_part": dict(functions=["and_ail", "or_ail", "xnor_ail"], combine="part"),
}
_CHANNELWISE = (
    keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_MAXPOOL = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D)
_AVGPOOL = (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D)
_GAP = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
        keras.layers.GlobalAveragePooling3D)


def _fn_name(fn):
    if fn is None:
        return None
    name = getattr(fn, "__name__", None)
    if name is None:
        try:
            name = keras.activations.serialize(fn)
        except Exception:  # noqa: BLE001
            return None
        if not isinstance(name, str):
            return None
    return _ALIASES.get(name, name)


def normalize_activation(name):
    return _ALIASES.get(name, name)


def activation_of(info):
    """``(kind, name)`` of the activation a node applies, or None.

    kind: ``"layer"`` (Activation / ReLU / LeakyReLU / ELU layers), ``"raw"`` (keras.ops activations)
    or ``"fused"`` (a weighted layer's ``activation=`` argument other than linear).
    """
    op = info.op
    if isinstance(op, keras.layers.Activation):
        return ("layer", _fn_name(op.activation))
    if isinstance(op, keras.layers.ReLU):
        if float(op.negative_slope) == 0.0 and float(op.threshold) == 0.0:
            if op.max_value is None:
                return ("layer", "relu")
            if float(op.max_value) == 6.0:
                return ("layer", "relu6")
        return None
    if isinstance(op, keras.layers.LeakyReLU):
        return ("layer", "leaky_relu")
    if isinstance(op, keras.layers.ELU):
        return ("layer", "elu")
    if not isinstance(op, keras.layers.Layer):
        name = _RAW_ACTS.get(type(op).__name__)
        if name and len(info.inputs) == 1:
            return ("raw", name)
        return None
    if isinstance(op, keras.Model):
        return None
    act = getattr(op, "activation", None)
    if act is not None and callable(act):
        try:
            cfg = op.get_config()
        except Exception:  # noqa: BLE001
            return None
        if "activation" in cfg:
            name = _fn_name(act)
            if name and name != "linear":
                return ("fused", name)
    return None


def _width_key(op):
    """The config key that sets a weighted layer's output channels ('units' / 'filters'), or None."""
    try:
        cfg = op.get_config()
    except Exception:  # noqa: BLE001
        return None
    for key in ("filters", "units"):
        if isinstance(cfg.get(key), int):
            return key
    return None


def _channel_axis(op):
    fmt = getattr(op, "data_format", None)
    return 1 if fmt == "channels_first" else -1


def _single_chain(info):
    """True when the node's op is called once and its output feeds exactly one node."""
    return not info.shared and len(info.consumers) == 1 and not info.is_model_output


def _new(plan_state, base):
    return unique_name(base, plan_state.names)


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------
class PlanState:
    """What a rule gets while planning: the plan, the graph index and the set of names in use."""

    def __init__(self, plan, index):
        self.plan = plan
        self.index = index
        self.names = index.names  # shared set: generated names are reserved in it
        self.activation_swaps = {}  # id(node) -> new activation name (from act:* recipes)
        self.rule_results = {}  # (rule, key) -> what a SwapRule's replace returned, built once per key
        self.generated = {}  # key -> the name generated for it (one per op: shared layers stay shared)
        self.seen = set()  # keys a recipe has already planned once (e.g. an op with several calls)

    def name_for(self, key, base):
        """One new unique name per ``key`` (generated from ``base`` the first time)."""
        if key not in self.generated:
            self.generated[key] = _new(self, base)
        return self.generated[key]

    def first_time(self, key) -> bool:
        """True the first time ``key`` is asked about in this plan."""
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class Recipe:
    """Base class of swap rules.

    `plan(state)` returns the number of nodes the recipe applies to: it runs `plan_node` on every node of
    `candidates` (default: every node of the graph, in topological order) that `matches`; a `plan_node`
    that returns False did not apply and is not counted. Subclasses implement `matches` and `plan_node`
    (or `plan` itself when they need the whole graph at once).
    """

    name = "recipe"
    args = {}
    doc = ""

    def candidates(self, state):
        return state.index.nodes

    def matches(self, info, state) -> bool:
        return True

    def plan_node(self, info, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, state):
        count = 0
        for info in self.candidates(state):
            if self.matches(info, state) and self.plan_node(info, state) is not False:
                count += 1
        return count

    def __repr__(self):
        return f"<swap {self.name}>"


class SwapRule(Recipe):
    """A user-defined swap: ``SwapRule(match=lambda n: ..., replace=lambda n: ...)``.

    ``match(node_info)`` gets a `NodeInfo` (op, inputs, outputs, producers, consumers, path) and returns
    True to swap that node. ``replace(node_info)`` returns a Layer or Operation (called with the node's
    arguments; created once per op, so shared layers stay shared), any callable ``f(*args, **kwargs)``
    building a sub-graph on the node's (new) arguments, or None to keep the node. The replacement must
    produce as many outputs as the node had.
    """

    def __init__(self, match, replace, name=None, doc=""):
        if not callable(match) or not callable(replace):
            raise SwapError("SwapRule needs callables match(node_info) and replace(node_info).")
        self.match = match
        self.replace = replace
        self.name = name or f"rule:{getattr(replace, '__name__', 'replace')}"
        self.doc = doc

    def matches(self, info, state):
        return bool(self.match(info))

    def plan_node(self, info, state):
        calls = state.index.calls_of(info.model, info.op)
        first = calls[0] if calls else info
        key = ("rule", id(self), id(info.op))
        if key not in state.rule_results:
            state.rule_results[key] = self.replace(first)
        result = state.rule_results[key]
        if result is None:
            return False
        creates = []
        if isinstance(result, keras.Operation):
            if result.name in state.names and result.name != info.op.name:
                result.name = _new(state, result.name)
            else:
                state.names.add(result.name)
            creates = [(result.name, type(result).__name__)]
            desc = f"{type(info.op).__name__} -> {type(result).__name__} '{result.name}'"
        else:
            desc = f"{type(info.op).__name__} -> sub-graph {getattr(result, '__name__', type(result).__name__)}"

        def build(args, kwargs, ctx, _r=result):
            return _r(*args, **kwargs)

        state.plan.claim(PlanEntry(self.name, "replace", info.label, desc, info=info, build=build,
                                   creates=creates, removes=[info.op.name]))


# ------------------------------------------------------------------------------------------------ act
class ActivationSwap(Recipe):
    doc = ("Swap activation <a> for <b> (any Keras activation, or a logit gate and_ail|or_ail|xnor_ail|"
           "ail_dup|ail_part) in Activation/ReLU/LeakyReLU/ELU layers, fused activation= arguments and raw ops.")
    args = {"keep": "width"}

    def __init__(self, source, target, keep="width"):
        self.source = normalize_activation(source)
        self.target = normalize_activation(target)
        if keep not in ("width", "params"):
            raise SwapError(f"act:{source}->{target}: keep must be 'width' or 'params', got {keep!r}.")
        self.keep = keep
        for n in ([self.source] + ([] if self.target in GATES else [self.target])):
            try:
                keras.activations.get(n)
            except Exception as exc:  # noqa: BLE001
                raise SwapError(f"act:{source}->{target}: '{n}' is not a Keras activation ({exc}).") from exc
        self.name = f"act:{source}->{target}" + (f"(keep={keep})" if keep != "width" else "")

    # --- gate sizing ---
    def _gate_widths(self, c, label):
        """(input width the gate should get, its output width) for a pre-activation width c."""
        spec = GATES[self.target]
        n = len(spec["functions"]) if isinstance(spec["functions"], list) else 1
        dup = spec.get("combine") == "dup" and n > 1
        if self.keep == "width":
            if dup:
                if (2 * c) % 3 or ((2 * c) // 3) % 2:
                    raise SwapError(
                        f"swap '{self.name}' cannot apply to node '{label}': keep='width' with {self.target} "
                        f"needs a width divisible by 3 (the gate maps 2C/3 channels to C), got {c}.")
                cin = 2 * c // 3
            else:
                cin = 2 * c
                if n > 1 and cin % (2 * n):
                    raise SwapError(
                        f"swap '{self.name}' cannot apply to node '{label}': {self.target} needs the widened "
                        f"width {cin} divisible by {2 * n}; got width {c}.")
            return cin, c
        div = 2 * n if (n > 1 and not dup) else 2
        if c % div:
            raise SwapError(
                f"swap '{self.name}' cannot apply to node '{label}': {self.target} needs a channel count "
                f"divisible by {div}, got {c}.")
        return c, (3 * c // 2 if dup else c // 2)

    def _weighted_producer(self, info):
        """Walk back through channel-wise layers to the weighted layer whose width feeds `info`."""
        cur = info.producers[0] if info.producers else None
        while cur is not None:
            if not _single_chain(cur):
                return None
            if _width_key(cur.op) is not None and not isinstance(cur.op, keras.Model):
                return cur
            if isinstance(cur.op, _CHANNELWISE) or (activation_of(cur) or ("", ""))[0] in ("layer", "raw"):
                cur = cur.producers[0] if cur.producers else None
                continue
            return None
        return None

    def matches(self, info, state):
        found = activation_of(info)
        return bool(found) and found[1] == self.source

    def plan_node(self, info, state):
        kind, _ = activation_of(info)
        op = info.op
        if self.target in GATES:
            self._plan_gate(state, info, kind)
            return
        state.activation_swaps[id(info.node)] = self.target
        if kind != "fused":
            self._replace_with_activation(state, info)
        elif state.first_time((self.name, "fused", id(op))):
            state.plan.override(self.name, op, {"activation": self.target},
                                f"activation {self.source} -> {self.target} (recreated, weights kept)",
                                target=info.label)

    def _replace_with_activation(self, state, info):
        op, target = info.op, self.target
        key = ("act", id(op))
        name = state.name_for(key, f"{op.name}_{target}")  # a shared op's later calls reuse the first's

        def build(args, kwargs, ctx, _name=name, _key=key):
            layer = ctx.cached(_key, lambda: keras.layers.Activation(target, name=_name))
            x = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)][0]
            return layer(x)

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"{type(op).__name__} ({self.source}) -> Activation '{name}' ({target})",
                                   info=info, build=build, creates=[(name, "Activation")], removes=[op.name]))

    def _plan_gate(self, state, info, kind):
        op = info.op
        if info.shared:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': the layer is shared "
                            "(called more than once) and a gate changes its width.")
        gate_kwargs = GATES[self.target]
        if kind == "fused":
            key = _width_key(op)
            c = info.outputs[0].shape[_channel_axis(op)]
            if key is None or c is None:
                raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': unknown output width.")
            cin, cout = self._gate_widths(int(c), info.label)
            changes = {"activation": "linear"}
            if cin != c:
                changes[key] = cin
            state.plan.override(self.name, op, changes,
                                f"activation {self.source} -> linear" + (f", {key} {c} -> {cin}" if cin != c else ""),
                                target=info.label)
            gname = _new(state, f"{op.name}_{self.target}")

            def build(args, kwargs, ctx, _n=info, _g=gname):
                y = ctx.op_for(_n, args, kwargs)(*args, **kwargs)
                return paper.LogitGate(name=_g, **gate_kwargs)(y)

            state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                       f"{type(op).__name__} '{op.name}' + LogitGate '{gname}' ({self.target}, "
                                       f"{cin} -> {cout} channels)", info=info, build=build,
                                       creates=[(gname, "LogitGate")]))
            return
        c = info.inputs[0].shape[-1]
        if c is None:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': unknown channel count.")
        cin, cout = self._gate_widths(int(c), info.label)
        if cin != c:
            prod = self._weighted_producer(info)
            if prod is None:
                raise SwapError(
                    f"swap '{self.name}' cannot apply to node '{info.label}': keep='width' needs a Dense/Conv "
                    "layer feeding it (through channel-wise layers only, not shared); use keep='params'.")
            key = _width_key(prod.op)
            state.plan.override(self.name, prod.op, {key: cin}, f"{key} {c} -> {cin} (widened for {self.target})",
                                target=prod.label)
        gname = _new(state, f"{op.name}_{self.target}")

        def build(args, kwargs, ctx, _g=gname):
            x = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)][0]
            return paper.LogitGate(name=_g, **gate_kwargs)(x)

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"{type(op).__name__} ({self.source}) -> LogitGate '{gname}' ({self.target}, "
                                   f"{cin} -> {cout} channels)", info=info, build=build,
                                   creates=[(gname, "LogitGate")], removes=[op.name]))


# ------------------------------------------------------------------------------------------ pooling
def _preceding_activation(state, info):
    """The activation applied just before `info` (through channel-wise layers), else 'linear'."""
    cur = info.producers[0] if info.producers else None
    while cur is not None:
        found = activation_of(cur)
        if found:
            new = state.activation_swaps.get(id(cur.node), found[1])
            return found[1] if new in GATES else new
        if isinstance(cur.op, _CHANNELWISE):
            cur = cur.producers[0] if cur.producers else None
            continue
        return "linear"
    return "linear"


class MaxPoolToStridedConv(Recipe):
    name = "maxpool->strided_conv"
    args = {}
    doc = ("All-CNN: each MaxPooling layer becomes a Conv with the pool's kernel size and stride, the same "
           "channel count and the activation of the preceding conv.")

    def matches(self, info, state):
        return isinstance(info.op, _MAXPOOL)

    def plan_node(self, info, state):
        op = info.op
        rank = len(op.pool_size)
        axis = 1 if op.data_format == "channels_first" else -1
        c = info.inputs[0].shape[axis]
        if c is None:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': unknown channel count.")
        act = _preceding_activation(state, info)
        conv_cls = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
        key = ("mpconv", id(op))
        name = state.name_for(key, f"{op.name}_conv")  # a shared pool's later calls reuse the first's
        cfg = dict(filters=int(c), kernel_size=tuple(op.pool_size), strides=tuple(op.strides),
                   padding=op.padding, data_format=op.data_format, activation=act)

        def build(args, kwargs, ctx, _k=key, _cfg=cfg, _name=name, _cls=conv_cls):
            layer = ctx.cached(_k, lambda: _cls(name=_name, **_cfg))
            return layer(args[0])

        state.plan.claim(PlanEntry(
            self.name, "replace", info.label,
            f"{type(op).__name__} -> {conv_cls.__name__} '{name}' ({c} filters, kernel {cfg['kernel_size']}, "
            f"strides {cfg['strides']}, {act})", info=info, build=build,
            creates=[(name, conv_cls.__name__)], removes=[op.name]))


class PoolToStrided(Recipe):
    name = "pool->strided"
    args = {}
    doc = "Strided-CNN control: each Max/AveragePooling layer is removed and the preceding conv gets its stride."

    def matches(self, info, state):
        return isinstance(info.op, _MAXPOOL + _AVGPOOL)

    def plan_node(self, info, state):
        op = info.op
        cur = info.producers[0] if info.producers else None
        conv = None
        while cur is not None and _single_chain(cur):
            if isinstance(cur.op, _CONV):
                conv = cur
                break
            if isinstance(cur.op, _CHANNELWISE) or (activation_of(cur) or ("",))[0] in ("layer", "raw"):
                cur = cur.producers[0] if cur.producers else None
                continue
            break
        if conv is None:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': no unshared Conv layer "
                            "feeds it (through activation/normalization layers only).")
        if any(int(s) != 1 for s in conv.op.strides):
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': the preceding conv "
                            f"'{conv.op.name}' already has strides {conv.op.strides}.")
        state.plan.override(self.name, conv.op, {"strides": tuple(op.strides)},
                            f"strides -> {tuple(op.strides)} (from '{op.name}')", target=conv.label)
        state.plan.claim(PlanEntry(self.name, "remove", info.label, f"{type(op).__name__} removed",
                                   info=info, removes=[op.name]))


class GapToLogAvgExp(Recipe):
    name = "gap->logavgexp"
    args = {"temperature": 1.0, "learnable": False}
    doc = "GlobalAveragePooling becomes LogAvgExp pooling (Lowe et al.), fixed or learnable temperature."

    def __init__(self, temperature=1.0, learnable=False):
        self.temperature = float(temperature)
        if self.temperature <= 0:
            raise SwapError(f"{self.name}: temperature must be > 0, got {temperature}.")
        self.learnable = bool(learnable)

    def matches(self, info, state):
        return isinstance(info.op, _GAP)

    def plan_node(self, info, state):
        op = info.op
        idx = _GAP.index(type(op)) if type(op) in _GAP else 1
        cls = (paper.LogAvgExpPooling1D, paper.LogAvgExpPooling2D, paper.LogAvgExpPooling3D)[idx]
        key = ("lae", id(op))
        name = state.name_for(key, f"{op.name}_logavgexp")
        cfg = dict(temperature=self.temperature, learnable=self.learnable, data_format=op.data_format,
                   keepdims=op.keepdims)

        def build(args, kwargs, ctx, _k=key, _cfg=cfg, _name=name, _cls=cls):
            layer = ctx.cached(_k, lambda: _cls(name=_name, **_cfg))
            return layer(args[0])

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"{type(op).__name__} -> {cls.__name__} '{name}' (t={self.temperature}, "
                                   f"learnable={self.learnable})", info=info, build=build,
                                   creates=[(name, cls.__name__)], removes=[op.name]))


# ------------------------------------------------------------------------------------ normalization
def _bn_nodes(state):
    for info in state.index.nodes:
        if isinstance(info.op, keras.layers.BatchNormalization):
            yield info


class _BNRecipe(Recipe):
    """A recipe for BatchNormalization nodes."""

    def candidates(self, state):
        return _bn_nodes(state)


def _check_last_axis(recipe, info):
    rank = len(info.inputs[0].shape)
    if info.op.axis not in (-1, rank - 1):
        raise SwapError(f"swap '{recipe.name}' cannot apply to node '{info.label}': only channels-last "
                        f"BatchNormalization (axis=-1) is supported, got axis={info.op.axis}.")
    return rank


#: The default group count of the GroupNorm swaps: the largest divisor of the channels up to this.
DEFAULT_GROUPS = 32


def _groups_for(recipe, info, groups):
    """The group count for this BN's channels: with the default (``groups=None``) the largest divisor
    of the channel count not above 32 (36 channels -> 18), as IterNormWhitening chooses its groups;
    an explicit ``groups=`` must divide the channels."""
    c = int(info.inputs[0].shape[-1])
    if groups is None:
        return max(d for d in range(1, min(DEFAULT_GROUPS, c) + 1) if c % d == 0)
    g = min(int(groups), c)
    if c % g:
        raise SwapError(f"swap '{recipe.name}' cannot apply to node '{info.label}': groups={g} does not divide "
                        f"its {c} channels.")
    return g


class BNToNorm(_BNRecipe):
    """bn->groupnorm / bn->layernorm."""

    def __init__(self, norm, groups=None):
        self.norm = norm
        self.groups = None if groups is None else int(groups)
        self.name = f"bn->{norm}norm"
        self.args = {"groups": 32} if norm == "group" else {}
        if self.groups is not None and self.groups < 1:
            raise SwapError(f"{self.name}: groups must be >= 1.")

    def plan_node(self, info, state):
        op = info.op
        _check_last_axis(self, info)
        key = ("bnnorm", id(op))
        name = state.name_for(key, f"{op.name}_{self.norm}norm")
        if self.norm == "group":
            cls, cfg = keras.layers.GroupNormalization, dict(groups=_groups_for(self, info, self.groups), axis=-1)
        else:
            cls, cfg = keras.layers.LayerNormalization, dict(axis=-1)
        cfg.update(epsilon=op.epsilon, center=op.center, scale=op.scale)

        def build(args, kwargs, ctx, _k=key, _cls=cls, _cfg=cfg, _n=name):
            return ctx.cached(_k, lambda: _cls(name=_n, **_cfg))(args[0])

        state.plan.claim(PlanEntry(self.name, "replace", info.label, f"BatchNormalization -> {cls.__name__} "
                                   f"'{name}'", info=info, build=build, creates=[(name, cls.__name__)],
                                   removes=[op.name]))


class BNToProxyNorm(_BNRecipe):
    name = "bn->proxynorm"
    args = {"norm": "group", "groups": 32}
    doc = ("BatchNormalization followed by an activation becomes GroupNorm/LayerNorm (no affine) followed by "
           "ProxyNormalization carrying that activation (Labatie et al.).")

    def __init__(self, norm="group", groups=None):
        if norm not in ("group", "layer"):
            raise SwapError(f"{self.name}: norm must be 'group' or 'layer', got {norm!r}.")
        self.norm, self.groups = norm, None if groups is None else int(groups)
        self.name = "bn->proxynorm" + (f"(norm={norm})" if norm != "group" else "")

    def matches(self, info, state):
        cons = info.consumers
        if len(cons) != 1 or info.is_model_output:
            return False
        act = activation_of(cons[0])
        return bool(act) and act[0] != "fused"

    def plan_node(self, info, state):
        cons = info.consumers
        act = activation_of(cons[0])
        if info.shared or cons[0].shared:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': shared layers.")
        rank = _check_last_axis(self, info)
        op = info.op
        nname = _new(state, f"{op.name}_{self.norm}norm")
        pname = _new(state, f"{cons[0].op.name}_proxynorm")
        if self.norm == "group":
            cls = keras.layers.GroupNormalization
            cfg = dict(groups=_groups_for(self, info, self.groups), axis=-1)
        else:
            cls = keras.layers.LayerNormalization
            cfg = dict(axis=list(range(1, rank)))
        cfg.update(epsilon=op.epsilon, center=False, scale=False)

        def build_norm(args, kwargs, ctx, _cls=cls, _cfg=cfg, _n=nname):
            return _cls(name=_n, **_cfg)(args[0])

        act_name = act[1]

        def build_pn(args, kwargs, ctx, _n=pname, _a=act_name):
            x = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)][0]
            return paper.ProxyNormalization(activation=_a, name=_n)(x)

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"BatchNormalization -> {cls.__name__} '{nname}' (no affine)", info=info,
                                   build=build_norm, creates=[(nname, cls.__name__)], removes=[op.name]))
        state.plan.claim(PlanEntry(self.name, "replace", cons[0].label,
                                   f"{type(cons[0].op).__name__} ({act_name}) -> ProxyNormalization '{pname}'",
                                   info=cons[0], build=build_pn, creates=[(pname, "ProxyNormalization")],
                                   removes=[cons[0].op.name]))


class BNRemove(_BNRecipe):
    name = "bn->remove"
    args = {}
    doc = "Drop every BatchNormalization (normalizer-free experiments); AutoInit re-scales the rest."

    def plan_node(self, info, state):
        state.plan.claim(PlanEntry(self.name, "remove", info.label, "BatchNormalization removed", info=info,
                                   removes=[info.op.name]))


#: The input `bn->darbn` adds: shape (batch, 1), 1 for a pure-noise example, 0 for a natural one.
NOISE_MASK_INPUT = "noise_mask"


class BNToDARBN(_BNRecipe):
    name = "bn->darbn"
    args = {}
    doc = ("BatchNormalization becomes DARBatchNormalization (Zada et al.) routed by a new model input "
           f"'{NOISE_MASK_INPUT}' (shape (1,), 1 = pure-noise image): noise images are normalized with their own "
           "batch statistics, natural ones alone update the moving statistics; weights kept, inference as BN.")

    def plan_node(self, info, state):
        op = info.op
        _check_last_axis(self, info)
        if info.path:
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': it is inside the nested model "
                            f"'{'/'.join(info.path)}', which cannot receive the '{NOISE_MASK_INPUT}' input. Flatten "
                            "the model first (build it from the nested model's layers).")
        key = ("darbn", id(op))
        name = state.name_for(key, f"{op.name}_darbn")
        cfg = dict(momentum=op.momentum, epsilon=op.epsilon, center=op.center, scale=op.scale)

        def build(args, kwargs, ctx, _k=key, _n=name, _cfg=cfg, _op=op):
            mask = ctx.side_input(NOISE_MASK_INPUT, (1,))

            def make():
                layer = paper.DARBatchNormalization(name=_n, **_cfg)
                ctx.copy_pairs.append((_op, layer))  # gamma, beta, moving mean, moving variance: same order
                return layer

            return ctx.cached(_k, make)([args[0], mask])

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"BatchNormalization -> DARBatchNormalization '{name}' (input '{NOISE_MASK_INPUT}')",
                                   info=info, build=build, creates=[(name, "DARBatchNormalization")],
                                   removes=[op.name]))


class ConvUnitToWhitening(Recipe):
    name = "conv_unit->whitening"
    args = {"group_size": 64, "iterations": 5}
    doc = "Conv -> BN -> act units become IterNormWhitening -> Conv -> act (Cho et al., ICCV 2021)."

    def __init__(self, group_size=64, iterations=5):
        self.group_size, self.iterations = int(group_size), int(iterations)

    def matches(self, info, state):
        if not isinstance(info.op, _CONV) or not _single_chain(info):
            return False
        bn = info.consumers[0]
        if not isinstance(bn.op, keras.layers.BatchNormalization) or not _single_chain(bn):
            return False
        act = activation_of(bn.consumers[0])
        return bool(act) and act[0] != "fused"

    def plan_node(self, info, state):
        bn = info.consumers[0]
        if info.op.data_format == "channels_first":
            raise SwapError(f"swap '{self.name}' cannot apply to node '{info.label}': channels-last only.")
        wname = _new(state, f"{info.op.name}_whitening")
        cfg = dict(group_size=self.group_size, iterations=self.iterations)

        def build(args, kwargs, ctx, _n=info, _w=wname, _cfg=cfg):
            x = IterNormWhitening(name=_w, **_cfg)(args[0])
            return ctx.op_for(_n, (x,), kwargs)(x, *args[1:], **kwargs)

        state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                   f"IterNormWhitening '{wname}' inserted before {type(info.op).__name__}",
                                   info=info, build=build, creates=[(wname, "IterNormWhitening")]))
        state.plan.claim(PlanEntry(self.name, "remove", bn.label, "BatchNormalization removed", info=bn,
                                   removes=[bn.op.name]))


IterNormWhitening = paper.IterNormWhitening


# --------------------------------------------------------------------------------------------- residual
def _is_add(info):
    op = info.op
    if isinstance(op, keras.layers.Add):
        return True
    return type(op).__name__ == "Add" and not isinstance(op, keras.layers.Layer)


def residual_nodes(index):
    """[(NodeInfo, shortcut position, branch position)] for 2-input Add nodes with a clear shortcut."""
    out = []
    for info in index.nodes:
        if not _is_add(info) or len(info.inputs) != 2:
            continue
        a, b = info.inputs
        if tuple(a.shape) != tuple(b.shape):
            continue
        pa, pb = info.producers
        la = pa.level if pa is not None else 0
        lb = pb.level if pb is not None else 0
        if la == lb:
            continue
        out.append((info, 0, 1) if la < lb else (info, 1, 0))
    return out


class _ResidualRecipe(Recipe):
    def _layer(self, l_index, total, name):  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, state):
        found = residual_nodes(state.index)
        for i, (info, s, b) in enumerate(found):
            name = _new(state, f"{info.op.name}_{self.tag}")
            layer_desc = self._describe(i + 1, len(found))

            def build(args, kwargs, ctx, _s=s, _b=b, _n=name, _i=i + 1, _L=len(found)):
                ts = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)]
                return self._layer(_i, _L, _n)([ts[_s], ts[_b]])

            state.plan.claim(PlanEntry(self.name, "replace", info.label,
                                       f"Add -> {self.cls_name} '{name}' ({layer_desc}; shortcut = input {s})",
                                       info=info, build=build, creates=[(name, self.cls_name)],
                                       removes=[info.op.name]))
        return len(found)


class ResidualStochasticDepth(_ResidualRecipe):
    args = {"p_last": 0.5, "mode": "paper"}
    doc = ("Residual Add nodes (shortcut + branch) get StochasticDepth on the branch, survival probability "
           "decaying linearly along depth to p_last (Huang et al.).")
    tag, cls_name = "stochastic_depth", "StochasticDepth"

    def __init__(self, p_last=0.5, mode="paper"):
        if not 0.0 <= float(p_last) <= 1.0:
            raise SwapError(f"residual->stochastic_depth: p_last must be in [0, 1], got {p_last}.")
        if mode not in ("paper", "drop_path"):
            raise SwapError(f"residual->stochastic_depth: mode must be 'paper' or 'drop_path', got {mode!r}.")
        self.p_last, self.mode = float(p_last), mode
        self.name = f"residual->stochastic_depth(p_last={self.p_last})"

    def _p(self, i, total):
        return paper.linear_decay_survival(total, self.p_last)[i - 1]

    def _describe(self, i, total):
        return f"block {i}/{total}, p={self._p(i, total):.4g}"

    def _layer(self, i, total, name):
        return paper.StochasticDepth(survival_probability=self._p(i, total), mode=self.mode, name=name)


class ResidualScaled(_ResidualRecipe):
    args = {"mode": "idshort"}
    doc = "Residual Add nodes become ScaledResidual sums: idshort | learnscalar | skipinit | autoinit."
    tag, cls_name = "scaled", "ScaledResidual"

    def __init__(self, mode="idshort"):
        if mode not in ("idshort", "learnscalar", "skipinit", "rezero", "autoinit"):
            raise SwapError(f"residual->scaled: mode must be idshort|learnscalar|skipinit|autoinit, got {mode!r}.")
        self.mode = mode
        self.name = f"residual->scaled(mode={mode})"

    def _describe(self, i, total):
        return f"mode={self.mode}"

    def _layer(self, i, total, name):
        return paper.ScaledResidual(mode=self.mode, name=name)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def _act_factory(source, target, keep="width"):
    return ActivationSwap(source, target, keep=keep)


# name -> (factory(**kwargs), {arg: default}, doc)
RECIPES = {
    "act:<a>-><b>": (_act_factory, {"keep": "width"}, ActivationSwap.doc + " keep='width' (default) widens the "
                     "preceding weighted layer so a gate keeps the output width; keep='params' does not."),
    "maxpool->strided_conv": (MaxPoolToStridedConv, {}, MaxPoolToStridedConv.doc),
    "pool->strided": (PoolToStrided, {}, PoolToStrided.doc),
    "gap->logavgexp": (GapToLogAvgExp, dict(GapToLogAvgExp.args), GapToLogAvgExp.doc),
    "bn->proxynorm": (BNToProxyNorm, dict(BNToProxyNorm.args), BNToProxyNorm.doc),
    "bn->groupnorm": (lambda groups=None: BNToNorm("group", groups), {"groups": 32},
                      "BatchNormalization becomes GroupNormalization (batch-independent, e.g. for DP-SGD)."),
    "bn->layernorm": (lambda: BNToNorm("layer"), {},
                      "BatchNormalization becomes LayerNormalization over channels (batch-independent)."),
    "conv_unit->whitening": (ConvUnitToWhitening, dict(ConvUnitToWhitening.args), ConvUnitToWhitening.doc),
    "residual->stochastic_depth": (ResidualStochasticDepth, dict(ResidualStochasticDepth.args),
                                   ResidualStochasticDepth.doc),
    "residual->scaled": (ResidualScaled, dict(ResidualScaled.args), ResidualScaled.doc),
    "bn->remove": (BNRemove, {}, BNRemove.doc),
    "bn->darbn": (BNToDARBN, {}, BNToDARBN.doc),
}


def list_recipes():
    """The built-in recipes: ``[{"name", "args" (defaults), "doc"}]``, in registry order."""
    return [{"name": name, "args": dict(args), "doc": doc} for name, (_, args, doc) in RECIPES.items()]
