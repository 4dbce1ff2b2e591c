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
* **Float inputs** get what the model's own preprocessing declares (`input_moments`): a Normalization with
  adapted statistics at the input (ConvNeXt's ImageNet mean and variance) holds the statistics of the data
  it was adapted on, so the inputs are those whose normalized values have mean 0 and variance 1 per
  channel; a Rescaling by 1/255 or 1/127.5 at the input (EfficientNet, MobileNetV3) takes 8-bit pixel
  values, so the inputs are uniform over [0, 255] in their mean and variance. Otherwise N(0, 1). A Gaussian
  N(0, 1) fed to ConvNeXt normalizes to -2.1 +- 0.02: every image nearly the same constant, a regime no
  user runs, and the statistics `wrap` leaves in BatchNormalization would be those of that regime.
* **Memory**: `probe_elements` counts an example's entries with the substituted lengths, so batch sizes
  can keep every visible activation within a bound (`ACTIVATION_BYTES`).
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf import graph
from autoinit_tf.execute import DEFAULT_PROBE_LENGTH

__all__ = [
    "DEFAULT_PROBE_LENGTH", "MAX_PROBE_LENGTH", "ACTIVATION_BYTES", "declared_length", "probe_length",
    "vocabulary_size", "integer_fill", "input_fills", "probe_elements", "largest_activation", "input_moments",
    "PIXEL_MEAN", "PIXEL_VAR",
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


def _consumers(fn):
    """``id(tensor) -> [node, ...]``: the nodes of `fn` that read each tensor."""
    consumers = {}
    for node in graph.topo_nodes(fn):
        for kt in node.input_tensors:
            consumers.setdefault(id(kt), []).append(node)
    return consumers


def input_fills(fn):
    """`integer_fill` for each input of the functional graph `fn` (None for float inputs)."""
    consumers = _consumers(fn)
    fills = []
    for kt in fn.inputs:
        dtype = str(kt.dtype)
        if "int" in dtype or "bool" in dtype:
            fills.append(integer_fill(kt.name, [n.operation for n in consumers.get(id(kt), [])]))
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


#: Moments of 8-bit pixel values (uniform over [0, 255]), what a Rescaling by 1/255 or 1/127.5 takes.
PIXEL_MEAN, PIXEL_VAR = 127.5, 255.0**2 / 12.0
_PIXEL_SCALES = (1.0 / 255.0, 1.0 / 127.5)


def _chain(consumers, kt):
    """The Rescaling / Normalization layers applied to input `kt` one after another, each the only
    consumer (`_consumers`) of the tensor before it."""
    chain, tensor = [], kt
    while True:
        nodes = consumers.get(id(tensor), [])
        if len(nodes) != 1 or len(nodes[0].outputs) != 1:
            return chain
        op = nodes[0].operation
        if not isinstance(op, (keras.layers.Rescaling, keras.layers.Normalization)):
            return chain
        chain.append(op)
        tensor = nodes[0].outputs[0]


def _affine(op, channels):
    """(a, b) per channel with y = a x + b for a Rescaling or Normalization on the last axis, or None."""
    if isinstance(op, keras.layers.Rescaling):
        a, b = np.asarray(op.scale, dtype=np.float64), np.asarray(op.offset, dtype=np.float64)
    else:
        axis = tuple(np.atleast_1d(op.axis)) if op.axis is not None else ()
        if axis not in ((-1,), (len(op.input.shape) - 1,)) or getattr(op, "mean", None) is None:
            return None
        mean = np.asarray(keras.ops.convert_to_numpy(op.mean), dtype=np.float64).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(keras.ops.convert_to_numpy(op.variance), dtype=np.float64)).reshape(-1),
                         keras.backend.epsilon())
        a, b = (std, mean) if op.invert else (1.0 / std, -mean / std)
    a, b = np.broadcast_to(a.reshape(-1), (channels,)).copy(), np.broadcast_to(b.reshape(-1), (channels,)).copy()
    return a, b


def input_moments(fn):
    """Per input of `fn`: ``(ch_mean, ch_var, why)`` for the float inputs whose preprocessing declares
    their scale (see the module docstring; arrays per channel of the last axis, or scalars), else None."""
    consumers = _consumers(fn)
    out = []
    for kt in fn.inputs:
        shape = tuple(kt.shape)
        channels = shape[-1] if len(shape) >= 2 else None
        if "float" not in str(kt.dtype) or not isinstance(channels, int):
            out.append(None)
            continue
        try:
            chain = _chain(consumers, kt)
            maps = [_affine(op, channels) for op in chain]
        except (TypeError, ValueError, AttributeError):
            chain, maps = [], []
        a, b, declared = np.ones(channels), np.zeros(channels), None
        for op, m in zip(chain, maps):
            if m is None:
                break
            a, b = m[0] * a, m[0] * b + m[1]
            trivial = np.all(m[0] == 1.0) and np.all(m[1] == 0.0)  # mean 0, variance 1: never adapted
            if isinstance(op, keras.layers.Normalization) and not op.invert and not trivial:
                # the statistics the Normalization was adapted on: its outputs are N(0, 1) per channel
                declared = (-b / a, 1.0 / (a * a), f"the statistics held by '{op.name}' (Normalization)")
        if declared is None and chain and isinstance(chain[0], keras.layers.Rescaling):
            scale = np.asarray(chain[0].scale, dtype=np.float64).reshape(-1)
            if scale.size == 1 and any(abs(float(scale[0]) - s) < 1e-6 * s for s in _PIXEL_SCALES):
                declared = (np.full(channels, PIXEL_MEAN), np.full(channels, PIXEL_VAR),
                            f"8-bit pixel values, as '{chain[0].name}' (Rescaling by {float(scale[0]):.6g}) takes")
        out.append(declared)
    return out
