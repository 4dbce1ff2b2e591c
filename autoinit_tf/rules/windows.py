"""Parts of a signal shared within attention windows only (Swin's window attention, any windowed attention
written as a reshape of the feature map into windows folded into the batch axis).

`Moments.between` is the part of the variance that every position of one batch entry shares. Window attention
folds the windows of an example into the batch axis (``(B, H, W, C) -> (B, H/w, w, W/w, w, C)``, transposed,
``-> (B * n, w, w, C)``), averages the values inside each window (the attended output's part ``W / T``,
`rules.ops.attended_values`, is common to the T positions of a window) and unfolds the result. Each window's
part is its own: independent between the n windows. Counted as shared by all positions of the example (what the
pass did before), it survives the next block's shifted windows, the patch merging and the LayerNorms whole:
keras-hub's Swin came out with its stage-1 attended values predicted at 0.433, measured 0.219.

The walk carries, on the tensors of each side, what the split needs (`Moments.window`):

- `Folded` (``share``, the grid): inside the window space, the fraction of ``between`` that every position of
  the whole example shares; the rest is the windows' own parts. Layers that act on each position alike
  (`CARRY`) keep it; the attended values add their window-local part (`attended`).
- `Unfolded` (parts): on the feature map, for each window-local part L (a fraction of the variance) the grid it
  is constant on. At the unfold, of ``between`` = G + L the example-wide part is G + L / n (pooling the whole
  map averages the n independent windows), and L (1 - 1 / n) joins the element-to-element part. A roll moves
  the grid; the next fold onto windows of T positions counts in its windows' shared part, for each part,

      L * rho,  rho = mean over the new windows w of sum over the old windows j of (|w and j| / |w|)^2,

  the variance of a window's average of a field constant on the old windows (a window shifted by half its size
  meets four old ones in quarters: rho = 1/4). Patch merging (strided slices concatenated on channels) halves
  the map: a part's grid stays in the units of the map it was made on, and a later fold on a map s times
  coarser measures its windows in those units.

Anything else (a convolution, a pooling: positions mixed) drops the parts: the windows then count as
independent positions, the L / n already in ``between`` stays. A tensor without a marker is the previous
behaviour exactly.
"""

from __future__ import annotations

import copy
import dataclasses

import keras
import numpy as np
from keras.src.ops import core as core_ops
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as np_ops

from autoinit_tf.moments import Moments
from autoinit_tf.rules.provenance import producer

