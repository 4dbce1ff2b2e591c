"""The one per-class registry: everything the passes know about a layer class, in one record, one lookup.

A `LayerSpec` carries, for one layer or op class (or activation function):

=================  ==========================================================================================
``rule``           the propagation rule of the analytic pass, ``rule(ctx) -> Moments | [Moments]``
                   (`autoinit_tf.rules.context.RuleContext`)
``preactivation``  for linear layers with a fused activation: the rule of the output *before* the
                   activation (draws the kernel); wrappers such as SpectralNormalization reuse it
``kernel``         ``layer -> (kernel variable, bias variable or None)``: what calibration rescales (the
                   layer's main output must be linear in the kernel plus the bias term)
``bias_split``     the output is exactly (part linear in the kernel) + (bias broadcast over the batch), so
                   calibration may compute the bias term on one example; holds for exactly the
                   registered class (a subclass may change ``call``)
``mixes_examples`` True: one example's output depends on other examples of the batch (batch statistics);
                   DP-SGD refuses the layer before probing. None: unknown (the DP probe decides)
``advice``         what to use instead of an example-mixing layer
``moving_statistics``  ``layer -> (moving mean variable, moving variance variable, channel axis)`` for
                   layers that normalize by batch statistics in training: `wrap` sets them to the
                   statistics the initialized network produces (inference then matches training mode)
``kinks``          for an activation function: where it is not smooth, so quadrature splits there
``inner``          ``(layer, args, kwargs) -> [(sublayer, input), ...]``: linear sublayers calibration
                   scales first, each on its own input, before the layer's own ``kernel`` (attention:
                   the query, key and value projections, then the output projection)
=================  ==========================================================================================

Two tables: the built-in declarations (`install_builtin`, filled by
`autoinit_tf.rules.builtin.register_builtin_rules` from each rule module's `BuiltinTable`, in a
written order) and the user's (`register_layer`, `register_rule`). A field is looked up along the
class's MRO, most specific class first; at each class the user's value wins over the built-in one.
A key may also be a class *name* (a string), matched against the names in the MRO, for classes that
cannot be imported (``"SyncBatchNormalization"``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Callable

__all__ = ["LayerSpec", "BuiltinTable", "UnsupportedLayerError", "register_layer", "unregister_layer", "register_rule",
           "unregister_rule", "spec_for", "spec_of", "kernel_of", "find_rule", "registered_rules", "builtin_rules", "install_builtin",
           "FieldView", "snapshot", "restore"]


class UnsupportedLayerError(TypeError):
    """Raised in strict mode when a layer or op has no registered propagation rule."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the passes know about one layer class (fields left None are unknown / not applicable)."""

    rule: Callable | None = None
    preactivation: Callable | None = None
    kernel: Callable | None = None
    bias_split: bool | None = None
    mixes_examples: bool | None = None
    advice: str | None = None
    kinks: tuple | None = None
    moving_statistics: Callable | None = None
    normalizes: bool | None = None
    inner: Callable | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(LayerSpec))
_EXACT_ONLY = frozenset({"bias_split"})

_BUILTIN: dict = {}
_USER: dict = {}
# Lookups are cached per class (a pass asks about every node); any change to the tables clears the cache.
_CACHE: dict = {}
_NAMED = [False]  # whether any key is a class name (a string): only then are names tried


def _changed():
    _CACHE.clear()
    _NAMED[0] = any(isinstance(k, str) for table in (_USER, _BUILTIN) for k in table)


def _check_fields(fields):
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"Unknown LayerSpec fields {sorted(unknown)}; known: {list(FIELDS)}.")
    if fields.get("kinks") is not None:
        fields["kinks"] = tuple(float(k) for k in fields["kinks"])
    for name in ("rule", "preactivation", "kernel", "moving_statistics", "inner"):
        if fields.get(name) is not None and not callable(fields[name]):
            raise TypeError(f"A {name} must be callable, got {fields[name]!r}.")
    return fields


def _merge(table, key, fields):
    table[key] = dataclasses.replace(table.get(key, LayerSpec()), **fields)
    _changed()
    return table[key]


def register_layer(key, **fields) -> LayerSpec:
    """Declare what the passes should know about ``key`` (a layer/op class, a class name, or an
    activation function); fields not given keep their earlier value. Returns the user's record.

    Example, a custom linear layer ``y = x @ self.w + self.b`` with its propagation rule::

        autoinit_tf.rules.register_layer(MyDense, rule=my_rule, kernel=lambda layer: (layer.w, layer.b),
                                         bias_split=True)
    """
    if not isinstance(key, (type, str)) and not callable(key):
        raise TypeError(f"register_layer expects a class, a class name or a function, got {key!r}.")
    return _merge(_USER, key, _check_fields(dict(fields)))


def unregister_layer(key, *fields) -> None:
    """Forget the user's ``fields`` of ``key`` (all of them when none are named); built-ins stay."""
    spec = _USER.get(key)
    if spec is None:
        return
    if not fields:
        del _USER[key]
        _changed()
        return
    _check_fields(dict.fromkeys(fields))
    spec = dataclasses.replace(spec, **dict.fromkeys(fields))
    if spec == LayerSpec():
        del _USER[key]
    else:
        _USER[key] = spec
    _changed()


def register_rule(layer_class, rule=None):
    """Register ``rule`` for ``layer_class`` (and its subclasses without a rule of their own).

    Usable as ``register_rule(Cls, fn)`` or as the decorator ``@register_rule(Cls)``. A later
    registration for the same class replaces the earlier one; a user rule wins over a built-in one.
    Returns the rule.
    """
    if not isinstance(layer_class, type):
        raise TypeError(f"register_rule expects a class, got {layer_class!r}.")

    def _register(fn):
        if not callable(fn):
            raise TypeError(f"A rule must be callable, got {fn!r}.")
        register_layer(layer_class, rule=fn)
        return fn

    if rule is None:
        return _register
    return _register(rule)


