"""`prepare`: a quantization-aware-training copy of a model, built by one walk of its graph (MQBench's
"prepare by platform").

The walk (`graph.walk` on KerasTensors, nested functional models flattened) replays a clone of the model
(the input model is never touched, nor shares a variable with the result) and

* replaces every Conv/Depthwise/Separable/Dense/EinsumDense by a `QuantizedLayer` (fake-quantized weights,
  per tensor or per channel as the preset says); with `fold_bn` a BatchNormalization that is the only
  consumer of a linear (no activation) conv or Dense output is folded into it (TorchFold, see
  `quantize.layers`), and its node disappears;
* inserts one `FakeQuant` per tensor that the preset's graph level quantizes: level 1 the inputs of
  quantized layers; level 2 also the inputs of Add and of pooling layers (TensorRT); level 3 the inputs of
  every layer and the model's outputs. Integer tensors are never quantized. With the academic preset's
  adaptive signedness a tensor made by a ReLU gets the unsigned grid [0, 2^b - 1].

Activation ranges (minmax) and initial scales (LSQ) are calibrated on `data` (a few batches, weights in
float, as MQBench's observers do), or on the model-input probe with a warning when no data is given.
"""

from __future__ import annotations

import warnings

import numpy as np

import keras
from keras import tree

from autoinit_tf.graph import as_functional, is_model, layer_tree, topo_nodes, walk
from autoinit_tf.quantize.layers import METHODS, FakeQuant, QuantizedLayer, quantizable
from autoinit_tf.quantize.presets import PRESETS

__all__ = ["prepare", "calibrate", "quantizers_of", "batches_of", "QuantizationWarning"]


class QuantizationWarning(UserWarning):
    """A layer stays in float, or calibration used the probe."""


_LEVEL2 = (keras.layers.Add, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
           keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
           keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
           keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
           keras.layers.GlobalMaxPooling3D)

_RELU_NAMES = ("relu", "relu6")


def _is_float(t):
    return isinstance(t, keras.KerasTensor) and "float" in str(t.dtype)


def _makes_nonnegative(op):
    """True when `op`'s output is a ReLU's (adaptive signedness may use the unsigned grid)."""
    if isinstance(op, QuantizedLayer):
        op = op.layer
    if isinstance(op, keras.layers.ReLU):
        return (op.negative_slope == 0) and (op.threshold >= 0)
    act = getattr(op, "activation", None)
    return getattr(act, "__name__", None) in _RELU_NAMES


def _fusable_pairs(fn, fold_bn):
    """{id(linear layer): its BatchNormalization} over `fn` and its nested functional models."""
    pairs = {}
    if not fold_bn:
        return pairs
    graphs = [fn]
    while graphs:
        g = graphs.pop()
        nodes = topo_nodes(g)
        consumers = {}
        for node in nodes:
            if node.is_input:
                continue
            for t in node.input_tensors:
                consumers.setdefault(id(t), []).append(node)
            if is_model(node.operation):
                graphs.append(as_functional(node.operation))
        outputs = {id(t) for t in g.outputs}
        for node in nodes:
            op = node.operation
            if node.is_input or op is None or quantizable(op) or isinstance(op, keras.layers.EinsumDense):
                continue
            if getattr(op, "activation", None) not in (None, keras.activations.linear):
                continue
            if len(op._inbound_nodes) != 1 or len(node.outputs) != 1 or id(node.outputs[0]) in outputs:
                continue
            users = consumers.get(id(node.outputs[0]), [])
            if len(users) != 1:
                continue
            bn = users[0].operation
            if (type(bn) is keras.layers.BatchNormalization and len(bn._inbound_nodes) == 1
                    and not getattr(bn, "renorm", False)
                    and bn.axis in (-1, len(node.outputs[0].shape) - 1)):
                pairs[id(op)] = bn
    return pairs


def _clone(model):
    try:
        clone = keras.models.clone_model(model, recursive=True)
    except Exception as exc:  # noqa: BLE001 - one clear message
        raise TypeError(f"quantize.prepare needs a functional or Sequential model ({type(model).__name__} "
                        f"could not be cloned: {exc}).") from exc
    clone.set_weights(model.get_weights())
    return clone


