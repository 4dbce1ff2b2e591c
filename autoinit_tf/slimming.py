"""Network slimming (Liu et al., ICCV 2017): sparsity on BatchNorm scales, then real channel surgery.

1. Sparsity training: loss + lambda * sum_BN sum_c |gamma_c| (lambda 1e-4 for VGG-like nets, 1e-5 for
   ResNets/DenseNets): `add_bn_sparsity` attaches an L1 regularizer to every BatchNormalization gamma, so `fit`
   adds it on every backend (its gradient is the paper's lambda * sign(gamma)).
2. `prune_channels(model, ratio=... | threshold=...)`: the channels of a conv/dense layer followed by its own
   BatchNormalization whose |gamma| is below the global threshold (the `ratio` quantile over every prunable
   channel, or `threshold`) are removed from that layer, its BN, every channel-wise layer after it (activations,
   dropout, pooling, padding, depthwise convolutions, further BNs) and from the input of every consumer
   (conv/dense kernels, through Flatten and Concatenate by index maps). Never fewer than `min_channels`.
   Channels that meet other channels element-wise (Add, Multiply, ...: residual groups), reach a layer that
   mixes channels otherwise (LayerNorm, GroupNorm, Reshape, an unknown layer) or the model output are kept:
   the stated policy, as the paper's ResNet/DenseNet pruning keeps block outputs.
3. The removed channels are not simply dropped: with their gamma set to 0 a channel is a constant
   (f(beta) through the layers after it), and that constant's contribution is folded into the consumer's bias
   (exact for Dense and for convolutions without zero padding; at the borders of 'same' padding it is the
   interior value). Outputs therefore move as little as possible before fine-tuning; a channel whose gamma
   is exactly 0 is removed without changing the outputs.

Functional models (nested models and shared layers are refused with a message).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from autoinit_tf.graph import topo_nodes
from autoinit_tf.revisited_bn import BATCH_NORM_CLASSES, batch_norm_layers

__all__ = ["add_bn_sparsity", "remove_bn_sparsity", "prune_channels", "SlimmingReport", "model_flops"]

_PRODUCERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)
_BN = BATCH_NORM_CLASSES
_PASS = (
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D, keras.layers.Cropping1D,
    keras.layers.Cropping2D, keras.layers.Cropping3D, keras.layers.UpSampling1D, keras.layers.UpSampling2D,
    keras.layers.UpSampling3D, keras.layers.Identity, keras.layers.DepthwiseConv2D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
) + _BN
_MERGE = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
          keras.layers.Maximum, keras.layers.Minimum)


def add_bn_sparsity(model, lam=1e-4):
    """Attach ``lam * sum |gamma|`` to every BatchNormalization gamma of `model` (training-time only: the
    saved layer configs are unchanged). Returns the number of layers."""
    layers = _bn_layers(model)
    for layer in layers:
        layer.gamma.regularizer = keras.regularizers.L1(lam)
    return len(layers)


def remove_bn_sparsity(model):
    """Remove what `add_bn_sparsity` attached."""
    for layer in _bn_layers(model):
        layer.gamma.regularizer = None


def _bn_layers(model):
    return [layer for layer in batch_norm_layers(model) if getattr(layer, "gamma", None) is not None]


@dataclasses.dataclass
class SlimmingReport:
    """What `prune_channels` removed. ``channels``: {layer: (kept, original)} of the pruned layers."""

    threshold: float
    channels: dict
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    coupled: list

    def __str__(self):
        kept = sum(k for k, _ in self.channels.values())
        total = sum(n for _, n in self.channels.values())
        return (f"network slimming: {total - kept} of {total} prunable channels removed (threshold |gamma| "
                f"{self.threshold:.3g}); parameters {self.params_before:,} -> {self.params_after:,}, "
                f"multiply-adds {self.flops_before:,} -> {self.flops_after:,}; {len(self.coupled)} BN layers kept "
                "whole (residual groups, channel-mixing layers or outputs)")


def model_flops(model) -> int:
    """Multiply-adds of one example through the conv, depthwise and dense layers (static shapes)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out = layer.output.shape
            total += int(np.prod(out[1:])) * int(np.prod(layer.kernel_size))
        elif isinstance(layer, _PRODUCERS) and not isinstance(layer, keras.layers.Dense):
            out = layer.output.shape
            cin = int(layer.input.shape[-1])
            total += int(np.prod(out[1:])) * int(np.prod(layer.kernel_size)) * cin // int(getattr(layer, "groups", 1))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.input.shape[1:])) * int(layer.units)
    return total


