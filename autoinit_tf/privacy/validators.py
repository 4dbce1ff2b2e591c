"""Model checks before DP-SGD: what would break the per-example sensitivity bound.

DP-SGD's guarantee rests on one fact: removing one example from a batch changes the clipped
gradient sum by at most ``C``. That holds only when each example's gradient depends on that
example alone. Two checks, both run by :func:`autoinit_tf.privacy.make_private`:

* **known classes** (fast, with the best advice): BatchNormalization and the other classes the
  layer registry declares ``mixes_examples=True`` (:data:`EXAMPLE_MIXING_LAYERS` is a view of it),
  any layer with a ``mixes_examples = True`` attribute, activity regularizers.
* **a probe, independent of names**: the model runs twice in training mode on a small batch
  (same weights, same random state, inside a ``keras.StatelessScope`` so nothing is changed),
  the second time with example 0 replaced. Every layer call is recorded; a layer whose inputs
  for examples ``1..B-1`` are identical in both runs but whose outputs for them differ mixes
  examples, and is named in an :class:`ExampleMixingLayerError`. The same run collects the
  terms added with ``add_loss`` during ``call``: DP-SGD differentiates only the compiled loss
  (clipped per example), so such a term would be silently dropped, and it is refused instead.
"""

from __future__ import annotations

import collections.abc
import contextlib

import keras
import numpy as np

from autoinit_tf import graph
from autoinit_tf.rules import registry
from autoinit_tf.rules.builtin import register_builtin_rules

class _MixingLayers(collections.abc.MutableMapping):
    """``{class name: replacement advice}`` of the layer classes declared as mixing examples: a view of
    the ``mixes_examples`` / ``advice`` fields of the one layer registry (`autoinit_tf.rules.registry`),
    where the built-ins (BatchNormalization, the paper's batch layers) are declared with their rules.
    The probe finds others; these give the refusal before any call, with the best advice."""

    def _table(self):
        register_builtin_rules()
        out = {}
        for key in registry.FieldView("mixes_examples"):
            spec = registry.spec_of(key)
            if spec.mixes_examples:
                out[key if isinstance(key, str) else key.__name__] = spec.advice or DEFAULT_ADVICE
        return out

    def __getitem__(self, name):
        return self._table()[name]

    def __setitem__(self, name, advice):
        registry.register_layer(str(name), mixes_examples=True, advice=str(advice))

    def __delitem__(self, name):
        registry.unregister_layer(str(name), "mixes_examples", "advice")

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())


DEFAULT_ADVICE = "GroupNormalization (or LayerNormalization)"

#: Layer classes declared as mixing examples, by class name, with the advice given when refusing them.
EXAMPLE_MIXING_LAYERS = _MixingLayers()

#: Examples in the independence probe.
PROBE_BATCH = 4


class ExampleMixingLayerError(ValueError):
    """The model has a layer that mixes examples of a batch: per-example privacy would not hold."""


class DataDependentLossError(ValueError):
    """The model adds a data-dependent loss (``add_loss`` in ``call``) that DP-SGD cannot clip."""


def register_example_mixing_layer(class_name, replacement: str = "GroupNormalization"):
    """Declare another layer class (a class, or its name) as mixing examples, so make_private refuses
    it before probing (``register_layer(cls, mixes_examples=True, advice=replacement)``)."""
    key = class_name if isinstance(class_name, type) else str(class_name)
    registry.register_layer(key, mixes_examples=True, advice=str(replacement))


def all_layers(model):
    """Every layer inside ``model``, nested ones included (not the model itself)."""
    return graph.layer_tree(model, include_self=False)


def find_example_mixing_layers(model):
    """``[(layer, class_name, replacement)]`` for every layer of a known example-mixing class."""
    register_builtin_rules()
    found = []
    for layer in all_layers(model):
        if getattr(layer, "mixes_examples", False):
            found.append((layer, type(layer).__name__, "a per-example normalization"))
            continue
        spec = registry.spec_for(layer)
        if spec.mixes_examples:
            found.append((layer, type(layer).__name__, spec.advice or DEFAULT_ADVICE))
    return found


