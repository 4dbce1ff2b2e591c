"""Parameter averaging (EMA) for evaluation (De et al.): post-processing, no privacy cost."""

from __future__ import annotations

import contextlib

from autoinit_tf.privacy.state import get_state


def _ema_vars(model):
    state = get_state(model)
    if state.ema is None:
        raise ValueError("No EMA is kept: use make_private(..., ema_momentum=0.999).")
    return state.ema


def swap_in_ema(model):
    """Put the averaged weights into the model; returns the raw weights for :func:`swap_out_ema`."""
    ema = _ema_vars(model)
    raw = [v.numpy() for v in model.trainable_variables]
    for v, e in zip(model.trainable_variables, ema):
        v.assign(e.numpy())
    return raw


def swap_out_ema(model, raw):
    for v, r in zip(model.trainable_variables, raw):
        v.assign(r)


@contextlib.contextmanager
def ema_weights(model):
    """``with privacy.ema_weights(model): model.evaluate(...)`` evaluates the averaged weights."""
    raw = swap_in_ema(model)
    try:
        yield model
    finally:
        swap_out_ema(model, raw)


def ema_values(model):
    """The averaged weights as numpy arrays (order of ``model.trainable_variables``)."""
    return [e.numpy() for e in _ema_vars(model)]
