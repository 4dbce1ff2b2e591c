"""Where a traced tensor came from: the operation and node that produced it, looking through casts.

The rules that recognize a pattern across several nodes (an RMS norm written with raw ops, attention
weights coming from a softmax, tokens coming from a per-token normalization) walk back with these.
"""

from __future__ import annotations

import keras
from keras import tree
from keras.src.ops import core as core_ops
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as np_ops

from autoinit_tf import graph
from autoinit_tf.rules.registry import spec_for

__all__ = ["consumers", "producer", "projection_behind", "softmax_behind", "source", "uncast"]

#: Operations that move entries without computing new ones (a projection's output seen through them is
#: still that projection's output).
_LAYOUT_OPS = (core_ops.Cast, np_ops.Reshape, np_ops.Transpose, np_ops.ExpandDims, np_ops.Squeeze,
               np_ops.Concatenate, keras.layers.Reshape, keras.layers.Permute, keras.layers.Flatten,
               keras.layers.Concatenate)


#: Standard deviation, relative to the signal's, of a learned position table added to the output of a weighted
#: projection (ViT's and DeiT's patch convolution): a per-position bias of that output, which is itself the
#: signal, so drawn small enough that the sum stays on the target, at the scale the ViT and DeiT reference
#: implementations and keras-hub's ViT give it (N(0, 0.02^2) against patch embeddings of unit scale). A
#: table added to anything else (BERT's and GPT-2's token embeddings) is a signal of its own and is drawn
#: at the target.
POSITION_BIAS_STD = 0.02


def producer(tensor):
    """(operation, its node) that produced a traced tensor, or (None, None)."""
    history = getattr(tensor, "_keras_history", None)
    op = getattr(history, "operation", None) if history is not None else None
    if op is None:
        return None, None
    nodes = getattr(op, "_inbound_nodes", [])
    index = history.node_index
    return (op, nodes[index]) if 0 <= index < len(nodes) else (None, None)


def softmax_behind(tensor):
    """The node of the softmax whose output a traced tensor is (through dropout and casts: attention weights),
    or None."""
    for _ in range(4):
        op, node = producer(tensor)
        if op is None:
            return None
        if isinstance(op, (nn_ops.Softmax, keras.layers.Softmax)) or (
                isinstance(op, keras.layers.Activation) and getattr(op.activation, "__name__", "") == "softmax"):
            return node
        if not isinstance(op, (keras.layers.Dropout, core_ops.Cast, np_ops.GetItem)) or not node.input_tensors:
            return None
        tensor = node.input_tensors[0]  # through dropout, casts and slices (GPT-OSS drops its sink column)
    return None


def uncast(tensor):
    """The tensor before any chain of (up to four) casts."""
    for _ in range(4):
        op, node = producer(tensor)
        if not isinstance(op, core_ops.Cast) or not node.input_tensors:
            return tensor
        tensor = node.input_tensors[0]
    return tensor


def consumers(tensor):
    """The nodes that read a traced tensor (the nodes of its producer's consumers that take it as an input)."""
    op, _ = producer(tensor)
    if op is None:
        return []
    return [n for n in getattr(op, "_outbound_nodes", []) if any(t is tensor for t in n.input_tensors)]


def added_to_projection(tensor, depth=4) -> bool:
    """Whether a traced tensor (a position table looked up inside a layer: ViT's position `Embedding`) is
    added, through layout ops, to the output of a weighted projection (`projection_behind`: ViT's patch
    convolution with its class token joined): a per-position bias of that projection's output."""
    frontier = [tensor]
    for _ in range(depth):
        following = []
        for t in frontier:
            for node in consumers(t):
                op = node.operation
                if isinstance(op, (np_ops.Add, keras.layers.Add)):
                    others = [x for x in node.input_tensors if x is not t]
                    if any(projection_behind(x) is not None for x in others):
                        return True
                elif isinstance(op, (core_ops.Cast, np_ops.Reshape, np_ops.ExpandDims, np_ops.Squeeze,
                                     keras.layers.Reshape)):
                    following.extend(node.outputs)
        frontier = following
        if not frontier:
            return False
    return False


def source(tensor, depth=4):
    """(operation, node) that computes a traced tensor, looking through casts and into the Functional models
    (a keras-hub backbone inside its task model) whose output it is; (None, None) when unknown."""
    for _ in range(depth):
        tensor = uncast(tensor)
        op, node = producer(tensor)
        if not isinstance(op, keras.Model) or getattr(op, "outputs", None) is None:
            return op, node
        index = next((i for i, t in enumerate(node.outputs) if t is tensor), None)
        inner = tree.flatten(op.outputs)
        if index is None or index >= len(inner):
            return None, None
        tensor = inner[index]
    return None, None


def projection_behind(tensor, depth=8):
    """The weighted projection (a Dense, EinsumDense or convolution layer: any class registered with a
    ``preactivation`` rule, `registry.LayerSpec`) a traced tensor is the output of,
    seen through casts, reshapes, transposes and concatenations (ViT joins its class token to the patch
    convolution's output before adding positions), into traced blocks (DINOv2's patch embedding layer
    wraps its convolution) and out of them (ViTDet adds its positions in a layer of its own, to what its
    patch embedding layer returned); None when it is anything else (a table lookup, an input, a sum)."""
    frontier = [tensor]
    for _ in range(depth):
        following = []
        for t in frontier:
            op, node = producer(t)
            if op is None:
                continue
            if spec_for(op).preactivation is not None:  # a registered linear layer (its own pre-activation rule)
                return op
            if isinstance(op, keras.layers.InputLayer):  # a traced view's input: what the call received there
                outer = graph.outer_tensor(t)
                if outer is not None:
                    following.append(outer)
                continue
            if isinstance(op, _LAYOUT_OPS):
                following.extend(node.input_tensors)
                continue
            view = graph.traced_view(node)  # a traced block (DINOv2's patch embedding): its output inside
            index = getattr(getattr(t, "_keras_history", None), "tensor_index", None)
            outs = tree.flatten(view.outputs) if view is not None else []
            if index is not None and index < len(outs):
                following.append(outs[index])
        frontier = following
        if not frontier:
            return None
    return None
