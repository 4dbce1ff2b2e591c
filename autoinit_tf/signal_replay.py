"""One replay of the graph on real tensors (a visitor of `graph.walk`), side-effect free; optionally
calibrating each weighted layer on the way.

Every layer runs through `autoinit_tf.execute.call_stateless` with the values this replay assigns to
the variables (``values``: the analytic pass's drawn arrays, then the calibrated kernels), so nothing is
assigned here. With ``calibrate=True``, at each weighted layer (in topological order, on the already
calibrated upstream signal) the main kernel is multiplied by the factor that makes the layer's realized
**pre-activation** variance (the output before its fused activation; the output itself for layers
without one) equal the target exactly on this batch (LSUV, Mishkin & Matas 2016):

    s > 0 with Var(s u + c) = s^2 Var(u) + 2 s Cov(u, c) + Var(c) = target

(u the part linear in the kernel, c the bias term). The scaled output is re-used downstream without a
second call, so the pass is linear in the number of layers. Recurrent layers are not linear in their
kernels, but AutoInit's target for them is: each gate's block of the input kernel is scaled so that
the gate's input contribution x W has the target variance (one scale per gate and direction).

What calibration rescales in a layer is the ``kernel`` field of its record in the layer registry
(``bias_split``: the bias term may be computed on one example).
"""

from __future__ import annotations

import math
from collections import ChainMap

import keras
import numpy as np
from keras import ops
from keras import tree

from autoinit_tf import graph, tracing
from autoinit_tf.execute import call_stateless
from autoinit_tf.heap import HeapTrim
from autoinit_tf.report import NodeRow
from autoinit_tf.rules import registry
from autoinit_tf.statistics import (
    as_float,
    example_moments,
    first_example,
    relative_se,
    tensor_stats,
    var_cov,
)

__all__ = ["SignalReplay", "calibration_kernel", "CALIBRATION_KERNELS"]


#: ``{layer class: layer -> (kernel variable, bias variable or None)}``, a view of the ``kernel`` field of
#: the one layer registry (`autoinit_tf.rules.registry`). The layer's main output must be linear in the
#: kernel (plus the bias term), so scaling the kernel by s scales the weighted part by s. Extend it for
#: custom layers: ``CALIBRATION_KERNELS[MyLayer] = lambda layer: (layer.w, layer.b)`` (or
#: ``register_layer(MyLayer, kernel=...)``, with ``bias_split=True`` when the output is exactly kernel
#: part + bias broadcast).
CALIBRATION_KERNELS = registry.FieldView("kernel")


#: ``(kernel, bias)`` that calibration scales for `op`, or None when `op` is not calibratable.
calibration_kernel = registry.kernel_of


def bias_splits(op) -> bool:
    """Whether `op`'s output is exactly (weighted part) + (bias broadcast over the batch), so the bias
    term can be computed on one example (declared for exactly its class)."""
    return bool(registry.spec_for(op).bias_split)


def rnn_cell(layer):
    """The cell of a SimpleRNN/LSTM/GRU-like layer with a 2-D input kernel of ``gates * units`` columns."""
    if not isinstance(layer, keras.layers.RNN):
        return None
    cell = getattr(layer, "cell", None)
    kernel = getattr(cell, "kernel", None)
    units = getattr(cell, "units", None)
    if kernel is None or not isinstance(units, int) or units <= 0 or len(kernel.shape) != 2:
        return None
    return cell if int(kernel.shape[-1]) % units == 0 else None


def recurrent_cells(op):
    """The cells whose input kernels calibration scales (both directions of a Bidirectional), or None."""
    if isinstance(op, keras.layers.Bidirectional):
        cells = [rnn_cell(op.forward_layer), rnn_cell(op.backward_layer)]
        return cells if all(c is not None for c in cells) else None
    cell = rnn_cell(op)
    return None if cell is None else [cell]


def sequence_input(args, kwargs):
    """The (batch, steps, features) input of a recurrent layer call, or None."""
    x = args[0] if args else kwargs.get("sequences", kwargs.get("inputs"))
    if isinstance(x, (list, tuple)) and x:
        x = x[0]
    if x is None or not hasattr(x, "shape") or len(x.shape) != 3:
        return None
    return x