class _Graph:
    """The functional graph, one call per layer: inbound / outbound layers by name."""

    def __init__(self, model):
        if not isinstance(getattr(model, "_nodes_by_depth", None), dict) or not hasattr(model, "inputs"):
            raise TypeError("prune_channels needs a functional keras.Model (or a built Sequential).")
        self.model = model
        self.layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]
        self.inbound, self.outbound = {}, {la.name: [] for la in self.layers}
        in_graph = set(topo_nodes(model))  # once: membership per layer stays linear in the graph's size
        for layer in self.layers:
            if isinstance(layer, keras.Model):
                raise TypeError(f"prune_channels does not descend into the nested model '{layer.name}'; build the "
                                "model from its layers first.")
            nodes = [n for n in layer._inbound_nodes if n in in_graph]
            if len(nodes) != 1:
                raise TypeError(f"layer '{layer.name}' is called {len(nodes)} times; shared layers are not pruned.")
            parents = []
            for tensor in nodes[0].input_tensors:
                parent = tensor._keras_history[0]
                parents.append(parent.name)
                if parent.name in self.outbound:
                    self.outbound[parent.name].append(layer.name)
            self.inbound[layer.name] = parents
        self.by_name = {la.name: la for la in self.layers}
        self.outputs = {t._keras_history[0].name for t in model.outputs}


def _units(g):
    """{bn name: producer name} for producer -> own BN pairs (the producer feeds only that BN, channels last)."""
    units = {}
    for layer in g.layers:
        if isinstance(layer, _BN) and layer.gamma is not None and len(g.inbound[layer.name]) == 1:
            producer = g.by_name.get(g.inbound[layer.name][0])
            axis = getattr(layer, "axis", -1)
            axis = axis[0] if isinstance(axis, (list, tuple)) else axis
            if isinstance(producer, _PRODUCERS) and g.outbound[producer.name] == [layer.name] \
                    and axis in (-1, len(layer.input.shape) - 1) and producer.name not in g.outputs:
                units[layer.name] = producer.name
    return units


def _coupled(g, units):
    """The units whose channels must stay whole: those that meet others element-wise, reach a channel-mixing
    or unknown layer, or reach an output (tracked by which units' channels each layer's output carries)."""
    producer_unit = {p: b for b, p in units.items()}
    carries, coupled = {}, set()
    for layer in g.layers:  # model.layers is topologically ordered for functional models
        name = layer.name
        parents = [carries.get(p, set()) for p in g.inbound[name]]
        incoming = set().union(*parents) if parents else set()
        if name in producer_unit:
            carries[name] = {producer_unit[name]}
        elif isinstance(layer, _PRODUCERS):
            carries[name] = set()  # consumes (input sliced), starts new channels
        elif isinstance(layer, _PASS) or isinstance(layer, keras.layers.Flatten):
            carries[name] = incoming
        elif isinstance(layer, keras.layers.Concatenate) and layer.axis in (-1, len(layer.output.shape) - 1):
            carries[name] = incoming
        elif isinstance(layer, _MERGE):
            coupled |= incoming
            carries[name] = incoming
        else:  # a layer that mixes channels or is unknown: whatever reaches it stays whole
            coupled |= incoming
            carries[name] = set()
        if name in g.outputs:
            coupled |= carries[name]
    return coupled


