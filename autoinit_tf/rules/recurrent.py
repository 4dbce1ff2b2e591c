"""Recurrent rules: SimpleRNN, LSTM, GRU (and their Bidirectional / TimeDistributed wrappers).

The input kernel of every gate is drawn from the input moments (AutoInit: the input contribution
x W to each gate's pre-activation has second moment `signal_variance`); each gate's recurrent
block is an orthogonal (units x units) matrix, so the recurrence neither grows nor shrinks the
state. No closed form exists for the gated state dynamics, so the output moments come from a short
deterministic simulation of the layer itself with the new weights (`stateless_call`: nothing of
the model changes).
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf import distributions
from autoinit_tf.rules.fallback import fallback_rule, probe_moments
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


def _simulated(ctx):
    """The layer's output moments from a short simulation on a probe with the drawn weights: the input
    kernels are exact for the input moments, the state's moments an estimate, so ``calibrate="auto"``
    calibrates the weighted layers after the recurrent one (it calibrated the input kernel itself, which
    moved it by under 1% on the Embedding-LSTM zoo model), not the recurrent layer."""
    out = probe_moments(ctx)
    ctx.estimated_output("output simulated on a probe")
    return out


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