def gate_inputs(x, cells, value=lambda v: v.value):
    """The input contribution x W of every step to the gate pre-activations: (examples * steps, columns),
    the columns of all `cells` side by side (``value(variable)``: the kernel's value in this replay)."""
    x = as_float(x)
    x = ops.reshape(x, (-1, int(x.shape[-1])))
    parts = [ops.matmul(x, ops.cast(value(cell.kernel), x.dtype)) for cell in cells]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


# -- calling one node without side effects ----------------------------------------------------------


def fused_activation(op):
    """The fused activation of a Dense/Conv-like layer when it is not the identity, else None."""
    act = getattr(op, "activation", None)
    if act is None or not callable(act) or not isinstance(op, keras.layers.Layer):
        return None
    if act is keras.activations.linear or getattr(act, "__name__", "") == "linear":
        return None
    if calibration_kernel(op) is None:
        return None  # only layers whose call ends with `self.activation(...)` in the known classes
    return act


class NoActivation:
    """Temporarily set ``layer.activation = None`` (restored on exit) to read the pre-activation."""

    def __init__(self, op, active):
        self.op = op
        self.active = active

    def __enter__(self):
        if self.active:
            self.saved = self.op.__dict__.get("activation", _MISSING)
            object.__setattr__(self.op, "activation", None)
        return self

    def __exit__(self, *exc):
        if self.active:
            if self.saved is _MISSING:
                self.op.__dict__.pop("activation", None)
            else:
                object.__setattr__(self.op, "activation", self.saved)
        return False


_MISSING = object()


def call_with(op, args, kwargs, training, overrides=None):
    """Run `op` on real tensors without side effects (`execute.call_stateless`); ``overrides``
    (``id(variable) -> value``) stand in for the variables' own values."""
    overrides = overrides or {}

    def value(v):
        o = overrides.get(id(v))
        return v.value if o is None else ops.convert_to_tensor(o, dtype=v.dtype)

    return call_stateless(op, args, kwargs, training, value)


# -- the replay --------------------------------------------------------------------------------------


