"""Recurrent rules: SimpleRNN, LSTM, GRU (and their Bidirectional / TimeDistributed wrappers).

The input kernel of every gate is drawn from the input moments (AutoInit: the input contribution
x W to each gate's pre-activation has second moment `signal_variance`); each gate's recurrent
block is an orthogonal (units x units) matrix, so the recurrence neither grows nor shrinks the
state. No closed form exists for the gated state dynamics, so the output moments come from a
deterministic simulation of the layer with the new weights on probe sequences (`recurrent_numpy` for
the standard cells, the layer itself through `stateless_call` for others: nothing of the model changes).
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf import distributions
from autoinit_tf.declared import integer_fill
from autoinit_tf.execute import probe_array
from autoinit_tf.moments import Moments
from autoinit_tf.rules import provenance, recurrent_numpy
from autoinit_tf.rules.fallback import array_moments, fallback_rule, probe_moments
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

L = keras.layers


def _gates(cell) -> int:
    units = int(cell.units)
    return int(cell.kernel.shape[-1]) // units


def draw_recurrent_cell(ctx, cell, m=None):
    m = ctx.fit_input if m is None else m
    kernel = cell.kernel
    fan_in = int(kernel.shape[0])
    var = ctx.signal_variance / (fan_in * m.second)
    ctx.draw(kernel, var)
    ctx.weight_scale = var
    rec = getattr(cell, "recurrent_kernel", None)
    if rec is not None and ctx.may_reinit(rec):
        units = int(cell.units)
        blocks = []
        for g in range(_gates(cell)):
            rng = ctx.rng(rec, salt=f"/gate{g}")
            blocks.append(distributions.sample((units, units), 1.0 / units, "orthogonal", rng))
        ctx.assign(rec, np.concatenate(blocks, axis=1))


def _rnn_rule(ctx):
    draw_recurrent_cell(ctx, ctx.layer.cell)
    return _simulated(ctx)


#: Probe sequences of the NumPy simulation: as many as fit in about this many entries of one time-major
#: array (time x the wider of input and output features, per sequence) and in about `SIMULATION_FLOPS`
#: multiply-adds of the recurrence, between the two bounds (a long, wide layer gets few sequences: its
#: estimate's error is then larger than `EXACT_RSE` and it stays an estimate).
SIMULATION_ELEMENTS = 1 << 21
SIMULATION_FLOPS = 1 << 32
MIN_SEQUENCES, MAX_SEQUENCES = 2, 1024
#: A simulated output is taken as exact (``calibrate="auto"`` leaves what it feeds alone) when its probe is
#: the input's exact distribution, of at least `EXACT_MIN_SEQUENCES` sequences (so that the error estimate
#: is itself reliable), and the relative standard error of its variance is at most `EXACT_RSE`: far inside
#: the [0.8, 1.25] band, and tighter than a calibration's own estimate.
EXACT_RSE = 0.02
EXACT_MIN_SEQUENCES = 64


def _simulated(ctx):
    """The layer's output moments from a simulation on probe sequences with the drawn weights.

    The standard layers run in NumPy (`recurrent_numpy`: one matrix product per step for the whole batch of
    sequences, hundreds of them for the cost of a few Keras steps); others run through Keras on a small probe.
    The input kernels are exact for the input moments; the output is exact up to the simulation's sampling
    error when the probe is the input's exact distribution (the rows of the Embedding that feeds the layer
    for uniform token ids, or the realized output of a layer simulated that way) and that error is at most
    `EXACT_RSE` on at least `EXACT_MIN_SEQUENCES` sequences. Otherwise it is an estimate: ``calibrate="auto"`` calibrates the weighted layers after the
    recurrent one (it calibrated the input kernel itself, which moved it by under 1% on the Embedding-LSTM
    zoo model), not the recurrent layer."""
    why = recurrent_numpy.unsupported(ctx.layer)
    if why is None and len(ctx.node.input_tensors) != 1:
        why = "initial states or constants passed in"
    if why is not None:
        out = probe_moments(ctx)
        ctx.estimated_output(f"output simulated on a probe through Keras ({why})")
        return out
    x, exact, source = _sequence_probe(ctx)
    outs = recurrent_numpy.run(ctx.layer, x, ctx.value)
    cache = ctx.probe_cache
    if cache is not None and len(outs) == len(ctx.node.outputs):
        for kt, y in zip(ctx.node.outputs, outs):
            cache[id(kt)] = y
            if exact:
                ctx.exact_probes.add(id(kt))
    rse = _variance_rse(outs[0])
    text = f"output simulated on {x.shape[0]} probe sequences ({source}): variance +-{100 * rse:.1f}%"
    ctx.note(text)
    if not (exact and rse <= EXACT_RSE and x.shape[0] >= EXACT_MIN_SEQUENCES):
        ctx.estimated_output(text)
    result = [array_moments(y, covariance=True) for y in outs]
    return result if len(result) > 1 else result[0]


def _variance_rse(y) -> float:
    """Relative standard error of the variance of `y` (examples on the first axis), by the delta method:
    V = mean(q) - mean(m)^2 over per-example means m and mean squares q moves by q - 2 mean(m) m."""
    flat = y.reshape(y.shape[0], -1).astype(np.float64)
    m, q = flat.mean(axis=1), (flat * flat).mean(axis=1)
    mu = float(m.mean())
    var = float(q.mean()) - mu * mu
    if var <= 0 or len(m) < 2:
        return float("inf")
    return float((q - 2.0 * mu * m).std() / np.sqrt(len(m)) / var)


def _cells(layer):
    """The recurrent cells `layer` runs (both directions of a Bidirectional)."""
    if isinstance(layer, L.Bidirectional):
        return [layer.forward_layer.cell, layer.backward_layer.cell]
    return [layer.cell]


def _sequence_probe(ctx):
    """Probe sequences (batch, time, features) for the layer's input, whether they follow the input's exact
    distribution, and what they are."""
    kt = ctx.node.input_tensors[0]
    cache = ctx.probe_cache
    if cache is not None and id(kt) in cache:
        x = np.asarray(keras.ops.convert_to_numpy(cache[id(kt)]), dtype=np.float32)
        return x, id(kt) in ctx.exact_probes, "the realized output of the layer before"
    time = int(kt.shape[1] if kt.shape[1] is not None else ctx.probe_length)
    features = int(kt.shape[-1])
    width = max(features, int(ctx.output_shapes[0][-1] or 1))
    flops = sum(time * _gates(cell) * int(cell.units) * (features + int(cell.units)) for cell in _cells(ctx.layer))
    n = min(SIMULATION_ELEMENTS // max(time * width, 1), SIMULATION_FLOPS // max(flops, 1))
    n = int(np.clip(n, MIN_SEQUENCES, MAX_SEQUENCES))
    rng = ctx.rng(ctx.layer.weights[0], salt="/probe sequences")
    producer, node = provenance.producer(kt)
    if type(producer) is keras.layers.Embedding and not producer.mask_zero and node.input_tensors:
        ids_kt = node.input_tensors[0]
        fill = integer_fill(ids_kt.name, [producer]) or ("uniform", int(producer.input_dim))
        ids = probe_array((n, time), "int32", Moments(0.0, 1.0), rng, fill=fill)
        table = np.asarray(ctx.value(producer.embeddings), dtype=np.float32)
        return table[ids], True, f"rows of {producer.name} for token ids {fill[0]}"
    return probe_array((n, time, features), "float32", ctx.input, rng), False, \
        "Gaussian with the input's moments"


for _cls in (L.SimpleRNN, L.LSTM, L.GRU):
    BUILTIN.rule(_cls, _rnn_rule)


@BUILTIN.rule(L.Bidirectional)
def bidirectional_rule(ctx):
    layer = ctx.layer
    for sub in (layer.forward_layer, layer.backward_layer):
        cell = getattr(sub, "cell", None)
        if cell is not None and hasattr(cell, "kernel"):
            draw_recurrent_cell(ctx.sub(sub), cell, ctx.fit_input)
    return _simulated(ctx)


@BUILTIN.rule(L.TimeDistributed)
def time_distributed_rule(ctx):
    """The inner layer's own rule, on shapes without the time axis."""
    inner = ctx.layer.layer
    rule = ctx.rule_for(inner)
    if rule is None:
        return fallback_rule(ctx)
    strip = [tuple(s[:1]) + tuple(s[2:]) for s in ctx.input_shapes]
    strip_out = [tuple(s[:1]) + tuple(s[2:]) for s in ctx.output_shapes]
    child = ctx.sub(inner, input_shapes=strip, output_shapes=strip_out)
    out = rule(child)
    ctx.weight_scale = child.weight_scale
    return out
