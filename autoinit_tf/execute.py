"""Running one layer on real tensors without side effects, and the one Gaussian probe generator.

Every pass that runs a layer (measurement, calibration, the probe fallback of the analytic pass) runs it
here, the way ``Layer.__call__`` would but through ``layer.stateless_call``: the layer computes with the
variable values it is handed and returns its would-be state updates, which are dropped. So no weight,
BatchNormalization moving statistic or seed-generator (RNG) state changes, on every backend.

* `call_stateless(op, args, kwargs, training, value)`: the ``training`` flag overrides the recorded one
  (as ``Model.__call__(training=...)`` does) when the layer's ``call`` takes it; under a mixed
  precision policy the autocast scope and the input casts ``Layer.__call__`` would apply are applied
  (``stateless_call`` skips both); ``value(variable)`` gives each variable's value for this call.
  Raw ops (``x + y``, ``keras.ops.relu``...) are plain calls.
* `probe_shape` / `probe_array`: the one Gaussian probe generator (model inputs and single layers):
  entries with given moments; unknown non-batch dimensions get a sequence length, never the batch
  size; integer tensors are filled as `declared.integer_fill` says (masks ones, token ids uniform over
  the vocabulary) or uniform integers up to mean + 3 std.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import keras
import numpy as np
from keras import tree

from autoinit_tf import distributions

__all__ = ["accepts_training", "call_stateless", "current_value", "probe_shape", "probe_array", "DEFAULT_PROBE_LENGTH"]

#: Length given to unknown non-batch dimensions of a probe when the caller knows none
#: (`declared.probe_length` gives the model's own).
DEFAULT_PROBE_LENGTH = 32


def accepts_training(op) -> bool:
    """Whether ``op.call`` takes a ``training`` argument."""
    if getattr(op, "_call_has_training_arg", None) is not None:
        return bool(op._call_has_training_arg)
    try:
        return "training" in inspect.signature(op.call).parameters
    except (TypeError, ValueError):
        return False


def current_value(variable):
    """The variable's own value (the default for `call_stateless`)."""
    return variable.value


def call_stateless(op, args, kwargs, training, value=current_value):
    """Run `op` on real tensors; layers through ``stateless_call`` (state updates are discarded)."""
    if not isinstance(op, keras.layers.Layer):
        return op(*args, **kwargs)
    if not accepts_training(op):
        # As Layer.__call__ does: a ``training`` the caller passed (DINOv2's embeddings call their Conv2D
        # with training=training) is dropped for a call that takes none (stateless_call would pass it on).
        if "training" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    elif training is not None:
        # As keras.Model.__call__(training=...) does: the call's mode overrides the recorded one.
        kwargs = dict(kwargs, training=training)
    tv = [value(v) for v in op.trainable_variables]
    ntv = [value(v) for v in op.non_trainable_variables]
    with autocast_scope(op):
        args, kwargs = convert_inputs(op, args, kwargs)
        outs, _ = op.stateless_call(tv, ntv, *args, **kwargs)
    return outs


def autocast_scope(op):
    """The autocast scope ``Layer.__call__`` would enter (``stateless_call`` enters none): under a mixed
    policy (``mixed_float16``/``mixed_bfloat16``) the float32 variables are read in the compute dtype."""
    from keras.src.backend import AutocastScope, get_autocast_scope, is_float_dtype

    current = get_autocast_scope()
    if not getattr(op, "autocast", True) or not is_float_dtype(op.compute_dtype):
        return AutocastScope(None) if current is not None else contextlib.nullcontext()
    if (current is None and op.compute_dtype != op.variable_dtype) or (
        current is not None and current.dtype != op.compute_dtype
    ):
        return AutocastScope(op.compute_dtype)
    return contextlib.nullcontext()


def convert_inputs(op, args, kwargs):
    """Float inputs cast to the layer's compute dtype, as ``Layer.__call__`` does (masks kept)."""
    policy = getattr(op, "dtype_policy", None)
    if policy is None or op.compute_dtype == op.variable_dtype:
        return args, kwargs

    def convert(x):
        if not hasattr(x, "dtype") or not keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype)):
            return x
        mask = keras.backend.get_keras_mask(x) if hasattr(keras.backend, "get_keras_mask") else None
        y = policy.convert_input(x, op.autocast, op.input_dtype)
        if mask is not None:
            keras.backend.set_keras_mask(y, mask)
        return y

    return tree.map_structure(convert, args), tree.map_structure(convert, kwargs)


def probe_shape(kt, batch, *, batch_axis=True, length=None):
    """The concrete shape of a probe for the symbolic tensor `kt`: the first dimension ``batch`` (when
    ``batch_axis`` or unknown), every other unknown dimension ``length`` (the model's declared sequence
    length, `declared.probe_length`; never the batch size)."""
    if length is None:
        length = DEFAULT_PROBE_LENGTH
    return [batch if i == 0 and (batch_axis or d is None) else (length if d is None else int(d))
            for i, d in enumerate(kt.shape)]


def probe_array(shape, dtype, moments, rng, fill=None):
    """A probe array of `shape`: entries N(mean, var) of `moments` (per channel of the last axis when they have
    channels of its size); integer/bool dtypes follow `fill`
    (`declared.integer_fill`: ``("ones",)``, ``("zeros",)``, ``("uniform", high)``), else uniform integers
    in ``[0, round(mean + 3 std) + 1)`` (at least {0, 1}); other non-float dtypes float32."""
    dtype = str(dtype)
    if "int" in dtype or "bool" in dtype:
        if fill is not None and fill[0] == "ones":
            return np.ones(shape, dtype=dtype)
        if fill is not None and fill[0] == "zeros":
            return np.zeros(shape, dtype=dtype)
        if fill is not None and fill[0] == "uniform" and "bool" not in dtype:
            return rng.integers(0, int(fill[1]), size=shape).astype(dtype)
        hi = max(int(round(moments.mean + 3.0 * math.sqrt(moments.var))) + 1, 2)
        return rng.integers(0, hi, size=shape).astype(dtype)
    # float32 standard normals, drawn in parallel chunks for large probes (`distributions.sample`: a
    # probe of 372 images of 96x96x3 took 0.9 s in float64 on one core), then scaled in place
    x = distributions.sample(shape, 1.0, "untruncated_normal", rng)
    ch_mean, ch_var = getattr(moments, "ch_mean", None), getattr(moments, "ch_var", None)
    if ch_mean is not None and len(shape) >= 2 and shape[-1] == ch_mean.size:
        x *= np.sqrt(np.asarray(ch_var, dtype=np.float64)).astype(np.float32)  # per channel of the last axis
        x += np.asarray(ch_mean, dtype=np.float32)
    else:
        x *= np.float32(math.sqrt(moments.var))
        x += np.float32(moments.mean)
    return x.astype(dtype if "float" in dtype else "float32", copy=False)