class SignalReplay:
    """One walk over the graph with real tensors; optionally calibrates weighted layers.

    ``record=False`` (calibration whose report nobody reads) skips the statistics and rows of the nodes
    that are not calibrated: less time and no full-size temporaries for them.
    """

    def __init__(self, fn, *, training, calibrate=False, targets=None, signal_variance=1.0, only=None,
                 record=True, prior=None, values=None, moving_statistics=False, step=1.0,
                 statistics_batch=None, rng_seed=0):
        self.fn = fn
        # Dropout and other random layers draw from their seed generators' states, which a replay hands in
        # (and never advances): those states are Keras' per-process defaults unless the user seeded Keras, so
        # they are replaced by states derived from `rng_seed` (`seed_states`), never assigned: the same
        # masks in every process for the same seed. None: the layers' own states.
        self.rng_states = {} if rng_seed is None else seed_states(fn, rng_seed)
        # Layers that normalize by batch statistics (the registry's ``mixes_examples``, BatchNormalization)
        # run in training mode on consecutive chunks of this many examples, as training will run them: with
        # heavy-tailed per-example energies (squeeze-and-excitation gates) what a layer downstream of them
        # sees depends on the batch size (MobileNetV3Small calibrated on 372 examples at once: its logits
        # 1.016 in batches of 368, 0.844 in batches of 64). None: the whole batch at once.
        self.statistics_batch = None if statistics_batch is None else max(int(statistics_batch), 1)
        # Each kernel moves by s ** step of the scale s its batch asks for: 1 for a first round; 1/k for the
        # k-th round on a fresh batch, so the factors average the rounds' estimates (stochastic
        # approximation: the error falls as 1/sqrt(rounds) with one batch in memory at a time).
        self.step = float(step)
        self.moving_statistics = moving_statistics  # set batch-normalizing layers' moving statistics
        # id(variable) -> the value it stands for during this replay (the analytic pass's drawn
        # arrays, then the calibrated kernels): calibration writes here and never assigns, so a
        # failure anywhere leaves every variable as it was.
        self.values = {} if values is None else values
        # what the layers compute with: the values above (updated as kernels are calibrated), then the seed states
        self.computed = ChainMap(self.values, self.rng_states)
        self.training = training
        self.calibrate = calibrate
        self.targets = targets or {}
        self.signal_variance = float(signal_variance)
        self.only = only  # names of rows to calibrate (None: every calibratable layer)
        self.record = record
        self.stats = {}  # id(KerasTensor) -> TensorStats (symbolic ids are stable; values are freed by the walk)
        self.rows = []
        self.trim = HeapTrim(trim_now=True)
        self.factors = {}  # row name -> scale factor applied (a tuple per gate for recurrent layers)
        self.rse = {}  # row name -> relative standard error of its calibrated variance on this batch
        self.prior = prior or {}  # row name -> factor an earlier calibration round applied
        self.widest = 0  # the most elements per example of any node output seen
        self.batch = None
        self.input_batch = None
        self.calibrated_ops = set()

    def stats_of(self, v, kt=None, produced=False):
        """Statistics of value `v` of symbolic tensor `kt`.

        Values are recorded when produced (overwriting an earlier call of the same nested model) and looked
        up by their consumers; a value not recorded (a nested model's input) is measured again.
        """
        if not produced and kt is not None:
            hit = self.stats.get(id(kt))
            if hit is not None:
                return hit
        s = tensor_stats(v)
        if produced and kt is not None:
            self.stats[id(kt)] = s
        return s

    def run(self, inputs):
        flat_inputs = tree.flatten(inputs)
        self.input_batch = int(flat_inputs[0].shape[0]) if flat_inputs and len(flat_inputs[0].shape) else None
        if self.record:
            for kt, v in zip(self.fn.inputs, tree.flatten(inputs)):
                self.stats_of(v, kt, produced=True)
        # Layers without a rule are walked inside, as the analytic pass does, where their call traces
        # (`tracing`), traced again at the real tensors' shapes where they need concrete shapes.
        tracer = tracing.CallTracer()
        tracer.settle(self.fn)
        return graph.walk(self.fn, inputs, self.visit, expand=tracer)

    def visit(self, node, args, kwargs, site):
        self.trim()
        for kt in node.outputs:
            self.widest = max(self.widest, per_example_elements(kt))
        op = node.operation
        name = site.name
        record = self.record
        in_stats = []
        if record:
            sym = tree.flatten((node.arguments.args, node.arguments.kwargs))
            filled = tree.flatten((args, kwargs))
            in_stats = [self.stats_of(v, kt).moments for kt, v in zip(sym, filled)
                        if isinstance(kt, keras.KerasTensor)]
        layer = isinstance(op, keras.layers.Layer)
        act = fused_activation(op)
        kern = calibration_kernel(op) if layer else None
        cells = recurrent_cells(op) if layer and kern is None else None
        notes = []
        pre_stats = None
        if self.calibrate and (kern is not None or cells is not None) and self._wants(op, name):
            if kern is not None:
                self._calibrate_inner(op, name, args, kwargs)
                outs, pre_stats, note = self._calibrated_call(op, name, args, kwargs, kern, act)
            else:
                outs, pre_stats, note = self._calibrated_recurrent(op, name, args, kwargs, cells)
            notes.append(note)
        else:
            moments = None
            if self.moving_statistics and layer and getattr(op, "trainable", True):
                moments = self._measure_moving_statistics(op, args, kwargs)
            with NoActivation(op, act is not None):
                if self._in_chunks(op, args):
                    outs = self._chunked_call(op, args, kwargs, moments)
                else:
                    outs = call_with(op, args, kwargs, self.training, self._overrides())
            if act is not None:
                pre_stats = tensor_stats(outs) if record else None
                outs = act(outs)
            elif cells is not None and record:
                x = sequence_input(args, kwargs)
                pre_stats = None if x is None else tensor_stats(gate_inputs(x, cells, self.value))
        if not record:
            if notes:
                self.rows.append(NodeRow(name=name, type=type(op).__name__, inputs=[], outputs=[],
                                         rule="measured", notes=notes, weighted=True))
            return outs
        flat = tree.flatten(outs)
        out_kts = node.outputs if len(node.outputs) == len(flat) else [None] * len(flat)
        out_stats = [self.stats_of(v, kt, produced=True) for v, kt in zip(flat, out_kts)]
        self.rows.append(
            NodeRow(
                name=name,
                type=type(op).__name__,
                inputs=in_stats,
                outputs=[s.moments for s in out_stats],
                rule="measured",
                notes=notes,
                weighted=kern is not None or cells is not None,
                channel=[s.channel() for s in out_stats],
                preactivation=None if pre_stats is None else pre_stats.moments,
            )
        )
        return outs

    def _in_chunks(self, op, args) -> bool:
        """Whether `op` runs on chunks of `statistics_batch` examples (see ``__init__``)."""
        if not self.training or self.statistics_batch is None or not isinstance(op, keras.layers.Layer):
            return False
        if not registry.spec_for(op).mixes_examples or not getattr(op, "trainable", True):
            return False  # a frozen BatchNormalization normalizes by its moving statistics, even in training
        x = args[0] if args else None
        return x is not None and hasattr(x, "shape") and len(x.shape) >= 1 and x.shape[0] is not None \
            and int(x.shape[0]) > self.statistics_batch

    def _chunks(self, n):
        size = self.statistics_batch
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def _chunked_call(self, op, args, kwargs, moments=None):
        """`op` on consecutive chunks of `statistics_batch` examples (the last one shorter), concatenated;
        batch-sized keyword tensors (a mask) are cut alike. ``moments``: the full chunks' statistics when
        `_measure_moving_statistics` already computed them."""
        n = int(args[0].shape[0])
        if type(op) is keras.layers.BatchNormalization and len(args) == 1 and kwargs.get("mask") is None:
            return self._chunked_batch_norm(op, args[0], moments)

        def cut(v, a, b):
            return v[a:b] if hasattr(v, "shape") and len(v.shape) >= 1 and v.shape[0] == n else v

        outs = []
        for a, b in self._chunks(n):
            outs.append(call_with(op, (args[0][a:b],) + tuple(cut(v, a, b) for v in args[1:]),
                                  {k: cut(v, a, b) for k, v in kwargs.items()}, self.training, self._overrides()))
        if isinstance(outs[0], (list, tuple)):
            return type(outs[0])(ops.concatenate([o[i] for o in outs], axis=0) for i in range(len(outs[0])))
        return ops.concatenate(outs, axis=0)

    def _full_chunk_moments(self, x, axis, dtype=None, moments=True):
        """The full chunks of `x` as a leading axis, (chunks, size, ...), and each chunk's mean and variance
        per channel of `axis` (keepdims), in `dtype`; (None, None, None) when there is no full chunk.
        ``moments=False``: the chunks only (mean and variance None)."""
        n, size = int(x.shape[0]), self.statistics_batch
        if n < size:
            return None, None, None
        rank = len(x.shape)
        xs = x[:(n // size) * size]
        xs = ops.reshape(xs if dtype is None else ops.cast(xs, dtype), (n // size, size) + tuple(int(d) for d in x.shape[1:]))
        if not moments:
            return xs, None, None
        axes = tuple(i + 1 for i in range(rank) if i != axis)
        mean, var = ops.moments(xs, axes, keepdims=True)  # mean of squared differences, one fused pass for them
        return xs, mean, var

    def _chunked_batch_norm(self, op, x, moments=None):
        """Keras' BatchNormalization in training mode with each chunk's own statistics, all full chunks in one
        set of ops (the chunks as a leading axis): (x - mean_chunk) / sqrt(var_chunk + eps) * gamma + beta
        per channel, moments in float32 at least (as Keras computes them); the shorter last chunk by Keras."""
        n, rank = int(x.shape[0]), len(x.shape)
        axis = int(op.axis) % rank
        dtype = x.dtype
        compute = "float32" if keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16") else dtype
        xs, mean, var = self._full_chunk_moments(x, axis, compute, moments=moments is None)
        if moments is not None and xs is not None:  # the same statistics, already taken for the moving ones
            mean, var = (ops.cast(m, compute) for m in moments)
        parts = []
        if xs is not None:
            # one multiply-add over the activation: y = x a + b, a = gamma / sqrt(var + eps), b = beta - mean a
            shape = [1] * (rank + 1)
            shape[axis + 1] = -1
            a = ops.rsqrt(var + op.epsilon)
            if op.scale:
                a = a * ops.reshape(ops.cast(self.value(op.gamma), compute), shape)
            b = -mean * a
            if op.center:
                b = b + ops.reshape(ops.cast(self.value(op.beta), compute), shape)
            y = xs * a + b
            parts.append(ops.cast(ops.reshape(y, (int(xs.shape[0]) * int(xs.shape[1]),) + tuple(x.shape[1:])), dtype))
        full = 0 if xs is None else int(xs.shape[0]) * int(xs.shape[1])
        if full < n:
            parts.append(call_with(op, (x[full:],), {}, self.training, self._overrides()))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)

    def _measure_moving_statistics(self, op, args, kwargs):
        """For a layer that normalizes by batch statistics, its moving mean and variance become the
        statistics of its input on this (already calibrated) replay, per channel: with `statistics_batch`,
        the average over the chunks of each chunk's mean and variance (what training's moving averages
        of per-batch statistics converge to), each chunk weighted by its examples. Returns the full
        chunks' (mean, var) for the chunked call to reuse, or None."""
        get = registry.spec_for(op).moving_statistics
        x = args[0] if args else kwargs.get("inputs")
        if get is None or x is None or not hasattr(x, "shape"):
            return None
        mean_var, var_var, axis = get(op)
        x = as_float(x)
        rank = len(x.shape)
        axis = int(axis if not isinstance(axis, (list, tuple)) else axis[-1]) % rank
        axes = tuple(i for i in range(rank) if i != axis)

        def whole(t):
            return ops.moments(t, axes)

        chunked = None
        if self._in_chunks(op, (x,)) and axis != 0:
            xs, means, variances = self._full_chunk_moments(x, axis)
            chunked = (means, variances)
            n, full = int(x.shape[0]), int(xs.shape[0]) * int(xs.shape[1])
            mean = ops.reshape(ops.sum(means, axis=0), (-1,)) * int(xs.shape[1])
            var = ops.reshape(ops.sum(variances, axis=0), (-1,)) * int(xs.shape[1])
            if full < n:
                m, v = whole(x[full:])
                mean, var = mean + m * (n - full), var + v * (n - full)
            mean, var = mean / n, var / n
        else:
            mean, var = whole(x)
        self._set(mean_var, ops.cast(ops.reshape(mean, mean_var.shape), mean_var.dtype))
        self._set(var_var, ops.cast(ops.reshape(var, var_var.shape), var_var.dtype))
        return chunked

    def value(self, variable):
        """The value `variable` stands for in this replay."""
        v = self.values.get(id(variable))
        return variable.value if v is None else ops.convert_to_tensor(v, dtype=variable.dtype)

    def _set(self, variable, value):
        self.values[id(variable)] = value

    def _overrides(self, extra=None):
        """What the layers compute with (`computed`), `extra` first."""
        return self.computed.new_child(extra) if extra else self.computed

    def _wants(self, op, name):
        if id(op) in self.calibrated_ops:
            return False  # a shared layer is calibrated on its first call
        if not getattr(op, "trainable", True):
            return False
        return self.only is None or name in self.only

    def _calibrate_inner(self, op, name, args, kwargs):
        """Calibrate the linear sublayers `op`'s record names (``inner``, e.g. an attention layer's
        query, key and value projections) on their own inputs, before `op`'s own kernel: each is run
        once more on its input, and its rescaled kernel is what `op`'s call then uses. Their factors
        are reported as ``<name>/<sublayer name>``."""
        get = registry.spec_for(op).inner
        if get is None:
            return
        for sub, x in get(op, args, kwargs):
            kern = calibration_kernel(sub)
            if kern is None or not getattr(sub, "trainable", True) or id(sub) in self.calibrated_ops:
                continue
            self._calibrated_call(sub, f"{name}/{sub.name}", (x,), {}, kern, None)

    def _calibrated_recurrent(self, op, name, args, kwargs, cells):
        """Scale each gate's block of the input kernel so its input contribution x W hits the target.

        AutoInit's recurrent rule targets the input contribution x W to each gate's pre-activation (the
        recurrent blocks are orthogonal and keep their scale). x W is linear in the kernel, so one scale per
        gate (and direction) computed on the layer's own input makes it exact on this batch; the layer is
        then run once with the new kernels.
        """
        target = float(self.targets.get(name, self.signal_variance))
        self.calibrated_ops.add(id(op))
        x = sequence_input(args, kwargs)
        factors, problems, rse = [], [], 0.0
        if x is not None:
            for cell in cells:
                units = int(cell.units)
                z = gate_inputs(x, [cell], self.value)
                rse = max(rse, relative_se(*example_moments(as_float(z))))
                gates = int(z.shape[-1]) // units
                var = np.asarray(ops.convert_to_numpy(ops.var(ops.reshape(z, (-1, gates, units)), axis=(0, 2))),
                                 dtype=np.float64)
                del z
                if not np.all(np.isfinite(var) & (var > 0)):
                    problems.append(f"zero or non-finite gate input variance {var.tolist()}")
                    continue
                s = np.sqrt(target / var) ** self.step
                kernel = cell.kernel
                cols = ops.convert_to_tensor(np.repeat(s, units).astype(numpy_dtype(kernel)))
                self._set(kernel, ops.multiply(self.value(kernel), ops.cast(cols, kernel.dtype)))
                factors.extend(float(v) for v in s)
        else:
            problems.append("no sequence input found")
        outs = call_with(op, args, kwargs, self.training, self._overrides())
        pre_stats = tensor_stats(gate_inputs(x, cells, self.value)) if (self.record and x is not None) else None
        if factors:
            self.factors[name] = combine_factors(self.prior.get(name), tuple(factors))
            self.rse[name] = rse
            note = (f"calibrated: input kernel x{format_factor(self.factors[name])} per gate (gate input variance -> "
                    f"{target:.4g}, +-{100 * rse:.2g}% on {int(x.shape[0])} examples)")
            if problems:
                note += f" [{'; '.join(problems)}]"
        else:
            note = f"not calibrated ({'; '.join(problems)})"
        return outs, pre_stats, note

    def _calibrated_call(self, op, name, args, kwargs, kern, act):
        kernel, bias = kern
        target = float(self.targets.get(name, self.signal_variance))
        has_bias = bias is not None and bool(np.any(ops.convert_to_numpy(self.value(bias)) != 0))
        c = None
        with NoActivation(op, act is not None):
            if has_bias and bias_splits(op):
                # Known layers: output = (weighted part u, linear in the kernel) + bias broadcast. Run once
                # with a zero bias (u) and once on the first example with a zero kernel (the bias term c,
                # the same for every example), so no full-size copy of the constant part is made.
                full = call_with(op, args, kwargs, self.training, self._overrides({id(bias): ops.zeros_like(bias.value)}))
                first_args, first_kwargs = first_example(args, kwargs)
                c = tree.flatten(call_with(op, first_args, first_kwargs, self.training,
                                       self._overrides({id(kernel): ops.zeros_like(kernel.value)})))[0]
            else:
                full = call_with(op, args, kwargs, self.training, self._overrides())
                if has_bias:
                    # A registered custom layer: its constant part may depend on the input, so split
                    # y = u + c with a second full call at zero kernel.
                    c = tree.flatten(call_with(op, args, kwargs, self.training,
                                           self._overrides({id(kernel): ops.zeros_like(kernel.value)})))[0]
        flat = tree.flatten(full)
        struct = full if len(flat) > 1 else None
        u, rest = flat[0], flat[1:]
        del full, flat
        if c is not None and not bias_splits(op):
            u = u - c
        vu, rse, cov, vc = var_cov(u, c)
        if int(u.shape[0]) == 1 and (self.input_batch or 1) > 1:
            rse = 0.0  # computed from constants (position ids), the same for every example: nothing sampled
        self.rse[name] = rse
        s, how = solve_scale(vu, cov, vc, target)
        if s is not None and self.step != 1.0:
            s = float(s) ** self.step
        self.calibrated_ops.add(id(op))
        if s is None:
            note = f"not calibrated ({how})"
            pre = u if c is None else u + c
        else:
            # Rescale in the variable's dtype (no float64 or host copy); assigned by the caller once
            # the whole replay succeeded.
            self._set(kernel, ops.multiply(self.value(kernel), ops.cast(s, kernel.dtype)))
            u = u * s  # the unscaled output is freed here, before the bias is added
            pre = u if c is None else u + c
            self.factors[name] = combine_factors(self.prior.get(name), s)
            note = (f"calibrated: kernel x{format_factor(self.factors[name])} (pre-activation var {vu + 2 * cov + vc:.4g} -> "
                    f"{target:.4g}, +-{100 * rse:.2g}% on {int(u.shape[0])} examples)")
            if how:
                note += f" [{how}]"
        del u, c
        pre_stats = tensor_stats(pre) if (act is not None and self.record) else None
        out0 = act(pre) if act is not None else pre
        del pre
        outs = tree.pack_sequence_as(struct, [out0] + rest) if struct is not None else out0
        return outs, pre_stats, note


def seed_states(fn, seed) -> dict:
    """``id(state variable) -> state`` for every seed generator of `fn`'s layers (Keras' ``SeedGenerator``:
    a ``seed_generator_state`` variable holding ``[seed, counter]``): each its own seed, derived from
    `seed` and its place in the model's variables."""
    out = {}
    k = 0
    for v in fn.non_trainable_variables:
        if v.path.rsplit("/", 1)[-1].startswith("seed_generator_state") and tuple(v.shape) == (2,):
            derived = (int(seed) * 1_000_003 + 7919 * k + 1) % 2_147_483_629
            out[id(v)] = np.array([derived, 0]).astype(numpy_dtype(v))
            k += 1
    return out


def per_example_elements(kt) -> int:
    n = 1
    for d in tuple(kt.shape)[1:]:
        n *= int(d) if d is not None else 1
    return n


def combine_factors(prior, s):
    """The total factor of two calibration rounds (elementwise for recurrent tuples)."""
    if prior is None:
        return s
    if isinstance(s, tuple):
        return tuple(float(a) * float(b) for a, b in zip(prior, s))
    return float(prior) * float(s)


def format_factor(factor) -> str:
    if isinstance(factor, tuple):
        return "(" + ", ".join(f"{v:.4g}" for v in factor) + ")"
    return f"{factor:.4g}"


def numpy_dtype(variable):
    try:
        return np.dtype(str(variable.dtype))
    except TypeError:
        return np.float32


def solve_scale(vu, cov, vc, target):
    """s > 0 with Var(s u + c) = s^2 Var(u) + 2 s Cov(u, c) + Var(c) = target, and a reason if inexact."""
    if not (math.isfinite(vu) and vu > 0):
        return None, f"zero or non-finite weighted output variance {vu}"
    if vc == 0.0 and cov == 0.0:
        return math.sqrt(target / vu), ""
    a, b, c0 = vu, 2.0 * cov, vc - target
    disc = b * b - 4.0 * a * c0
    if disc < 0 or c0 >= 0 and b >= 0:
        s = math.sqrt(target / vu)
        return s, f"the bias alone carries variance {vc:.4g} >= target; scaled the weighted part only"
    s = (-b + math.sqrt(disc)) / (2.0 * a)
    if s <= 0:
        return math.sqrt(target / vu), "no positive exact solution; scaled the weighted part only"
    return s, ""