def unregister_rule(layer_class) -> None:
    """Remove the rule the user registered for exactly ``layer_class`` (no-op when there is none)."""
    unregister_layer(layer_class, "rule")


def _candidates(cls):
    """The keys to try for `cls`, most specific first: each class of the MRO, then its name."""
    named = _NAMED[0]
    for c in cls.__mro__:
        yield c
        if named:
            yield c.__name__


def _field(keys, field):
    for key in keys:
        for table in (_USER, _BUILTIN):
            spec = table.get(key)
            if spec is not None:
                value = getattr(spec, field)
                if value is not None:
                    return value, key
    return None, None


def spec_for(op) -> LayerSpec:
    """Everything known about ``op``'s class: each field from the most specific class that sets it
    (``bias_split`` only from the exact class)."""
    cls = op if isinstance(op, type) else type(op)
    hit = _CACHE.get(("spec", cls))
    if hit is None:
        keys = list(_candidates(cls))
        exact = [cls, cls.__name__]
        hit = LayerSpec(**{f: _field(exact if f in _EXACT_ONLY else keys, f)[0] for f in FIELDS})
        _CACHE[("spec", cls)] = hit
    return hit


def kernel_of(op):
    """``(kernel, bias or None)``, the variables of `op`'s ``kernel`` field (what calibration and the
    per-draw rescaling scale), or None when `op` has none."""
    get = spec_for(op).kernel
    if get is None:
        return None
    try:
        kernel, bias = get(op)
    except AttributeError:
        return None
    return (kernel, bias) if kernel is not None else None


def spec_of(key) -> LayerSpec:
    """The record of exactly ``key`` (a function, say), the user's fields over the built-in ones."""
    try:
        return LayerSpec(**{f: _field([key], f)[0] for f in FIELDS})
    except TypeError:  # unhashable key: nothing registered
        return LayerSpec()


def find_rule(op, extra=None):
    """``(rule, class)`` for ``op``: first ``extra`` (a dict class -> rule, e.g. ``wrap(rules=...)``),
    then the registry, by MRO; ``(None, None)`` when there is none."""
    if not extra:
        hit = _CACHE.get(("rule", type(op)))
        if hit is None:
            hit = _CACHE[("rule", type(op))] = _find_rule(type(op), None)
        return hit
    return _find_rule(type(op), extra)


def _find_rule(cls, extra):
    for c in cls.__mro__:
        if extra and c in extra:
            return extra[c], c
        rule, key = _field([c, c.__name__] if _NAMED[0] else [c], "rule")
        if rule is not None:
            return rule, key
    return None, None


def _rules(tables) -> dict:
    out = {}
    for table in tables:
        for key, spec in table.items():
            if spec.rule is not None and isinstance(key, type):
                out[key] = spec.rule
    return out


def registered_rules() -> dict:
    """{class: rule} of every registered rule (the user's over the built-in ones)."""
    return _rules([_BUILTIN, _USER])


def builtin_rules() -> dict:
    """{class: rule} of autoinit-tf's own rules only."""
    return _rules([_BUILTIN])


def snapshot():
    """The user's registrations, to `restore` later (tests, temporary registrations)."""
    return dict(_USER)


def restore(saved) -> list:
    """Put back the user's registrations of a `snapshot`; returns the keys registered since."""
    added = [k for k in _USER if k not in saved]
    _USER.clear()
    _USER.update(saved)
    _changed()
    return added


class BuiltinTable:
    """The built-in declarations of one rule module, collected where the rules are written and
    installed only by `autoinit_tf.rules.builtin.register_builtin_rules` (importing a rule module
    registers nothing)."""

    def __init__(self, module: str):
        self.module = module
        self.entries: list = []

    def declare(self, key, **fields):
        self.entries.append((key, _check_fields(dict(fields))))

    def rule(self, layer_class, rule=None, **fields):
        """``table.rule(Cls, fn)`` or ``@table.rule(Cls)``: the built-in rule of ``Cls`` (plus other
        fields of its record)."""

        def _declare(fn):
            self.declare(layer_class, rule=fn, **fields)
            return fn

        return _declare if rule is None else _declare(rule)


def install_builtin(tables) -> None:
    """Install the declarations of `tables` (in order; a later one adds to or replaces an earlier one)."""
    for table in tables:
        for key, fields in table.entries:
            _merge(_BUILTIN, key, fields)


class FieldView(collections.abc.MutableMapping):
    """One field of the registry as a dict ``{key: value}`` (the keys whose records set it). Setting an
    item registers it for the user; deleting forgets the user's value. Kept for the tables the
    registry replaced (``measure.CALIBRATION_KERNELS``)."""

    def __init__(self, field: str):
        if field not in FIELDS:
            raise ValueError(f"Unknown field {field!r}.")
        self.field = field

    def __getitem__(self, key) -> Any:
        value = getattr(spec_of(key), self.field)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value):
        register_layer(key, **{self.field: value})

    def __delitem__(self, key):
        if getattr(_USER.get(key, LayerSpec()), self.field) is None:
            raise KeyError(key)
        unregister_layer(key, self.field)

    def _keys(self):
        seen = []
        for table in (_BUILTIN, _USER):
            for key, spec in table.items():
                if getattr(spec, self.field) is not None and key not in seen:
                    seen.append(key)
        return seen

    def __iter__(self):
        return iter(self._keys())

    def __len__(self):
        return len(self._keys())

    def __repr__(self):
        return f"FieldView({self.field!r}, {len(self)} entries)"
