"""The empirical rule: run the op itself on a small deterministic Gaussian probe and measure.

Used for layers without a registered rule (with a warning naming the layer) and by rules that need
a short simulation (recurrent layers, bilinear upsampling). Layers run through `stateless_call`
with the weights this pass is about to assign, in training mode, so nothing is changed: no weight,
no BatchNormalization statistic, no RNG state of the model.
"""

from __future__ import annotations

import zlib

import keras
import numpy as np
from keras import tree

from autoinit_tf.declared import integer_fill, probe_elements
from autoinit_tf.execute import call_stateless, probe_array, probe_shape
from autoinit_tf.moments import Moments

class ProbeFailedError(RuntimeError):
    """A layer measured on a probe (no rule, not traceable) could not run on the probe its inputs' declared
    shapes give: the message names the layer, the shapes, the error, and how to give it a rule."""


PROBE_ELEMENTS = 1 << 15  # per input tensor, about
MAX_PROBE_BATCH = 256


def _probe_batch(node, length):
    sizes = [probe_elements(kt.shape, length) if len(kt.shape) > 1 else 1 for kt in node.input_tensors]
    per = max(sizes) if sizes else 1
    return int(np.clip(PROBE_ELEMENTS // per, 2, MAX_PROBE_BATCH))


def _probe_tensor(op, kt, m, batch, length, rng):
    """A probe for the input `kt` of `op`: the model's sequence length for unknown dims; integer inputs
    filled by what they are (`declared.integer_fill`: token ids uniform over `op`'s vocabulary)."""
    shape = probe_shape(kt, batch, batch_axis=False, length=length)
    return keras.ops.convert_to_tensor(probe_array(shape, kt.dtype, m, rng, fill=integer_fill(kt.name, [op])))


def run_on_probe(ctx, training=True, use_pending=True, seed=0):
    """Call the op of `ctx` on probe tensors drawn from `ctx.inputs`; returns the flat outputs (numpy)."""
    op = ctx.op
    node = ctx.node
    rng = np.random.default_rng([seed, zlib.crc32(op.name.encode())])
    length = ctx.probe_length
    # Inputs produced by another probed op reuse its real output tensor: a chain of simulated layers
    # (stacked LSTMs, say) then sees the realized structure of its input (e.g. correlation in time),
    # not an i.i.d. stand-in with the same moments.
    cache = ctx.probe_cache
    cached = {id(kt): cache[id(kt)] for kt in node.input_tensors if cache is not None and id(kt) in cache}
    batch = int(next(iter(cached.values())).shape[0]) if cached else _probe_batch(node, length)
    probes = {id(kt): cached[id(kt)] if id(kt) in cached else _probe_tensor(op, kt, m, batch, length, rng)
              for kt, m in zip(node.input_tensors, ctx.inputs)}
    args, kwargs = node.arguments.fill_in(probes)
    trainable = {id(v) for v in getattr(op, "trainable_variables", ())}

    def value(v):  # the weights this pass is about to assign (trainable ones), else the current values
        if use_pending and id(v) in trainable:
            return keras.ops.convert_to_tensor(ctx.value(v), dtype=v.dtype)
        return v.value

    try:
        outs = call_stateless(op, args, kwargs, training, value)
    except Exception as exc:  # noqa: BLE001 - said with the layer's name and the remedy
        cls = type(op)
        shapes = ", ".join(str(tuple(p.shape)) for p in probes.values() if hasattr(p, "shape"))
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ProbeFailedError(
            f"Layer '{op.name}' ({cls.__module__}.{cls.__qualname__}) has no rule, so it is measured on a probe "
            f"shaped as its inputs declare ({shapes}), but calling it on that probe failed: {type(exc).__name__}: "
            f"{first} A layer whose declared shapes differ from those it runs at (keras-hub's XLNet declares its "
            f"relative position encoding (None, 1, hidden)) cannot be probed. Register a rule with "
            f"autoinit_tf.register_rule({cls.__name__}, rule) or pass rules={{{cls.__name__}: rule}} to wrap() (see "
            "the README, 'Writing a rule for a custom layer'). No weight was changed.") from exc
    outs = tree.flatten(outs)
    if cache is not None and len(outs) == len(node.outputs):
        for kt, o in zip(node.outputs, outs):
            cache[id(kt)] = o
    return [np.asarray(keras.ops.convert_to_numpy(o), dtype=np.float64) for o in outs]


#: `array_moments(covariance=True)` measures the channel covariance for at most this many channels.
MAX_COVARIANCE_CHANNELS = 1024


def array_moments(y: np.ndarray, covariance: bool = False) -> Moments:
    """The moments of a measured output: per channel of the last axis (channels last) when it has two or
    more axes and is finite, else of its finite entries. ``covariance``: also the covariance between the
    channels (`Moments.ch_cov`, over examples and positions), for up to `MAX_COVARIANCE_CHANNELS`."""
    if not y.size:
        return Moments(0.0, 0.0)
    if y.ndim >= 2 and np.isfinite(y).all():
        flat = y.reshape(-1, y.shape[-1])
        mean = flat.mean(axis=0, dtype=np.float64)
        if covariance and flat.shape[-1] <= MAX_COVARIANCE_CHANNELS:
            centered = flat.astype(np.float64) - mean
            cov = centered.T @ centered / flat.shape[0]
            out = Moments.from_channels(mean, np.diag(cov).copy())
            out.ch_cov = cov
            return out
        return Moments.from_channels(mean, flat.var(axis=0, dtype=np.float64))
    y = y[np.isfinite(y)]
    return Moments(float(y.mean()), float(y.var()))


def probe_moments(ctx, training=True, use_pending=True):
    """Measured moments of every output of the op on a deterministic probe."""
    result = [array_moments(y) for y in run_on_probe(ctx, training=training, use_pending=use_pending)]
    return result if len(result) > 1 else result[0]


def fallback_rule(ctx):
    """Rule used for ops without one: the op's output measured on a probe."""
    return probe_moments(ctx)
