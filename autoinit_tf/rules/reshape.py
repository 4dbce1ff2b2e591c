"""Shape rules: value-copying layers pass the moments through; zero padding mixes in zeros.

With a kept fraction k of real entries (ZeroPadding: k = input size / output size):
mean k mu, E[y^2] = k E[x^2]. Bilinear upsampling averages neighbours, which lowers the variance;
it is linear, so its output moments come from the layer itself on a short deterministic probe.
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf.moments import Moments
from autoinit_tf.rules import element_maps, shared_part, spatial_correlation
from autoinit_tf.rules.registry import BuiltinTable

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules

L = keras.layers


def relayout(m: Moments, in_shape, out_shape) -> Moments:
    """Per-channel detail after a row-major reshape from `in_shape` to `out_shape` (logits' additive mask,
    `Moments.visible`, kept where the last axis is)."""
    out = _relayout(m, in_shape, out_shape)
    visible = getattr(m, "visible", None)
    if visible is not None and in_shape and out_shape and in_shape[-1] == out_shape[-1] == visible.shape[-1]:
        if out is m:
            out = m.scaled(1.0)
        out.visible = visible
    return out


def _relayout(m: Moments, in_shape, out_shape) -> Moments:
    """Per-channel detail after a row-major reshape from `in_shape` to `out_shape`.

    The flat index modulo the last dimension is the channel, so with C channels in and D out:
    D == C keeps them, D a multiple of C tiles them, C a multiple of D mixes every (C/D)-th one;
    otherwise only the pooled moments remain.
    """
    if m.el_mean is not None and out_shape and all(d is not None for d in out_shape[1:]) \
            and int(np.prod(out_shape[1:])) == m.el_mean.size:
        return Moments.from_elements(m.el_mean.reshape(out_shape[1:]), m.el_var.reshape(out_shape[1:]))
    m = m.per_channel()
    if m.ch_mean is None or not in_shape or not out_shape:
        return m
    c, d = in_shape[-1], out_shape[-1]
    if c is None or d is None or c != m.channels:
        return m.pooled()
    if d == c:
        return m
    if d % c == 0:
        return Moments.from_channels(np.tile(m.ch_mean, d // c), np.tile(m.ch_var, d // c))
    if c % d == 0:
        mean = m.ch_mean.reshape(-1, d).mean(axis=0)
        second = m.ch_second.reshape(-1, d).mean(axis=0)
        return Moments.from_channel_second(mean, second)
    return m.pooled()


def _identity(ctx):
    n = len(ctx.node.outputs)
    return ctx.inputs[0] if n == 1 else [ctx.inputs[0]] * n


def _reshaping(ctx):
    return relayout(ctx.input, ctx.input_shapes[0], ctx.output_shapes[0])


@BUILTIN.rule(L.Permute)
def permute_rule(ctx):
    dims = tuple(ctx.layer.dims)
    return ctx.input if dims[-1] == len(dims) else ctx.input.pooled()


_PASS = [L.Identity, L.RepeatVector, L.UpSampling1D, L.UpSampling3D, L.Masking, L.InputLayer]
for _cls in _PASS:
    BUILTIN.rule(_cls, _identity)
for _cls in (L.Reshape, L.Flatten):
    BUILTIN.rule(_cls, _reshaping)


@BUILTIN.rule(L.UpSampling2D)
def upsampling2d_rule(ctx):
    if ctx.layer.interpolation == "nearest":
        return ctx.input
    return ctx.probe()


#: ZeroPadding starts element maps (per position) from per-channel moments when the padding makes up more
#: than this share of its output: on small maps the border's zeros change what a convolution's windows
#: read; on large ones the pooled fraction is within a few percent, and element maps would cost the
#: analytic pass time for nothing.
PAD_MAPS_ABOVE = 0.10


def _zero_padding_rule(ctx):
    n_in = ctx.input_shapes[0][1:]
    n_out = ctx.output_shapes[0][1:]
    if any(d is None for d in n_in) or any(d is None for d in n_out):
        return ctx.input
    k = float(np.prod(n_in)) / float(np.prod(n_out))
    m = ctx.input
    maps = None
    if m.el_mean is not None and tuple(m.el_mean.shape) == tuple(n_in):
        maps = m.el_mean, m.el_var
    elif 1.0 - k > PAD_MAPS_ABOVE and getattr(ctx.layer, "data_format", "channels_last") == "channels_last":
        # A map the padding grows by more than PAD_MAPS_ABOVE: every position has its channel's moments, and
        # the zeros sit on the border, where a convolution after it reads them in position-dependent numbers
        # (keras-hub's MobileNetV3 pads a 4x4 map by 2 for a 5x5 depthwise: its windows hold 49% real
        # entries on average, not the 25% the pooled fraction says; 2.2x).
        maps = element_maps.element_maps(m, n_in)
    if maps is not None:
        pad = ctx.layer.padding
        pad = [(p, p) if isinstance(p, int) else tuple(p) for p in (pad if isinstance(pad, (list, tuple)) else [pad])]
        widths = pad + [(0, 0)]
        if len(widths) == len(n_in):
            out = Moments.from_elements(np.pad(maps[0], widths), np.pad(maps[1], widths))
            out.pre = _padded_pre(m, widths)
            shared_part.carry_per_example(out, m)  # the real positions' (the padding has no shared part)
            return spatial_correlation.unchanged(out, m)
    if m.ch_mean is not None:
        return Moments.from_channel_second(k * m.ch_mean, k * m.ch_second)
    return Moments.from_second(k * m.mean, k * m.second, k * m.between)


def _padded_pre(m, widths):
    """The pre-activation memo (`Moments.pre`) of zero-padded f(pre) when f(0) = 0: padding the
    pre-activations with the constant 0 gives the same padded f(pre) (ReLU, tanh, ELU...), so a max pool
    after the padding (ResNet's stem) still integrates f over the max of the pre-activations instead of
    treating post-activation entries as Gaussians (which put conv2_block1 of ResNet50 at 1.47)."""
    if m.pre is None:
        return None
    pre, fn, kinks = m.pre
    if pre.el_mean is None or pre.el_mean.shape != m.el_mean.shape:
        return None
    if float(np.asarray(fn(np.zeros(1)), dtype=np.float64).reshape(-1)[0]) != 0.0:
        return None
    return _memo_elements(pre, np.pad(pre.el_mean, widths), np.pad(pre.el_var, widths)), fn, kinks


def _memo_elements(pre, el_mean, el_var):
    """A memo's pre-activation with new element maps (padded or cropped), keeping `Moments.matched`."""
    out = Moments.from_elements(el_mean, el_var)
    out.matched = getattr(pre, "matched", False)
    return spatial_correlation.unchanged(out, pre)


for _cls in (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D):
    BUILTIN.rule(_cls, _zero_padding_rule)


def _crop_slices(layer, rank):
    """``slice`` per spatial axis of a Cropping1D/2D/3D layer (channels last)."""
    crop = layer.cropping
    if rank == 1:
        crop = [crop]
    return tuple(slice(int(a), -int(b) if int(b) else None) for a, b in crop)


def _cropping_rule(ctx):
    """Cropping keeps the entries it does not cut: element maps (and the pre-activation memo) are sliced,
    so the positions a strided layer after it reads are the right ones (NASNet's adjust blocks pad by
    one, crop the other side and subsample: the subsample reads only real positions, where the passed-
    through uncropped map put 1 in 7 padding zeros in each direction into the prediction, 1.44x after
    it). Without element maps the moments pass through (per-channel numbers of uncut positions)."""
    m = ctx.input
    rank = len(ctx.input_shapes[0]) - 2
    if m.el_mean is None or getattr(ctx.layer, "data_format", "channels_last") != "channels_last" \
            or m.el_mean.ndim != rank + 1:
        return m
    cut = _crop_slices(ctx.layer, rank) + (slice(None),)
    out = Moments.from_elements(m.el_mean[cut], m.el_var[cut])
    if m.pre is not None and m.pre[0].el_mean is not None and m.pre[0].el_mean.shape == m.el_mean.shape:
        pre = m.pre[0]
        out.pre = (_memo_elements(pre, pre.el_mean[cut], pre.el_var[cut]), m.pre[1], m.pre[2])
    shared_part.carry_per_example(out, m)
    return spatial_correlation.unchanged(out, m)


for _cls in (L.Cropping1D, L.Cropping2D, L.Cropping3D):
    BUILTIN.rule(_cls, _cropping_rule)