def check_known_layers(model):
    """Refuse known example-mixing classes and activity regularizers (no model call)."""
    mixing = find_example_mixing_layers(model)
    if mixing:
        names = ", ".join(f"{layer.name!r} ({cls})" for layer, cls, _ in mixing)
        repl = sorted({r for _, _, r in mixing})
        raise ExampleMixingLayerError(
            f"DP-SGD needs per-example gradients, but these layers mix the examples of a batch "
            f"(batch statistics): {names}. Replace them with {' / '.join(repl)} -- the "
            "`bn->groupnorm` swap, e.g. autoinit_tf.wrap(model, swaps=['bn->groupnorm']) -- before "
            "make_private (a per-example normalization such as GroupNormalization keeps each "
            "example's gradient independent of the others)."
        )
    activity = [layer.name for layer in all_layers(model) if getattr(layer, "activity_regularizer", None) is not None]
    if activity:
        raise ValueError(
            f"Layers {activity} have an activity_regularizer: it is a data-dependent loss that "
            "DP-SGD would have to clip per example; remove it (weight regularizers are fine)."
        )


# ------------------------------------------------------------------------------ the probe
def probe_inputs(model, batch: int = PROBE_BATCH, seed: int = 0):
    """A random batch for the model's declared inputs: N(0, 1) floats, integers in {0, 1}.

    Unknown non-batch dimensions become 4. Raises ``ValueError`` when the model declares no
    inputs (a subclassed model): pass ``probe_inputs=`` to make_private then.
    """
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            "make_private checks on a probe batch that no example's output depends on the other "
            "examples, but this model declares no inputs (a subclassed model). Pass a few real "
            "input examples: make_private(model, ..., probe_inputs=x_train[:4])."
        )
    rng = np.random.default_rng(seed)
    arrays = []
    for t in inputs:
        shape = (batch,) + tuple(4 if d is None else int(d) for d in t.shape[1:])
        dtype = keras.backend.standardize_dtype(t.dtype)
        if "int" in dtype or dtype == "bool":
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            arrays.append(rng.normal(size=shape).astype(dtype))
    return keras.tree.pack_sequence_as(model._inputs_struct, arrays) if hasattr(model, "_inputs_struct") else (
        arrays[0] if len(arrays) == 1 else arrays
    )


def _perturb_first(x, seed=1):
    """A copy of ``x`` with example 0 replaced (floats redrawn and shifted, integers 0 <-> 1)."""
    rng = np.random.default_rng(seed)

    def one(a):
        a = np.array(a, copy=True)
        if a.dtype.kind in "iub":
            a[0] = 1 - a[0] if a.dtype.kind != "b" else ~a[0]
        else:
            a[0] = a[0] + 1.0 + rng.normal(size=a[0].shape).astype(a.dtype)
        return a

    return keras.tree.map_structure(one, x)


class _CallRecorder:
    """Record (layer, inputs, outputs, start, end) of every Keras layer call while active."""

    def __init__(self):
        self.calls = []
        self._clock = 0

    @contextlib.contextmanager
    def active(self):
        from keras.src.layers.layer import Layer

        original = Layer.__call__
        recorder = self

        def recording_call(layer, *args, **kwargs):
            start = recorder._clock
            recorder._clock += 1
            out = original(layer, *args, **kwargs)
            recorder.calls.append((layer, (args, kwargs), out, start, recorder._clock))
            recorder._clock += 1
            return out

        Layer.__call__ = recording_call
        try:
            yield self
        finally:
            Layer.__call__ = original


def _rows(structure, batch):
    """Float copies of every tensor leaf with leading dimension ``batch``, rows 1.. only."""
    rows = []
    for leaf in keras.tree.flatten(structure):
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0 or leaf.shape[0] != batch:
            continue
        try:
            a = np.asarray(keras.ops.convert_to_numpy(leaf))
        except Exception:  # noqa: BLE001 - a leaf that is not a tensor (mask object etc.)
            continue
        if a.dtype.kind not in "fiub":
            continue
        rows.append(a[1:].astype(np.float64))
    return rows


def _differ(a_rows, b_rows):
    if len(a_rows) != len(b_rows):
        return True
    for a, b in zip(a_rows, b_rows):
        if a.shape != b.shape:
            return True
        scale = 1.0 + float(np.max(np.abs(a))) if a.size else 1.0
        if a.size and float(np.max(np.abs(a - b))) > 1e-5 * scale:
            return True
    return False


#: Random states the probe runs under (a random layer may mix little under one draw: MixUp's
#: weight from Beta(0.2, 0.2) is often within 1e-3 of 1).
PROBE_TRIALS = 3


def is_seed_state(variable) -> bool:
    """A random layer's seed-generator state variable."""
    path = getattr(variable, "path", "") or getattr(variable, "name", "")
    return path.split("/")[-1].startswith("seed_generator_state")


