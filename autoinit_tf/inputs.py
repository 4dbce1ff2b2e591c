"""The model's inputs, for every pass: input moments (given, or from a data sample), the Gaussian probe,
and checked batches of real inputs.

* `resolve_input_moments`: one `Moments` per model input from ``input_moments=`` or ``data=`` (per input,
  the mean and variance of all its entries).
* `probe_arrays`: the deterministic Gaussian probe with those moments, shaped and filled as the model
  declares (`declared`; measurement and calibration).
* `input_arrays` / `replay_inputs`: a data sample checked and cut to the model's inputs.
* `check_input_array`: one refusal for bad samples (empty, complex, non-numeric, NaN/inf), shared by
  ``data=`` and ``calibrate=``.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from autoinit_tf import declared
from autoinit_tf.execute import probe_array, probe_shape
from autoinit_tf.moments import Moments


def check_input_array(a, name, what="data"):
    """Refuse an input sample that cannot stand for real inputs: empty, complex, not numeric, NaN/inf.

    Shared by ``data=`` (input moments) and ``calibrate=`` (the calibration replay), so both refuse
    the same things with the same words.
    """
    a = np.asarray(a)
    if a.size == 0 or (a.ndim and a.shape[0] == 0):
        raise ValueError(f"{what} for input '{name}' is empty (shape {a.shape}): give at least one example.")
    if np.iscomplexobj(a):
        raise ValueError(f"{what} for input '{name}' is complex ({a.dtype}); the model's inputs are real-valued.")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{what} for input '{name}' is not numeric (dtype {a.dtype}).")
    if a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(
                f"{what} for input '{name}' contains NaN or inf ({bad} of {a.size} values); clean or drop those "
                "examples first."
            )


def to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - anything array-like numpy can read
        return np.asarray(x)


def first_batch(data):
    """A batch from a tf.data dataset or any iterable of batches; arrays/dicts/lists pass through."""
    if isinstance(data, (np.ndarray, dict, list, tuple)) or hasattr(data, "__array__"):
        return data
    if hasattr(data, "take") and hasattr(data, "element_spec"):  # tf.data
        data = iter(data)
    if hasattr(data, "__next__") or hasattr(data, "__iter__"):
        batch = next(iter(data))
        if isinstance(batch, tuple) and len(batch) in (2, 3):  # (x, y) or (x, y, w)
            batch = batch[0]
        return batch
    return data


def moments_from_data(fn, data):
    """One `Moments` per input of the functional graph `fn`, computed from `data`."""
    batch = first_batch(data)
    inputs = fn.inputs
    names = [kt.name for kt in inputs]
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"data is missing the model inputs {missing}; it has keys {sorted(batch)}.")
        arrays = [batch[n] for n in names]
    elif isinstance(batch, (list, tuple)):
        arrays = list(batch)
    else:
        arrays = [batch]
    if len(arrays) != len(inputs):
        raise ValueError(
            f"data provides {len(arrays)} arrays but the model has {len(inputs)} inputs ({names})."
        )
    out = []
    for kt, arr in zip(inputs, arrays):
        a = to_numpy(arr)
        want = tuple(kt.shape[1:])
        got = tuple(a.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(
                f"data for input '{kt.name}' has shape {a.shape}, but the model expects (batch,) + {want}."
            )
        check_input_array(a, kt.name, "data")
        a = a.astype(np.float64)
        mean, var = float(a.mean()), float(a.var())
        if not (math.isfinite(mean) and math.isfinite(var)):
            raise ValueError(
                f"data for input '{kt.name}' is too large to take its moments in float64 (mean {mean}, variance {var})."
            )
        if var == 0:
            raise ValueError(f"data for input '{kt.name}' has zero variance: there is no signal to scale against.")
        out.append(Moments(mean, var))
    return out


def check_moments(m, where):
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
        return moments_from_data(fn, data)
    if input_moments is None:
        return default_input_moments(fn)
    if isinstance(input_moments, Moments):
        return [check_moments(input_moments, "input_moments")] * n
    if isinstance(input_moments, dict):
        names = [kt.name for kt in fn.inputs]
        missing = [k for k in names if k not in input_moments]
        if missing:
            raise ValueError(f"input_moments is missing entries for inputs {missing} (inputs: {names}).")
        return [check_moments(input_moments[k], f"input_moments[{k!r}]") for k in names]
    items = list(input_moments)
    if len(items) == 2 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in items):
        return [check_moments(items, "input_moments")] * n
    if len(items) != n:
        raise ValueError(
            f"input_moments has {len(items)} entries but the model has {n} inputs; pass one (mean, var) "
            "pair for all inputs or one per input."
        )
    return [check_moments(m, f"input_moments[{i}]") for i, m in enumerate(items)]


def default_input_moments(fn):
    """One `Moments` per input when none are given: what the model's own preprocessing declares
    (`declared.input_moments`: per channel), else N(0, 1)."""
    out = []
    for declared_input in declared.input_moments(fn):
        if declared_input is None:
            out.append(Moments(0.0, 1.0))
        else:
            out.append(Moments.from_channels(declared_input[0], declared_input[1]))
    return out


def with_constant_inputs(fn, moments, length):
    """`moments` with each padding mask (all ones) and segment-id input (all zeros) of `fn` as that constant
    (`Moments.constant`, one example: unknown non-batch dimensions `length`), as the probe fills them:
    masks built from them inside the model (a causal mask merged with the padding mask) are then known
    exactly to the rules that read them (`engine` folds the ops on constants)."""
    out = list(moments)
    for i, (kt, fill) in enumerate(zip(fn.inputs, declared.input_fills(fn))):
        if fill not in (("ones",), ("zeros",)):
            continue
        shape = probe_shape(kt, 1, length=length)
        value = np.ones(shape, dtype=str(kt.dtype)) if fill == ("ones",) else np.zeros(shape, dtype=str(kt.dtype))
        out[i] = Moments.constant(value)
    return out


#: Salt of the probe generator's seed (the probe is a fixed function of the seed).
PROBE_SALT = 0x5EED


def probe_arrays(fn, input_moments, batch_size, seed):
    """The deterministic Gaussian probe: one array per input of `fn`, ``batch_size`` examples, drawn
    with the given input moments. Unknown non-batch dimensions get the model's declared sequence length
    (`declared.probe_length`); integer inputs are filled by what they are (`declared.input_fills`: padding
    masks ones, segment ids zeros, token ids uniform over the vocabulary of the embedding they feed;
    other integers uniform up to mean + 3 std)."""
    moments = resolve_input_moments(fn, input_moments)
    rng = np.random.default_rng([PROBE_SALT, 0 if seed is None else int(seed)])
    length = declared.probe_length(fn)
    arrays = []
    for kt, m, fill in zip(fn.inputs, moments, declared.input_fills(fn)):
        arrays.append(probe_array(probe_shape(kt, batch_size, length=length), kt.dtype, m, rng, fill=fill))
    return arrays


def input_arrays(fn, x, batch_size):
    """The flat list of input tensors (one per ``fn.inputs``) from an array/dict/list/dataset."""
    batch = first_batch(x)
    names = [kt.name for kt in fn.inputs]
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"x is missing the model inputs {missing}; it has keys {sorted(batch)}.")
        arrays = [batch[n] for n in names]
    elif isinstance(batch, (list, tuple)) and len(fn.inputs) > 1:
        arrays = list(batch)
    else:
        arrays = [batch]
    if len(arrays) != len(fn.inputs):
        raise ValueError(f"x provides {len(arrays)} arrays but the model has {len(fn.inputs)} inputs ({names}).")
    out = []
    for kt, a in zip(fn.inputs, arrays):
        check_input_array(ops.convert_to_numpy(a) if not isinstance(a, np.ndarray) else a, kt.name, "calibrate")
        t = ops.convert_to_tensor(a)
        want, got = tuple(kt.shape[1:]), tuple(t.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(f"x for input '{kt.name}' has shape {tuple(t.shape)}, but the model expects "
                             f"(batch,) + {want}.")
        if batch_size is not None and t.shape[0] is not None and t.shape[0] > batch_size:
            t = t[:batch_size]
        dtype = str(kt.dtype)
        if str(t.dtype) != dtype:
            t = ops.cast(t, dtype)
        out.append(t)
    return out


def replay_inputs(fn, x, batch_size, seed, input_moments):
    """``(tensors, source)``: the probe (``x`` None or ``"probe"``; source ``"probe"``) or the checked
    arrays of a data sample (source ``"data"``), one per input of `fn`."""
    if x is None or (isinstance(x, str) and x == "probe"):
        return [ops.convert_to_tensor(a) for a in probe_arrays(fn, input_moments, batch_size, seed)], "probe"
    if isinstance(x, str):
        raise ValueError(f"Expected 'probe', None or a data sample, got the string {x!r}.")
    return input_arrays(fn, x, batch_size), "data"


def auto_batch(fn, lo=8, hi=1024, elements=1 << 17):
    """A probe batch size: about `elements` input entries, between `lo` and `hi` examples, and never so
    many that the largest activation the graph shows exceeds `declared.ACTIVATION_BYTES` (float32)
    (unknown non-batch dimensions counted at the declared sequence length)."""
    length = declared.probe_length(fn)
    feats = [declared.probe_elements(kt.shape, length) for kt in fn.inputs]
    batch = int(np.clip(elements // max(feats or [1]), lo, hi))
    bound = declared.ACTIVATION_BYTES // (4 * declared.largest_activation(fn, length))
    return max(1, min(batch, int(bound)))