def prepare(model, preset="academic", bits=8, method="lsq", data=None, *, weight_bits=None, fold_bn=None,
            keep=(), calibration_batches=8, batch_size=64, seed=0):
    """A new model that trains with fake quantization (QAT) as the hardware `preset` will execute it.

    Args:
      model: a built functional or Sequential model (not modified; the result shares no variable with it).
      preset: one of `quantize.PRESETS` ("academic", "tensorrt", "acl", "tvm", "snpe", "fbgemm"): scale
        form, weight granularity, symmetry, graph level, BN folding.
      bits: activation bits (and weight bits unless `weight_bits`).
      method: "lsq", "minmax" (EMA observer), "pact" (DoReFa weights) or "dorefa".
      data: inputs (an array, a list/dict of arrays, `(x, y)`, or a dataset) for calibrating activation
        ranges and LSQ's initial scales; the model-input probe (with a warning) when None.
      fold_bn: fold BatchNormalization into the preceding conv/Dense; default: the preset's.
      keep: names of layers to keep in float (the academic setting often keeps the first and last).
    Returns the prepared `keras.Model`; `quantizers_of(qat)` lists its quantizers.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if method not in METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; choose one of {METHODS}.")
    p = PRESETS[preset]
    weight_bits = bits if weight_bits is None else weight_bits
    fold_bn = p.fold_bn if fold_bn is None else bool(fold_bn)
    keep = set(keep)
    clone = _clone(model)
    fn = as_functional(clone)
    pairs = _fusable_pairs(fn, fold_bn)
    folded = {id(bn) for bn in pairs.values()}
    wrappers, act_cache, kept = {}, {}, {}

    def weight_layer(op):
        if id(op) not in wrappers:
            wrappers[id(op)] = QuantizedLayer(
                op, batch_norm=pairs.get(id(op)), bits=weight_bits, method=method,
                per_channel=p.weight_granularity == "per-channel", symmetric=p.weight_symmetric,
                narrow_range=p.narrow_range, pow2=p.scale == "pow2", name=f"{op.name}_quant")
        return wrappers[id(op)]

    def quantize_activation(t):
        if not _is_float(t):
            return t
        if id(t) not in act_cache:
            producer = t._keras_history.operation if hasattr(t, "_keras_history") else None
            unsigned = p.adaptive_signedness and producer is not None and _makes_nonnegative(producer)
            fq = FakeQuant(bits=bits, method=method, symmetric=p.activation_symmetric or unsigned,
                           signed=not unsigned, narrow_range=p.narrow_range, pow2=p.scale == "pow2",
                           name=f"fake_quant_{len(act_cache)}")
            act_cache[id(t)] = fq(t)
        return act_cache[id(t)]

    def quantizes_inputs(op, weighted):
        if weighted:
            return True
        if p.graph_level >= 3:
            return True
        return p.graph_level >= 2 and isinstance(op, _LEVEL2)

    def visit(node, args, kwargs, site):
        op = node.operation
        if id(op) in folded:
            return tree.flatten(args)[0]
        reason = quantizable(op)
        weighted = reason is None and op.name not in keep
        if not weighted and op.name not in keep and op.name not in kept:
            if hasattr(op, "kernel") or hasattr(op, "depthwise_kernel"):
                kept[op.name] = reason  # a weighted layer with no quantized form (e.g. Conv2DTranspose)
            elif not is_model(op) and any(quantizable(inner) is None for inner in layer_tree(op, include_self=False)):
                kept[op.name] = (f"{type(op).__name__} holds conv/dense layers inside, and prepare does not "
                                 "descend into layers: they train and deploy in float")
        if quantizes_inputs(op, weighted):
            args, kwargs = tree.map_structure(quantize_activation, (args, kwargs))
        if weighted:
            return weight_layer(op)(*args, **kwargs)
        return op(*args, **kwargs)

    inputs = [keras.Input(batch_shape=kt.shape, dtype=kt.dtype, name=kt.name) for kt in fn.inputs]
    outputs = walk(fn, inputs if len(inputs) > 1 else inputs[0], visit)
    if p.graph_level >= 3:
        outputs = tree.map_structure(quantize_activation, outputs)
    for name in keep:
        kept.setdefault(name, "kept in float (keep=)")
    for name, reason in kept.items():
        if reason != "kept in float (keep=)":
            warnings.warn(f"quantize.prepare: layer '{name}' stays in float: {reason}.", QuantizationWarning,
                          stacklevel=2)
    qat = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=f"{model.name}_qat")
    for w in wrappers.values():
        w.init_weight_scales()
    if method in ("minmax", "lsq"):
        calibrate(qat, data, batches=calibration_batches, batch_size=batch_size, seed=seed)
    return qat


def quantizers_of(model):
    """(activation quantizers, weight-quantized layers) of a prepared model, in graph order."""
    acts = [layer for layer in model.layers if isinstance(layer, FakeQuant)]
    weights = [layer for layer in model.layers if isinstance(layer, QuantizedLayer)]
    return acts, weights


def batches_of(data, batches, batch_size):
    """Up to `batches` input batches (x only) from an array, a list/dict of arrays, (x, y) or a dataset."""
    if isinstance(data, tuple) and len(data) in (2, 3) and not isinstance(data[0], (int, float)):
        data = data[0]
    if isinstance(data, (np.ndarray, list, dict)) or hasattr(data, "__array__"):
        arrays = data
        n = len(tree.flatten(arrays)[0])
        for start in range(0, min(n, batches * batch_size), batch_size):
            yield tree.map_structure(lambda a: np.asarray(a)[start:start + batch_size], arrays)
        return
    for i, batch in enumerate(data):
        if i >= batches:
            return
        if isinstance(batch, tuple):
            batch = batch[0]
        yield batch


def calibrate(qat_model, data=None, *, batches=8, batch_size=64, seed=0):
    """Observe activation ranges (and LSQ's mean |x|) on `data` with fake quantization off, then set the
    quantizers from them (MQBench's calibration). Changes only the quantizers' own variables."""
    acts, weights = quantizers_of(qat_model)
    if not acts:
        return
    if data is None:
        from autoinit_tf.inputs import probe_arrays

        warnings.warn("quantize: no calibration data; activation ranges come from the Gaussian model-input probe. "
                      "Pass data= (a few batches of real inputs) for ranges that fit your data.",
                      QuantizationWarning, stacklevel=3)
        arrays = probe_arrays(as_functional(qat_model), None, batch_size, seed)
        data = arrays if len(arrays) > 1 else arrays[0]
    for layer in acts + weights:
        if isinstance(layer, FakeQuant):
            layer.start_observing()
        else:
            layer.observing = True
    try:
        seen = 0
        for x in batches_of(data, batches, batch_size):
            qat_model(x, training=False)
            seen += 1
        if seen == 0:
            raise ValueError("quantize.calibrate: the data gave no batch.")
    finally:
        for layer in weights:
            layer.observing = False
    for layer in acts:
        layer.finish_observing()