def _run(model, x, trial=0):
    """One training-mode forward pass that changes no state: (recorded calls, add_loss terms).

    Random layers draw from their seed state moved by ``trial`` (same trial, same draws)."""
    mapping = []
    for v in model.variables:
        value = v.value
        if trial and is_seed_state(v):
            value = value + keras.ops.cast(keras.ops.convert_to_tensor([7919 * trial, 104729 * trial]), value.dtype)
        mapping.append((v, value))
    recorder = _CallRecorder()
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        with recorder.active():
            model(x, training=True)
        added = list(scope.losses)
    return recorder.calls, added


def check_example_independence(model, x=None):
    """Refuse a model whose output for one example depends on the other examples of the batch.

    Runs the model twice in training mode (same weights and random state, no state changed),
    the second time with example 0 replaced, and compares every layer call's rows for examples
    ``1..B-1``. The innermost layer whose inputs for those examples were unchanged but whose
    outputs changed is named in an :class:`ExampleMixingLayerError`. Also refuses
    data-dependent ``add_loss`` terms (:class:`DataDependentLossError`).

    Args:
        model: a built Keras model.
        x: a batch of at least two inputs (default: :func:`probe_inputs`).
    """
    if x is None:
        x = probe_inputs(model)
    x = keras.tree.map_structure(np.asarray, x)
    batch = keras.tree.flatten(x)[0].shape[0]
    if batch < 2:
        raise ValueError(f"The independence probe needs at least 2 examples, got {batch}.")
    calls_a, added = _run(model, x)
    if added:
        ids = {id(t) for t in added}
        owners = sorted(
            {f"{layer.name!r} ({type(layer).__name__})" for layer, *_ in calls_a if ids & set(getattr(layer, "_loss_ids", ()))}
        )
        where = f" in {', '.join(owners)}" if owners else ""
        raise DataDependentLossError(
            f"The model adds {len(added)} loss term(s) with add_loss() during call{where}. "
            "DP-SGD trains on the compiled loss only, clipped per example, so these terms would be "
            "silently dropped (and, computed from the whole batch, they cannot be clipped per "
            "example). Remove the add_loss call, or express the term as part of a per-example loss "
            "and pass it as make_private(..., loss_fn=f) with f(y_true, y_pred) -> mean loss. Weight "
            "regularizers (kernel_regularizer=...) are fine: they are added outside clipping."
        )
    for trial in range(PROBE_TRIALS):
        if trial:
            calls_a, _ = _run(model, x, trial)
        culprit = _mixing_culprit(model, calls_a, _run(model, _perturb_first(x), trial)[0], batch)
        if culprit is not None:
            _refuse(model, culprit)


def _mixing_culprit(model, calls_a, calls_b, batch):
    """The innermost layer (or the model itself) whose clean inputs gave changed outputs, or None."""
    if len(calls_a) != len(calls_b):
        return None  # data-dependent control flow: nothing to compare call by call
    culprits = []
    for (layer, args_a, out_a, start, end), (_, args_b, out_b, _, _) in zip(calls_a, calls_b):
        if layer is model:
            continue
        if not _differ(_rows(args_a, batch), _rows(args_b, batch)) and _differ(
            _rows(out_a, batch), _rows(out_b, batch)
        ):
            culprits.append((start, end, layer))
    if not culprits:
        # Mixing in the model's own call (raw ops between the layers of a subclassed model).
        own = [(a, b) for a, b in zip(calls_a, calls_b) if a[0] is model]
        if own and _differ(_rows(own[-1][0][2], batch), _rows(own[-1][1][2], batch)):
            culprits.append((0, 0, model))
        else:
            return None
    # innermost: a culprit whose call interval holds no other culprit's
    innermost = [
        c for c in culprits if not any(o is not c and c[0] < o[0] and o[1] < c[1] for o in culprits)
    ]
    return min(innermost, key=lambda c: c[0])[2]


def _refuse(model, layer):
    what = (
        f"the computation of model {layer.name!r} between its layers (an op over the batch axis?)"
        if layer is model
        else f"layer {layer.name!r} ({type(layer).__name__})"
    )
    raise ExampleMixingLayerError(
        f"DP-SGD needs each example's gradient to depend on that example alone, but {what} mixes "
        "the examples of a batch: on a probe batch, "
        "changing example 0 changed this layer's outputs for the other examples while their "
        "inputs stayed the same. Replace it with a per-example computation (for a normalization, "
        "GroupNormalization or LayerNormalization; the bn->groupnorm swap does this for "
        "BatchNormalization) before make_private: with it, the bound ||S(D) - S(D')|| <= "
        "l2_norm_clip of DP-SGD would not hold."
    )


def check_model(model, probe=None):
    """All checks: a Keras model, no known mixing class, no activity regularizer, the probe."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    check_known_layers(model)
    check_example_independence(model, probe)
