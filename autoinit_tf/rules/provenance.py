"""Where a traced tensor came from: the operation and node that produced it, looking through casts.

The rules that recognize a pattern across several nodes (an RMS norm written with raw ops, attention
weights coming from a softmax, tokens coming from a per-token normalization) walk back with these.
"""

from __future__ import annotations

from keras.src.ops import core as core_ops

__all__ = ["producer", "uncast"]


def producer(tensor):
    """(operation, its node) that produced a traced tensor, or (None, None)."""
    history = getattr(tensor, "_keras_history", None)
    op = getattr(history, "operation", None) if history is not None else None
    if op is None:
        return None, None
    nodes = getattr(op, "_inbound_nodes", [])
    index = history.node_index
    return (op, nodes[index]) if 0 <= index < len(nodes) else (None, None)


def uncast(tensor):
    """The tensor before any chain of (up to four) casts."""
    for _ in range(4):
        op, node = producer(tensor)
        if not isinstance(op, core_ops.Cast) or not node.input_tensors:
            return tensor
        tensor = node.input_tensors[0]
    return tensor