__all__ = ["Grid", "Folded", "Unfolded", "CARRY", "carry", "at_reshape", "at_roll", "attended", "overlap"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Windows of ``wh x ww`` positions tiling an ``h x w`` map, the first starting at (``oh``, ``ow``), cyclic."""

    h: int
    w: int
    wh: int
    ww: int
    oh: int = 0
    ow: int = 0

    @property
    def count(self) -> int:
        return (self.h // self.wh) * (self.w // self.ww)


@dataclasses.dataclass(frozen=True)
class Folded:
    """Entries are the windows `grid` of an example; ``share`` of ``between`` is shared by the whole example."""

    share: float
    grid: Grid


@dataclasses.dataclass(frozen=True)
class Unfolded:
    """A feature map carrying window-local parts: ``parts`` is a tuple of (fraction of the variance, Grid)."""

    parts: tuple


def _classes(module, names):
    return tuple(c for c in (getattr(module, n, None) for n in names) if isinstance(c, type))


L = keras.layers
#: Layers and ops that compute each position from that position alone, the same way everywhere, or only move
#: entries: a part constant on windows stays constant on them, with the same fraction of the variance.
CARRY = (
    _classes(L, ("Dense", "LayerNormalization", "RMSNormalization", "Activation", "Dropout", "Identity",
                 "Reshape", "Permute", "Flatten", "ReLU", "ELU", "LeakyReLU", "Softmax"))
    + _classes(np_ops, ("Reshape", "Transpose", "GetItem", "Squeeze", "ExpandDims", "Multiply", "Divide",
                        "TrueDivide", "Negative", "Moveaxis", "Swapaxes", "Tanh", "Exp", "Sqrt", "Abs", "Square"))
    + _classes(core_ops, ("Cast", "Unstack", "Slice", "StopGradient", "ConvertToTensor"))
    + _classes(nn_ops, ("Relu", "Relu6", "Gelu", "Silu", "Sigmoid", "Elu", "Selu", "Softplus", "LeakyRelu",
                        "HardSigmoid", "HardSilu", "Mish", "Tanh"))
)
#: Sums: the parts of each input count by their share of the output's variance.
SUMS = _classes(L, ("Add", "Subtract", "Average", "Concatenate")) + _classes(np_ops, ("Add", "Subtract",
                                                                                       "Concatenate"))


def _with(m: Moments, marker) -> Moments:
    out = copy.copy(m)  # a rule may return a cached or shared object: never mark it in place
    out.window = marker
    return out


def carry(op, inputs, outs):
    """`outs` with the window marker of `inputs` carried (a new object where one is set), for `CARRY` and
    `SUMS` operations; anything else returns `outs` as they are."""
    marked = [m for m in inputs if getattr(m, "window", None) is not None]
    if not marked or not isinstance(op, CARRY + SUMS):
        return outs
    if isinstance(op, SUMS):
        marker = _summed(inputs, outs[0] if outs else None)
    else:
        marker = marked[0].window
    if marker is None:
        return outs
    return [o if getattr(o, "window", None) is not None else _with(o, marker) for o in outs]


def _summed(inputs, out):
    """The marker of a sum (or concatenation) of `inputs`: each part weighted by its input's variance."""
    kinds = {type(m.window) for m in inputs if getattr(m, "window", None) is not None}
    if len(kinds) != 1 or out is None:
        return None
    total = sum(m.var for m in inputs)
    if total <= 0.0:
        return None
    if kinds == {Unfolded}:
        parts = {}
        for m in inputs:
            for frac, grid in getattr(m.window, "parts", ()) if m.window is not None else ():
                parts[grid] = parts.get(grid, 0.0) + frac * m.var / total
        return Unfolded(tuple((f, g) for g, f in parts.items() if f > 0.0))
    grids = {m.window.grid for m in inputs if m.window is not None}
    if len(grids) != 1:
        return None
    between = sum(m.between for m in inputs)
    if between <= 0.0:
        return Folded(1.0, grids.pop())
    glob = sum((m.window.share if m.window is not None else 1.0) * m.between for m in inputs)
    return Folded(min(glob / between, 1.0), grids.pop())


def overlap(old: Grid, new: Grid, stride=(1, 1)) -> float:
    """rho: the variance of a `new` window's average of a unit-variance field constant on the `old` windows (and
    independent between them). `new` is on a map `stride` times coarser than `old`'s (its windows measured in
    `old`'s units)."""
    rho = 1.0
    for n, size, origin, new_size in ((old.h, old.wh, old.oh, new.wh * stride[0]),
                                      (old.w, old.ww, old.ow, new.ww * stride[1])):
        labels = ((np.arange(n) - origin) % n) // size  # which old window each position is in (cyclic)
        fracs = []
        for start in range(0, n, new_size):
            _, counts = np.unique(labels[start:start + new_size], return_counts=True)
            fracs.append(float(np.sum((counts / new_size) ** 2)))
        rho *= float(np.mean(fracs))
    return rho


def _partition(tensor):
    """The Grid of a window partition producing `tensor`, or None: ``reshape((B, H, W, C) -> (B, H/wh, wh, W/ww,
    ww, C))``, ``transpose(0, 1, 3, 2, 4, 5)``, then the reshape folding (H/wh, W/ww) into the batch (its input is
    `tensor`'s producer's input)."""
    op, node = producer(tensor)
    if not isinstance(op, np_ops.Transpose) or tuple(getattr(op, "axes", None) or ()) != (0, 1, 3, 2, 4, 5):
        return None
    src = node.input_tensors[0]
    shape = tuple(src.shape)
    if len(shape) != 6 or any(not isinstance(d, int) for d in shape[1:5]):
        return None
    nh, wh, nw, ww = shape[1:5]
    return Grid(nh * wh, nw * ww, wh, ww)


def at_reshape(ctx, out: Moments) -> Moments:
    """A reshape's output with the fold into windows or the unfold out of them applied (module docstring)."""
    m = ctx.input
    if not isinstance(m, Moments) or m.ch_mean is not None or m.el_mean is not None or out.ch_mean is not None \
            or out.el_mean is not None:
        return out
    src, dst = tuple(ctx.node.input_tensors[0].shape), tuple(ctx.node.outputs[0].shape)
    if any(not isinstance(d, int) for d in src[1:] + dst[1:]):
        return out
    n_src, n_dst = int(np.prod(src[1:])), int(np.prod(dst[1:]))
    if n_src > n_dst and n_src % n_dst == 0:
        return _fold(ctx, m, out, n_src // n_dst)
    if n_dst > n_src and n_dst % n_src == 0 and isinstance(getattr(m, "window", None), Folded):
        return _unfold(m, out, dst, n_dst // n_src)
    return out


def _fold(ctx, m, out, n):
    grid = _partition(ctx.node.input_tensors[0])
    if grid is None or grid.count != n:
        return out
    between = m.between
    marker = getattr(m, "window", None)
    for frac, old in marker.parts if isinstance(marker, Unfolded) else ():
        if old.h % grid.h or old.w % grid.w:
            continue  # not measurable in the new map's units: the old part stays as independent positions
        stride = (old.h // grid.h, old.w // grid.w)
        between += frac * m.var * (overlap(old, grid, stride) - 1.0 / old.count)
    between = min(max(between, 0.0), m.var)
    folded = Moments(out.mean, out.var, between)
    folded.window = Folded(m.between / between if between > 0.0 else 1.0, grid)
    return folded


def _unfold(m, out, dst, n):
    grid = m.window.grid
    if grid.count != n or len(dst) != 6 or tuple(dst[1:5]) != (grid.h // grid.wh, grid.w // grid.ww, grid.wh,
                                                               grid.ww):
        return out
    glob = m.window.share * m.between
    local = max(m.between - glob, 0.0)
    unfolded = Moments(out.mean, out.var, glob + local / n)
    unfolded.window = Unfolded(((local / out.var, grid),) if out.var > 0.0 and local > 0.0 else ())
    return unfolded


def at_roll(ctx, out: Moments) -> Moments:
    """A roll of a map carrying window-local parts over its two spatial axes: the grids move with it."""
    marker = getattr(ctx.input, "window", None)
    if not isinstance(marker, Unfolded) or not marker.parts:
        return out
    shape = tuple(ctx.node.input_tensors[0].shape)
    shift, axis = getattr(ctx.op, "shift", None), getattr(ctx.op, "axis", None)
    shift = tuple(shift) if isinstance(shift, (list, tuple)) else (shift,)
    axis = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
    if len(shape) != 4 or len(shift) != len(axis) or any(not isinstance(s, int) for s in shift) \
            or any(a is None for a in axis):
        return _with(out, None)
    moves = {a % 4: s for a, s in zip(axis, shift)}
    if set(moves) - {1, 2}:
        return _with(out, None)
    parts = []
    for frac, g in marker.parts:
        if (g.h, g.w) != shape[1:3]:
            return _with(out, None)
        parts.append((frac, dataclasses.replace(g, oh=(g.oh + moves.get(1, 0)) % g.h,
                                                ow=(g.ow + moves.get(2, 0)) % g.w)))
    return _with(out, Unfolded(tuple(parts)))


def attended(v: Moments, out: Moments) -> Moments:
    """The attended values `out` of values `v` inside the window space: of ``out.between`` only `v`'s
    example-wide part is shared by the whole example, the window's average is its own."""
    marker = getattr(v, "window", None)
    if not isinstance(marker, Folded):
        return out
    share = marker.share * v.between / out.between if out.between > 0.0 else 1.0
    return _with(out, Folded(min(share, 1.0), marker.grid))