def prune_channels(model, ratio=None, threshold=None, min_channels=1):
    """A new, smaller model without the channels of least |gamma| (module docstring), and a `SlimmingReport`.

    Args:
        model: a functional model with conv/dense -> BatchNormalization pairs (trained with sparsity).
        ratio: the fraction of prunable channels to remove (global, over all prunable BN layers); or
        threshold: remove channels with |gamma| below it.
        min_channels: never keep fewer channels in a layer.
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("Give exactly one of ratio= (fraction of channels) or threshold= (on |gamma|).")
    g = _Graph(model)
    units = _units(g)
    coupled = _coupled(g, units)
    prunable = {b: p for b, p in units.items() if b not in coupled}
    if not prunable:
        raise ValueError(f"Model '{model.name}' has no prunable conv/dense -> BatchNormalization pair (slimming scores "
                         "channels by BN gamma) outside residual groups and channel-mixing layers.")
    scores = {b: np.abs(keras.ops.convert_to_numpy(g.by_name[b].gamma.value)).astype(np.float64) for b in prunable}
    allg = np.sort(np.concatenate(list(scores.values())))
    if ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}.")
        k = int(np.floor(ratio * len(allg)))
        thr = allg[k - 1] if k > 0 else -np.inf
        remove = {b: s <= thr for b, s in scores.items()}
    else:
        thr = float(threshold)
        remove = {b: s < thr for b, s in scores.items()}
    keep = {}
    for b, s in scores.items():
        mask = ~remove[b]
        if mask.sum() < min_channels:  # never empty: keep the largest
            mask[np.argsort(-s)[:min_channels]] = True
        keep[b] = np.flatnonzero(mask)

    # Channel maps: for every layer output, the kept indices of its (original) last axis, or None (all).
    maps, removed_inputs = {}, {}
    bn_of = {p: b for b, p in prunable.items()}
    for layer in g.layers:
        name = layer.name
        ins = [maps.get(p) for p in g.inbound[name]]
        if name in bn_of:
            maps[name] = keep[bn_of[name]]
        elif isinstance(layer, _PRODUCERS):
            maps[name] = None
        elif isinstance(layer, keras.layers.Flatten) and ins[0] is not None:
            c = int(layer.input.shape[-1])
            positions = int(np.prod(layer.input.shape[1:-1]))
            maps[name] = (np.arange(positions)[:, None] * c + ins[0][None, :]).ravel()
        elif isinstance(layer, keras.layers.Concatenate) and any(m is not None for m in ins):
            parts, offset = [], 0
            for m, n in zip(ins, (int(t.shape[-1]) for t in layer.input)):
                parts.append(offset + (np.arange(n) if m is None else m))
                offset += n
            maps[name] = np.concatenate(parts)
        else:
            maps[name] = ins[0] if ins else None
        if isinstance(layer, _PRODUCERS) and ins and ins[0] is not None:
            removed_inputs[name] = np.setdiff1d(np.arange(int(layer.input.shape[-1])), ins[0])

    folds = _fold_values(model, g, prunable, keep, removed_inputs)
    new = keras.models.clone_model(model, clone_function=lambda layer: _resized(layer, prunable, keep))
    for layer in g.layers:
        _copy_sliced(layer, new.get_layer(layer.name), g, maps, removed_inputs, folds)
    channels = {p: (len(keep[b]), int(g.by_name[p].output.shape[-1])) for b, p in prunable.items()}
    report = SlimmingReport(float(thr), channels, model.count_params(), new.count_params(), model_flops(model),
                            model_flops(new), sorted(b for b in units if b in coupled))
    return new, report


def _resized(layer, prunable, keep):
    config = layer.get_config()
    for b, p in prunable.items():
        if layer.name == p:
            config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = int(len(keep[b]))
    return type(layer).from_config(config)


def _fold_values(model, g, prunable, keep, removed_inputs):
    """The constant each removed channel takes at each consumer's input when its gamma is 0 (inference mode):
    {consumer: array of the consumer input without the batch axis}. The gammas are restored afterwards."""
    if not removed_inputs:
        return {}
    saved = {}
    try:
        for b in prunable:
            gamma = g.by_name[b].gamma
            value = np.array(keras.ops.convert_to_numpy(gamma.value))
            saved[b] = value
            zeroed = value.copy()
            zeroed[np.setdiff1d(np.arange(len(value)), keep[b])] = 0.0
            gamma.assign(zeroed)
        names = list(removed_inputs)
        probe = keras.Model(model.inputs, [g.by_name[n].input for n in names])
        zeros = [np.zeros((1,) + tuple(t.shape[1:]), dtype=t.dtype) for t in model.inputs]
        outs = probe(zeros, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return {n: np.asarray(keras.ops.convert_to_numpy(o), np.float64)[0] for n, o in zip(names, outs)}
    finally:
        for b, value in saved.items():
            g.by_name[b].gamma.assign(value)


def _copy_sliced(old, new, g, maps, removed_inputs, folds):
    name = old.name
    ins = [maps.get(p) for p in g.inbound[name]]
    in_map = ins[0] if ins else None
    out_map = maps.get(name)
    weights = [np.asarray(w) for w in old.get_weights()]
    if isinstance(old, _PRODUCERS):
        kernel = weights[0]
        if in_map is not None:
            removed = removed_inputs[name]
            if len(weights) > 1 and len(removed):  # no bias: the constant is dropped
                const = folds[name][..., removed]  # (..., removed) over positions
                if isinstance(old, keras.layers.Dense):
                    weights[1] = weights[1] + const.reshape(-1, len(removed)).mean(0) @ kernel[removed, :] \
                        if const.ndim > 1 else weights[1] + const @ kernel[removed, :]
                else:
                    per_channel = const.reshape(-1, len(removed)).mean(0)  # interior value of each channel
                    taps = kernel[..., removed, :].reshape(-1, len(removed), kernel.shape[-1]).sum(0)  # (removed, out)
                    weights[1] = weights[1] + per_channel @ taps
            kernel = kernel[..., in_map, :] if not isinstance(old, keras.layers.Dense) else kernel[in_map, :]
        if out_map is not None:  # this producer is pruned
            kernel = kernel[..., out_map]
            if len(weights) > 1:
                weights[1] = weights[1][out_map]
        weights[0] = kernel
    elif isinstance(old, keras.layers.DepthwiseConv2D) and in_map is not None:
        mult = int(old.depth_multiplier)
        weights[0] = weights[0][:, :, in_map, :]
        if len(weights) > 1:
            weights[1] = weights[1].reshape(-1, mult)[in_map].ravel()
    elif out_map is not None and weights:  # channel-wise weights (BN, PReLU): the kept channels
        weights = [w[..., out_map] for w in weights]
    new.set_weights(weights)
