"""Input moments from a data sample: per model input, the mean and variance of all its entries."""

from __future__ import annotations

import math

import numpy as np

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


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    try:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001
        return np.asarray(x)


def _first_batch(data):
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
    batch = _first_batch(data)
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
        a = _to_numpy(arr)
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
