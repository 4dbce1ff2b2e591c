"""What a model declares about the inputs it expects, so that probes fit the model.

A probe (the model-input probe of measurement and calibration, and the per-layer probe of the fallback
rule) has to be an input the model could really be given:

* **Unknown dimensions** other than the batch get the model's declared sequence length, never the probe's
  batch size: the shortest ``sequence_length`` / ``max_sequence_length`` any layer of the model declares
  (keras-hub's PositionEmbedding, TokenAndPositionEmbedding, backbones), capped at `MAX_PROBE_LENGTH`;
  `DEFAULT_PROBE_LENGTH` when nothing is declared (rotary-position models such as Llama).
* **Integer inputs** are filled by what they are: a padding mask (name containing ``mask``) is all ones,
  segment / token-type ids are zeros, and token ids that feed an embedding are uniform over that
  embedding's vocabulary (``input_dim`` / ``vocabulary_size``; the smallest when they feed several).
  Other integer inputs keep the moment-based rule of `execute.probe_array`.
* **Memory**: `probe_elements` counts an example's entries with the substituted lengths, so batch sizes
  can keep every visible activation within a bound (`ACTIVATION_BYTES`).
"""

from __future__ import annotations

import numpy as np

from autoinit_tf import graph
from autoinit_tf.execute import DEFAULT_PROBE_LENGTH

__all__ = [
    "DEFAULT_PROBE_LENGTH", "MAX_PROBE_LENGTH", "ACTIVATION_BYTES", "declared_length", "probe_length",
    "vocabulary_size", "integer_fill", "input_fills", "probe_elements", "largest_activation",
]

#: A declared sequence length longer than this is probed at this length (attention is O(length^2)).
MAX_PROBE_LENGTH = 128
#: Bound on one visible activation of a probe, in bytes (float32 entries).
ACTIVATION_BYTES = 256 * 2**20

_LENGTH_ATTRIBUTES = ("sequence_length", "max_sequence_length")


def declared_length(model) -> int | None:
    """The shortest sequence length any layer of `model` (searched recursively) declares, or None."""
    lengths = []
    for layer in graph.layer_tree(model):
        for name in _LENGTH_ATTRIBUTES:
            value = vars(layer).get(name)
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
                lengths.append(int(value))
    return min(lengths) if lengths else None


def probe_length(model) -> int:
    """The length an unknown non-batch dimension of a probe gets for `model`."""
    declared = declared_length(model)
    return DEFAULT_PROBE_LENGTH if declared is None else min(declared, MAX_PROBE_LENGTH)


def vocabulary_size(op) -> int | None:
    """The number of token ids an embedding-like layer accepts (``input_dim`` or ``vocabulary_size``)."""
    for name in ("input_dim", "vocabulary_size"):
        value = getattr(op, name, None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def integer_fill(name, consumers=()):
    """How to fill an integer input called `name` that feeds the ops `consumers`: ``("ones",)`` for a
    padding mask, ``("zeros",)`` for segment / token-type ids, ``("uniform", high)`` for token ids of an
    embedding, or None (the moment-based rule)."""
    lowered = str(name or "").lower()
    if "mask" in lowered:
        return ("ones",)
    if "segment" in lowered or "token_type" in lowered:
        return ("zeros",)
    sizes = [s for s in (vocabulary_size(op) for op in consumers) if s is not None]
    if sizes:
        return ("uniform", min(sizes))
    return None


def input_fills(fn):
    """`integer_fill` for each input of the functional graph `fn` (None for float inputs)."""
    consumers = {id(kt): [] for kt in fn.inputs}
    for node in graph.topo_nodes(fn):
        for kt in node.input_tensors:
            if id(kt) in consumers:
                consumers[id(kt)].append(node.operation)
    fills = []
    for kt in fn.inputs:
        dtype = str(kt.dtype)
        if "int" in dtype or "bool" in dtype:
            fills.append(integer_fill(kt.name, consumers[id(kt)]))
        else:
            fills.append(None)
    return fills


def probe_elements(shape, length) -> int:
    """Entries of one example of a tensor of symbolic `shape` (batch first) when unknown dims get `length`."""
    return max(int(np.prod([length if d is None else int(d) for d in tuple(shape)[1:]] or [1])), 1)


def largest_activation(fn, length) -> int:
    """Entries per example of the largest tensor the graph of `fn` shows (inputs and every node's
    outputs; inside subclassed layers nothing is seen)."""
    largest = max([probe_elements(kt.shape, length) for kt in fn.inputs] or [1])
    for node in graph.topo_nodes(fn):
        for kt in getattr(node, "outputs", ()) or ():
            shape = getattr(kt, "shape", None)
            if shape is not None:
                largest = max(largest, probe_elements(shape, length))
    return largest
