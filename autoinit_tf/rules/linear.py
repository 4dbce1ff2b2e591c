"""Rules for weighted linear layers: Dense, EinsumDense, Conv*, Conv*Transpose, DepthwiseConv*,
SeparableConv*, Embedding, SpectralNormalization.

Every kernel is viewed as W[t, c, j]: tap t of the receptive field, input channel c, output unit j.
With input entries of mean mu and variance v, and p_t the fraction of output positions where tap t
falls inside the (unpadded) input, the output of unit j has, averaged over positions,

    m_j = mu * sum_t p_t sum_c W[t,c,j] + b_j,          v_j = v * sum_t p_t sum_c W[t,c,j]^2,

and the layer output (all units and positions) has mean avg_j m_j and variance avg_j v_j + var_j m_j.
The effective fan-in is fan_eff = C_in * sum_t p_t (exact for 'same' padding borders, strides and
transposed convolutions), and the kernel is drawn with

    Var(W) = signal_variance / (fan_eff * E[x^2]),

so that the pre-activation second moment is `signal_variance` (AutoInit). A fused activation is then
applied by the activation rule. Existing biases are kept and enter m_j.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras.src.ops import numpy as np_ops

from autoinit_tf import graph
from autoinit_tf.declared import integer_fill
from autoinit_tf.moments import Moments, elementwise_moments
from autoinit_tf.rules import element_maps, normalization, provenance, shared_part, spatial_correlation
from autoinit_tf.rules.activation import axis_size, function_moments
from autoinit_tf.rules.registry import BuiltinTable, kernel_of, spec_for

BUILTIN = BuiltinTable(__name__)  # installed by autoinit_tf.rules.builtin.register_builtin_rules


#: linear_output works on blocks of output units whose float64 copy holds at most this many values
#: (4 MiB), so a large kernel is never copied whole to float64 (or squared whole).
_BLOCK_VALUES = 1 << 19


def _unit_blocks(w3):
    """(slice, float64 copy of w3[:, :, slice]) over blocks of output units."""
    units = w3.shape[2]
    step = max(1, _BLOCK_VALUES // max(w3.shape[0] * w3.shape[1], 1))
    for j0 in range(0, units, step):
        sl = slice(j0, min(j0 + step, units))
        yield sl, np.asarray(w3[:, :, sl], dtype=np.float64)


def _channel_moments(m: Moments, channels):
    """(mu_c, v_c) per input channel when the per-channel path applies (per-channel moments of these
    channels, or no fixed channel offsets), else None."""
    if m.ch_mean is not None and m.channels == channels:
        return m.ch_mean, m.ch_var
    if m.between == 0.0:
        return np.full(channels, m.mean), np.full(channels, m.var)
    return None


def _as_classes(taps):
    if not (isinstance(taps, list) and taps and isinstance(taps[0], tuple)):
        return [(1.0, np.asarray(taps, dtype=np.float64).reshape(-1))]
    return taps


def _add_tap_moments(out_mean, out_second, sl, tap_means, tap_vars, taps, b):
    """Add the position classes' unit means and second moments, from each tap's contribution to every
    unit's mean (`tap_means`, (taps, units)) and variance (`tap_vars`), to ``out_*[sl]``."""
    for weight, valid in taps:
        means = valid @ tap_means
        if b is not None:
            means = means + b[sl]
        out_mean[sl] += weight * means
        out_second[sl] += weight * (valid @ tap_vars + means * means)


def separable_output(m: Moments, depthwise, pointwise, taps, bias=None):
    """`linear_output` of a separable convolution with one depthwise output per input channel, from its
    two kernels (depthwise D[t, c], pointwise P[c, k]) without composing W[t, c, k] = D[t, c] P[c, k]:
    tap t adds sum_c mu_c D[t, c] P[c, k] to unit k's mean and sum_c v_c D[t, c]^2 P[c, k]^2 to its
    variance, two (taps x C) @ (C x K) products. None where the per-channel path does not apply."""
    d = np.asarray(depthwise, dtype=np.float64)
    p = np.asarray(pointwise)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float32)
    channel_moments = _channel_moments(m, d.shape[1])
    if channel_moments is None:
        return None
    mu, v = channel_moments
    units = p.shape[1]
    b = None if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1), (units,))
    # The products in the pointwise kernel's own precision, P^2 in column blocks (no float64 copy of P and its
    # square: 1536 x 2048, Xception's last, 13.5 -> 4.5 ms; relative error ~4e-7)
    tap_means = ((d * mu).astype(p.dtype) @ p).astype(np.float64)
    tap_vars = element_maps.squared_kernel_product((d * d * v).astype(p.dtype), p)
    out_mean, out_second = np.zeros(units), np.zeros(units)
    _add_tap_moments(out_mean, out_second, slice(None), tap_means, tap_vars, _as_classes(taps), b)
    return Moments.from_channel_second(out_mean, out_second)


def linear_output(m: Moments, w3, taps, bias=None):
    """Output moments of a linear map with kernel w3[t, c, j] (see the module docstring).

    `taps` describes which taps read real input: a list of ``(weight, valid)`` position classes
    (``valid``: a 0/1 vector over taps, ``weight``: the fraction of output positions in the class),
    or a plain vector of per-tap fractions (one class). Position classes make the border effects of
    padding exact, including the position-dependent mean they create. `w3` may be float32 (the drawn
    kernel itself): every sum is taken in float64, one block of output units at a time.

    Returns (Moments, within, between): the total moments, the average within-unit variance and the
    variance of unit means (over units and positions).
    """
    w3 = np.asarray(w3)
    taps = _as_classes(taps)
    units = w3.shape[2]
    b = None
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.size != units:
            b = np.full(units, float(b.mean()))
    channel_moments = _channel_moments(m, w3.shape[1])
    if channel_moments is not None:
        # Exact per output unit: input channel c has mean mu_c and within-channel variance v_c.
        mu, v = channel_moments
        cov = m.ch_cov if m.ch_cov is not None and m.ch_cov.shape[0] == w3.shape[1] and w3.shape[0] == 1 else None
        out_mean = np.zeros(units)
        out_second = np.zeros(units)
        for sl, wb in _unit_blocks(w3):
            # Per tap t: the mean and the variance part each input tap contributes to every unit; a position
            # class then only sums its valid taps (cheap), instead of contracting the kernel once per class.
            # Correlated channels (a Dense on a measured covariance): w_j^T Cov w_j per unit.
            tap_vars = v @ (wb * wb) if cov is None else np.sum((cov @ wb[0]) * wb[0], axis=0)[None]
            _add_tap_moments(out_mean, out_second, sl, mu @ wb, tap_vars, taps, b)  # BLAS per tap
        result = Moments.from_channel_second(out_mean, out_second)
        return result, result.within, result.between
    ntaps = w3.shape[0]
    colsum = np.empty((ntaps, units))  # (taps, units)
    colsq = np.empty((ntaps, units))
    coherent = np.zeros((len(taps), units))  # per class: sum_c (sum_t valid_t W[t,c,j])^2
    for sl, wb in _unit_blocks(w3):
        colsum[:, sl] = wb.sum(axis=1)
        colsq[:, sl] = (wb * wb).sum(axis=1)
        if ntaps > 1:
            for i, (_, valid) in enumerate(taps):
                pc = np.einsum("t,tcj->cj", valid, wb)
                coherent[i, sl] = np.sum(pc * pc, axis=0)
    mean = second_means = within = 0.0
    for i, (weight, valid) in enumerate(taps):
        means = m.mean * (valid @ colsum)
        if b is not None:
            means = means + b
        mean += weight * float(means.mean())
        second_means += weight * float(np.mean(means * means))
        within += weight * m.within * float(np.mean(valid @ colsq))
        # Input channel offsets d_c (unknown, variance `between`) are the same at every tap.
        if ntaps == 1:
            coh = float(valid[0] ** 2 * colsq[0].mean())
        else:
            coh = float(np.mean(coherent[i]))
        second_means += weight * m.between * coh
    between = max(second_means - mean * mean, 0.0)
    return Moments(mean, within + between, between), within, between


def fused_activation(layer, pre: Moments, out_shape):
    act = getattr(layer, "activation", None)
    if act is None:
        return pre
    return function_moments(act, pre, size=axis_size(out_shape, -1))


def fan_in_of(taps) -> float:
    """The average number of real taps per output position."""
    if isinstance(taps, list) and taps and isinstance(taps[0], tuple):
        return float(sum(w * np.sum(v) for w, v in taps))
    return float(np.sum(taps))


# -- receptive-field geometry --------------------------------------------------------------------


def _conv_valid(n, k, stride, dilation, padding):
    """(output positions x taps) 0/1 matrix: does tap t of output o read a real input?"""
    if n is None or padding == "valid":
        return np.ones((1, k))
    eff = (k - 1) * dilation + 1
    out = int(math.ceil(n / stride))
    if padding == "causal":
        pad_left = eff - 1
    else:  # same
        pad_total = max((out - 1) * stride + eff - n, 0)
        pad_left = pad_total // 2
    o = np.arange(out)[:, None]
    t = np.arange(k)[None, :]
    i = o * stride + t * dilation - pad_left
    return ((i >= 0) & (i < n)).astype(np.float64)


def _transpose_valid(n, k, stride, dilation, padding, out_len):
    """(output positions x taps) 0/1 matrix of a transposed convolution: does tap t write to o?"""
    if n is None or out_len is None:
        return np.full((1, k), 1.0 / stride)
    full = (n - 1) * stride + (k - 1) * dilation + 1
    crop = max(full - out_len, 0) // 2 if padding == "same" else 0
    o = np.arange(out_len)[:, None]
    t = np.arange(k)[None, :]
    src = o + crop - t * dilation
    ok = (src % stride == 0) & (src >= 0) & (src // stride < n)
    return ok.astype(np.float64)


def _classes(per_dim):
    """Position classes (weight, valid over all taps) from per-dimension validity matrices."""
    classes = [(1.0, np.ones(1))]
    for valid in per_dim:
        rows, counts = np.unique(valid, axis=0, return_counts=True)
        weights = counts / counts.sum()
        classes = [(w0 * w1, np.multiply.outer(v0, v1).reshape(-1))
                   for w0, v0 in classes for w1, v1 in zip(weights, rows)]
    return classes


def _spatial(shape, data_format, rank):
    if shape is None:
        return [None] * rank
    if data_format == "channels_first":
        return list(shape[2 : 2 + rank])
    return list(shape[1 : 1 + rank])


def _conv_taps(layer, in_shape, rank):
    dims = _spatial(in_shape, getattr(layer, "data_format", "channels_last"), rank)
    return _classes([
        _conv_valid(n, k, s, d, layer.padding)
        for n, k, s, d in zip(dims, layer.kernel_size, layer.strides, layer.dilation_rate)
    ])


def _transpose_taps(layer, in_shape, out_shape, rank):
    fmt = getattr(layer, "data_format", "channels_last")
    dims = _spatial(in_shape, fmt, rank)
    outs = _spatial(out_shape, fmt, rank)
    return _classes([
        _transpose_valid(n, k, s, d, layer.padding, o)
        for n, k, s, d, o in zip(dims, layer.kernel_size, layer.strides, layer.dilation_rate, outs)
    ])


# -- the rules ----------------------------------------------------------------------------------


def _draw_kernel(ctx, variable, fan_eff, target=None):
    s = ctx.fit_input.second
    target = ctx.signal_variance if target is None else target
    var = target / (fan_eff * s) if fan_eff > 0 and s > 0 else target
    ctx.weight_scale = var
    return ctx.draw(variable, var)  # the drawn array itself (float32): rules sum it in float64 blockwise


def _sampled(ctx, out):
    """`out` with the sampling variance of an example's output energy in its log-scale
    (`shared_part.with_sampling`), where one is carried (not on every layer of a network without gates)."""
    if shared_part.scale_of(out) <= 0.0:
        return out
    return shared_part.with_sampling(out, spatial_correlation.energy_sampling_variance(out, ctx.output_shapes[0]))


def _bias(ctx, layer):
    b = getattr(layer, "bias", None)
    return None if b is None else ctx.value(b)


def _dense_pre(ctx):
    layer = ctx.layer
    fan_in = int(layer.kernel.shape[0])
    w = _draw_kernel(ctx, layer.kernel, fan_in)
    pre = None
    if ctx.input.el_mean is not None:
        pre = element_maps.dense_maps(ctx.input, ctx.input_shapes[0], w, _bias(ctx, layer))
    if pre is None:
        pre, _, _ = linear_output(ctx.input, w.reshape(1, fan_in, -1), [1.0], _bias(ctx, layer))
    if len(ctx.input_shapes[0]) > 2:  # applied at every position: the shared part goes through
        pre = shared_part.through_linear(pre, ctx.input, w.reshape(1, fan_in, -1))
        pre = spatial_correlation.through_conv(pre, ctx.input, w, (1, 1), ctx.input_shapes[0])
    return shared_part.given_through_linear(_sampled(ctx, pre), ctx.input, w.reshape(fan_in, -1), _bias(ctx, layer))


def _conv_pre(ctx):
    layer = ctx.layer
    rank = layer.rank
    k = layer.kernel
    kshape = tuple(k.shape)
    frac = _conv_taps(layer, ctx.input_shapes[0], rank)
    cin = kshape[-2]
    fan_eff = cin * fan_in_of(frac)
    w = _draw_kernel(ctx, k, fan_eff)
    exact = element_maps.conv_maps(layer, ctx.input, ctx.input_shapes[0], w, _bias(ctx, layer))
    if exact is None:
        exact, _, _ = linear_output(ctx.input, w.reshape(-1, cin, kshape[-1]), frac, _bias(ctx, layer))
    exact = shared_part.through_linear(exact, ctx.input, w.reshape(-1, cin, kshape[-1]), frac)
    if rank == 2 and getattr(layer, "groups", 1) == 1:
        exact = spatial_correlation.through_conv(exact, ctx.input, w, tuple(layer.strides), ctx.input_shapes[0])
    exact = _sampled(ctx, exact)
    if int(np.prod(kshape[:-2])) == 1 and getattr(layer, "groups", 1) == 1:
        exact = shared_part.given_through_linear(exact, ctx.input, w.reshape(cin, kshape[-1]), _bias(ctx, layer))
    return exact


def _conv_transpose_pre(ctx):
    layer = ctx.layer
    rank = layer.rank
    k = layer.kernel
    kshape = tuple(k.shape)  # (*kernel_size, filters, in_channels)
    frac = _transpose_taps(layer, ctx.input_shapes[0], ctx.output_shapes[0], rank)
    cin = kshape[-1]
    fan_eff = cin * fan_in_of(frac)
    w = _draw_kernel(ctx, k, fan_eff)
    w3 = np.swapaxes(w.reshape(-1, kshape[-2], cin), 1, 2)
    pre, _, _ = linear_output(ctx.input, w3, frac, _bias(ctx, layer))
    return pre


def _depthwise_pre(ctx, layer, kernel, m, target=None):
    """Depthwise stage: each output channel sees the taps of ONE input channel (fan-in = taps)."""
    kshape = tuple(kernel.shape)  # (*kernel_size, in_channels, depth_multiplier)
    frac = _conv_taps(layer, ctx.input_shapes[0], layer.rank)
    fan_eff = fan_in_of(frac)
    w = _draw_kernel(ctx, kernel, fan_eff, target)
    taps = int(np.prod(kshape[:-2]))
    w3 = w.reshape(taps, 1, kshape[-2] * kshape[-1])
    return w3, frac


def depthwise_output(m: Moments, w3, taps, bias=None):
    """Depthwise map: output channel j = c * dm + d reads only input channel c (w3: taps x 1 x C*dm)."""
    units = w3.shape[2]
    if m.ch_mean is None or units % m.channels:
        return linear_output(m, w3, taps, bias)[0]
    dm = units // m.channels
    mu = np.repeat(m.ch_mean, dm)
    v = np.repeat(m.ch_var, dm)
    b = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if not (isinstance(taps, list) and taps and isinstance(taps[0], tuple)):
        taps = [(1.0, np.asarray(taps, dtype=np.float64).reshape(-1))]
    out_mean = np.zeros(units)
    out_second = np.zeros(units)
    for weight, valid in taps:
        s1 = valid @ w3[:, 0, :]
        s2 = valid @ (w3[:, 0, :] ** 2)
        means = mu * s1 + (0.0 if b is None else b)
        out_mean += weight * means
        out_second += weight * (v * s2 + means * means)
    return Moments.from_channel_second(out_mean, out_second)


def _depthwise_conv_pre(ctx):
    layer = ctx.layer
    w3, frac = _depthwise_pre(ctx, layer, layer.kernel, ctx.input)
    kernel = ctx.value(layer.kernel)
    exact = element_maps.depthwise_maps(layer, ctx.input, ctx.input_shapes[0], kernel, _bias(ctx, layer))
    if exact is None:
        exact = depthwise_output(ctx.input, w3, frac, _bias(ctx, layer))
    kshape = tuple(kernel.shape)
    exact = shared_part.through_depthwise(exact, ctx.input, kernel.reshape(-1, kshape[-2], kshape[-1]), frac)
    if layer.rank == 2:
        exact = spatial_correlation.through_depthwise(exact, ctx.input, kernel, tuple(layer.strides),
                                                      tuple(layer.dilation_rate), ctx.input_shapes[0])
    return _sampled(ctx, exact)


def _separable_pre(ctx):
    """Depthwise kernel to keep the second moment at `signal_variance`, then the pointwise kernel.

    The output is computed exactly from the composed kernel W[t, c, k] = sum_d D[t, c, d] P[c dm + d, k]
    (a separable convolution is the convolution with that kernel).
    """
    layer = ctx.layer
    w3, frac = _depthwise_pre(ctx, layer, layer.depthwise_kernel, ctx.input)
    mid, _, _ = linear_output(ctx.input, w3, frac)
    pk = layer.pointwise_kernel
    cmid = int(pk.shape[-2])
    var = ctx.signal_variance / (cmid * mid.second)
    p = ctx.draw(pk, var).reshape(cmid, -1)  # float32, as drawn: each use below converts what it needs
    ctx.weight_scale = var
    dk = ctx.value(layer.depthwise_kernel).astype(np.float64)
    taps, cin, dm = int(np.prod(dk.shape[:-2])), dk.shape[-2], dk.shape[-1]
    if dm == 1 and ctx.input.el_mean is not None:
        # Element maps: the depthwise stage per element (its strides read particular positions: NASNet's
        # strided reduction cells), then the pointwise stage per position; with one depthwise output per
        # input channel, the middle channels are as independent as the input's.
        mid_maps = element_maps.depthwise_maps(layer, ctx.input, ctx.input_shapes[0], dk, None)
        if mid_maps is not None:
            exact = element_maps.dense_maps(mid_maps, (None,) + mid_maps.el_mean.shape, p, _bias(ctx, layer))
            if exact is not None:
                return _separable_correlation(ctx, exact, mid_maps, dk, p)
    if dm == 1:
        pre = separable_output(ctx.input, dk.reshape(taps, cin), p, frac, _bias(ctx, layer))
        if pre is not None:
            return _separable_correlation(ctx, pre, mid, dk, p)
    # W[t, c, k] = sum_d D[t, c, d] P[c dm + d, k], as dm broadcast products (no generic einsum)
    dk, pk3 = dk.reshape(taps, cin, dm), p.reshape(cin, dm, -1)
    composed = dk[:, :, 0, None] * pk3[None, :, 0, :]
    for d in range(1, dm):
        composed += dk[:, :, d, None] * pk3[None, :, d, :]
    pre, _, _ = linear_output(ctx.input, composed, frac, _bias(ctx, layer))
    return _separable_correlation(ctx, pre, mid, dk.reshape(tuple(layer.depthwise_kernel.shape)), p)


def _separable_correlation(ctx, out, mid, depthwise_kernel, pointwise):
    """The positions' correlation through a SeparableConv2D: its depthwise stage, then its pointwise one."""
    layer = ctx.layer
    if layer.rank != 2:
        return out
    mid = spatial_correlation.through_depthwise(mid, ctx.input, depthwise_kernel, tuple(layer.strides),
                                                tuple(layer.dilation_rate), ctx.input_shapes[0])
    return spatial_correlation.through_conv(out, mid, pointwise, (1, 1), ctx.input_shapes[0])


def _einsum_parts(equation):
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    return inp, ker, out


def _einsum_dense_pre(ctx):
    """Fan-in is the product of the kernel axes contracted with the input (absent from the output)."""
    layer = ctx.layer
    inp, ker, out = _einsum_parts(layer.equation.replace(" ", ""))
    kernel = layer.kernel
    kshape = tuple(kernel.shape)
    if "." in ker:
        ker = ker.replace("...", "")
    contracted = [i for i, ch in enumerate(ker) if ch in inp and ch not in out]
    kept = [i for i in range(len(ker)) if i not in contracted]
    fan_in = int(np.prod([kshape[i] for i in contracted])) if contracted else 1
    w = _draw_kernel(ctx, kernel, fan_in)
    w2 = np.transpose(w, contracted + kept).reshape(fan_in, -1)
    pre, _, _ = linear_output(ctx.input, w2[None], [1.0], _bias(ctx, layer))
    return pre


def kernel_and_bias(kernel="kernel", bias="bias"):
    """``layer -> (layer.<kernel>, layer.<bias> or None)``: what calibration rescales in a layer whose
    output is linear in that kernel (plus the bias term)."""

    def get(layer):
        return getattr(layer, kernel), getattr(layer, bias, None)

    get.__name__ = f"kernel_{kernel}"
    return get


def preactivation_rule_for(layer):
    """The registered pre-activation rule of `layer`'s class (None when it has none)."""
    return spec_for(layer).preactivation


def weighted_linear_rule(ctx):
    """Draw the kernel(s) for the target pre-activation variance, then apply the fused activation."""
    pre = preactivation_rule_for(ctx.layer)(ctx)
    pre = exact_for_draw(ctx, pre)
    return fused_activation(ctx.layer, pre, ctx.output_shapes[0])


def exact_for_draw(ctx, pre: Moments) -> Moments:
    """Rescale the drawn kernel so the pre-activation variance is `signal_variance` for THIS draw.

    ``Var(W) = target / (fan_eff E[x^2])`` hits the target in expectation over kernels (a zero-mean
    kernel: mean 0, second moment = variance = target); the moments above are those of the drawn kernel
    (per output unit), which differ from it by the draw's sampling error. That error is large where few
    output units carry a dominant input mean (a squeeze-and-excitation reduce conv: 8 units reading a
    pooled map of mean 0.21 and variance 1e-4, whose pre-activation variance is about 0.21^2 times the
    variance over j of the column sums sum_c W[c, j], just 8 of them). With no bias, the output is linear
    in the kernel, so the kernel times

        s = sqrt(target / Var(pre))

    makes the predicted variance exactly the target, as calibration does on a probe (no probe here:
    the per-unit moments are already computed). Applied only to a kernel this pass drew, with no (or an
    all-zero) bias, on a layer called once (a shared layer's scale is fitted to all its calls together),
    unless the pass runs with ``exact_draw=False``.
    """
    layer = ctx.layer
    if not ctx.exact_draw or ctx.fit_inputs is not ctx.inputs:
        return pre
    kern = kernel_of(layer)
    if kern is None or not ctx.may_reinit(kern[0]) or not ctx.drew(kern[0]):
        return pre
    kernel, bias = kern
    if bias is not None and np.any(ctx.value(bias) != 0):
        return pre
    return rescale_to_target(ctx, kernel, pre)


def rescale_to_target(ctx, weight, pre: Moments) -> Moments:
    """Scale the drawn `weight`, of which the output `pre` is linear, by s = sqrt(target / Var(pre)), the target
    being `signal_variance` or the node's own (`RuleContext.target`): the predicted variance is then the
    target for this draw (`exact_for_draw`; `rules.ops.raw_weight_einsum`; position tables read at fixed ids).
    Returns the moments scaled by s (unchanged where Var(pre) is not a positive finite number)."""
    var = pre.var
    target = ctx.signal_variance if ctx.target is None else ctx.target
    if not (math.isfinite(var) and var > 0.0 and target > 0.0):
        return pre
    s = math.sqrt(target / var)
    if abs(s - 1.0) < 1e-9:
        return pre
    ctx.rescale(weight, s)
    if ctx.weight_scale is not None:
        ctx.weight_scale = ctx.weight_scale * s * s
    return pre.scaled(s)


# The linear layers: pre-activation rule (the registered rule adds the fused activation), the kernel
# calibration rescales, and an output that is exactly (kernel part) + (bias broadcast).
for _cls, _pre, _kernel in [
    (keras.layers.Dense, _dense_pre, "kernel"),
    (keras.layers.EinsumDense, _einsum_dense_pre, "kernel"),
    (keras.layers.Conv1D, _conv_pre, "kernel"),
    (keras.layers.Conv2D, _conv_pre, "kernel"),
    (keras.layers.Conv3D, _conv_pre, "kernel"),
    (keras.layers.Conv1DTranspose, _conv_transpose_pre, "kernel"),
    (keras.layers.Conv2DTranspose, _conv_transpose_pre, "kernel"),
    (keras.layers.Conv3DTranspose, _conv_transpose_pre, "kernel"),
    (keras.layers.DepthwiseConv1D, _depthwise_conv_pre, "kernel"),
    (keras.layers.DepthwiseConv2D, _depthwise_conv_pre, "kernel"),
    (keras.layers.SeparableConv1D, _separable_pre, "pointwise_kernel"),
    (keras.layers.SeparableConv2D, _separable_pre, "pointwise_kernel"),
]:
    BUILTIN.rule(_cls, weighted_linear_rule, preactivation=_pre, kernel=kernel_and_bias(_kernel), bias_split=True)


@BUILTIN.rule(keras.layers.Embedding, kernel=kernel_and_bias("embeddings", bias="__no_bias__"))
def embedding_rule(ctx):
    """The output entries are table entries: drawn with variance `signal_variance`, mean 0; a position
    table (fixed ids the layer's caller holds) added to a projection's output is a per-position bias of
    it (`position_bias_scale`)."""
    layer = ctx.layer
    table = layer.embeddings
    var = ctx.signal_variance * position_bias_scale(ctx, table)
    ctx.weight_scale = var
    w = ctx.draw(table, var).astype(np.float64)
    out = _looked_up(ctx, w)
    if _held_ids(ctx) is not None and ctx.exact_draw and ctx.drew(table) and ctx.fit_inputs is ctx.inputs:
        # rows read at ids the layer holds (ViT's, CLIP's positions): the output is those drawn rows, the
        # same for every example, so the table is rescaled for the rows it reads to have the target
        # variance exactly, as a drawn kernel is (`exact_for_draw`)
        if rescale_to_target(ctx, table, out) is not out:
            out = _looked_up(ctx, np.asarray(ctx.value(table), dtype=np.float64))
    return out


def position_bias_scale(ctx, table=None) -> float:
    """1, or `provenance.POSITION_BIAS_STD`^2 where this node is a position table (its rows read at ids fixed
    by the calling layer, keras-hub's ViT: ``position_embedding(self.position_ids)``; or keras-hub's
    PositionEmbedding) whose output is added to the output of a weighted projection (ViT's patch
    convolution): a per-position bias of that projection's output, drawn at the scale keras-hub's ViT and
    the ViT / DeiT references give it, so the sum stays on the target, as for DeiT's raw table
    (`rules.ops`). The node's row then carries that variance as its own ``target``, which calibration aims
    at too. A `table` this pass may not redraw (a frozen layer's) is kept as it is: no target is stated for it."""
    node = ctx.node
    if table is not None and not ctx.may_reinit(table):
        return 1.0
    if node is None or not node.outputs or not provenance.added_to_projection(node.outputs[0]):
        return 1.0
    if isinstance(ctx.op, keras.layers.Embedding) and _held_ids(ctx) is None:
        return 1.0  # ids from the data (tokens): a signal of its own
    return position_bias(ctx, own_output=True)


def position_bias(ctx, own_output: bool) -> float:
    """`provenance.POSITION_BIAS_STD`^2, the variance factor of a position table drawn as a per-position bias
    of a projection's output, with the note saying so; `own_output`: the table is this node's output (a
    position Embedding), whose row then states that variance as its ``target`` (a raw table added inside a
    traced layer, `rules.ops`, is part of the sum, which keeps the signal's)."""
    scale = provenance.POSITION_BIAS_STD ** 2
    if own_output:
        ctx.target = ctx.signal_variance * scale
    ctx.note(f"position table added to a projection's output: a per-position bias, std "
             f"{provenance.POSITION_BIAS_STD} of the signal's (keras-hub's ViT and the ViT / DeiT reference scale)")
    return scale


def _held_ids(ctx):
    """The ids this lookup reads when its calling layer holds them (`graph.lifted_value`: ViT's and CLIP's
    position ids), else None."""
    kt = ctx.node.input_tensors[0] if ctx.node is not None and ctx.node.input_tensors else None
    return None if kt is None else graph.lifted_value(kt)


def _looked_up(ctx, w):
    """Output moments of looking up rows of `w`: token ids uniform over the table, so output dimension
    j has the mean and variance of column j; an input the probe fills with zeros (segment ids,
    `declared.integer_fill`) always reads row 0, the same vector for every example."""
    kt = ctx.node.input_tensors[0] if ctx.node.input_tensors else None
    if kt is not None and integer_fill(kt.name, [ctx.op]) == ("zeros",):
        ctx.note("ids are zeros (segment ids): every position reads row 0")
        return Moments.from_channels(w[0], np.zeros(w.shape[1]))
    ids = _held_ids(ctx)
    if ids is not None and ids.size > 1 and np.issubdtype(ids.dtype, np.integer) and 0 <= ids.min() \
            and ids.max() < w.shape[0]:
        return positions_read(w[ids.reshape(-1)])
    return Moments.from_channels(w.mean(axis=0), w.var(axis=0))


def positions_read(rows):
    """Moments of a table's `rows` read at fixed positions (position ids the layer holds: ViT's), the same for
    every example: per feature, the mean and variance over the positions; the variance about those means is
    a pattern over positions (`Moments.pattern`)."""
    out = Moments.from_channels(rows.mean(axis=0), rows.var(axis=0))
    return out.set_pattern(out.within)


def _is_reverse_call(ctx) -> bool:
    reverse = (ctx.kwargs or {}).get("reverse")
    if reverse is None and len(ctx.args) > 1:
        reverse = ctx.args[1]
    return bool(reverse) and not isinstance(reverse, Moments)


def _soft_capped(m: Moments, cap):
    if cap is None:
        return m
    cap = float(cap)
    return elementwise_moments(lambda x: cap * np.tanh(x / cap), m, ())


_REVERSE_SECOND = "reverse call input second moment"
_FORWARD_DRAWN = "tied table drawn for the forward call"
_HEAD_NORM = "the normalization before the head takes its scale"


def _forward_gain(ctx) -> float:
    """|c| when the forward call's output is read only by a multiplication by a constant c (Gemma scales its
    embeddings by sqrt(d)), else 1."""
    readers = provenance.consumers(ctx.node.outputs[0]) if ctx.node is not None and ctx.node.outputs else []
    if len(readers) != 1 or not isinstance(readers[0].operation, np_ops.Multiply):
        return 1.0
    args = readers[0].arguments.args
    consts = [a for a in args if not isinstance(a, keras.KerasTensor)]
    if len(args) != 2 or len(consts) != 1:
        return 1.0
    c = np.asarray(keras.ops.convert_to_numpy(consts[0]), dtype=np.float64)
    return abs(float(c.reshape(-1)[0])) if c.size == 1 and float(c.reshape(-1)[0]) != 0 else 1.0


def _head_norm(ctx, logits: Moments):
    """The normalization that computes the reverse call's input, and the factor its scale takes so that the
    logits h @ E^T (their moments `logits`, with the table drawn for the forward call: the next walk draws
    the same) have the target variance; (None, None) where there is none this pass may rescale (a norm with
    a beta, a frozen or shared one, raw ops)."""
    norm, _ = provenance.source(ctx.node.input_tensors[0]) if ctx.node is not None else (None, None)
    variable = normalization.scale_variable(norm) if norm is not None else None
    if variable is None or not ctx.may_reinit(variable, op=norm) or ctx.calls_of(norm) != 1:
        return None, None  # (a norm called elsewhere too would carry the head's scale there)
    if not logits.var > 0:
        return None, None
    return norm, math.sqrt(ctx.signal_variance / logits.var)


@BUILTIN.rule(keras.layers.ReversibleEmbedding, kernel=kernel_and_bias("embeddings", bias="__no_bias__"))
def reversible_embedding_rule(ctx):
    """Both directions of `keras.layers.ReversibleEmbedding` (keras-hub's LM heads).

    Forward (token ids -> rows of the table E, d columns): as `embedding_rule`. Reverse (``reverse=True``,
    logits = h @ E^T, or h @ R with untied ``reverse_embeddings`` R, then the optional soft cap
    c tanh(x / c)): a linear map over d inputs, variance d Var(E) E[h^2].

    Tied weights (one table serves both calls), the policy: the table is drawn for the embedding's own
    use, Var(E) = signal_variance / g^2 (g = 1, or the constant the model multiplies the embeddings by:
    Gemma's sqrt(d)), so the token embeddings enter the network on target (beside a learned position
    embedding, GPT-2's, they carry as much as it does: drawn for the head they would carry 1/d of it).
    The logits h @ E^T, with h from a final normalization (E[h^2] = 1), would then have variance
    d Var(E) = d / g^2: the normalization that computes the head's input (a LayerNormalization without
    beta, an RMSNormalization) takes a scale of sqrt(target / (d Var(E) E[h^2])) instead (1 / sqrt(d) for
    GPT-2; 1 for Gemma's design), as T5 scales its tied decoder output by d^-0.5, and the logits are on
    target. Where the head's input comes from anything else (raw ops, a norm with a beta, a frozen or shared one),
    the table is scaled for the head instead, Var(E) = signal_variance / (d E[h^2]), and the embedding
    output has variance Var(E), which the normalization after the embeddings rescales. The engine walks
    twice (the layer is called twice): the first walk finds the head's norm and its factor, the second
    applies them. Both rows report what the network will do.

    Untied, with the reverse call never made (a backbone without its LM head): the output table R is
    drawn for a normalized head input (keras-hub LMs apply a final LayerNormalization / RMS norm before
    the head: E[h^2] = 1), Var(R) = signal_variance / d, so the task model built on the backbone
    starts with logits on target.
    """
    layer = ctx.layer
    d = int(layer.output_dim)
    tied = bool(getattr(layer, "tie_weights", True))
    state = ctx.state
    if _is_reverse_call(ctx):
        h = ctx.input
        state[_REVERSE_SECOND] = h.second
        if tied:  # (linear_output sums the float32 table in float64 blocks: no float64 copy of it here)
            total, _, _ = linear_output(h, ctx.value(layer.embeddings).T[None], [1.0], None)
            if state.get(_FORWARD_DRAWN) and not state.get(_HEAD_NORM):
                norm, factor = _head_norm(ctx, total)
                if norm is not None:
                    ctx.state_of(norm)[normalization.HEAD_SCALE] = factor
                    state[_HEAD_NORM] = norm.name
            if state.get(_HEAD_NORM):
                ctx.note(f"tied: the head uses the embedding table; '{state[_HEAD_NORM]}' scales its input")
            else:
                ctx.note("tied: the head uses the embedding table (scaled for this head)")
        else:
            var = ctx.signal_variance / (d * h.second)
            total, _, _ = linear_output(h, ctx.draw(layer.reverse_embeddings, var)[None], [1.0], None)
            ctx.weight_scale = var
        return _soft_capped(total, getattr(layer, "logit_soft_cap", None))
    var = ctx.signal_variance
    if not tied and ctx.calls == 1 and getattr(layer, "reverse_embeddings", None) is not None:
        # A backbone alone never makes the reverse call, but its task model (a CausalLM on this backbone)
        # will: draw the head's table for the input every keras-hub LM gives it, the output of a final
        # LayerNormalization / RMS norm (E[h^2] = 1 with the norm's scale at one), so logits = h R have
        # the target variance there.
        head_var = ctx.signal_variance / d
        ctx.draw(layer.reverse_embeddings, head_var)
        ctx.note(f"untied output table drawn for the LM head this model does not call: variance {head_var:.4g} "
                 "= signal_variance / d (a normalized head input, E[h^2] = 1)")
    if tied and ctx.calls > 1:
        own = ctx.signal_variance / _forward_gain(ctx) ** 2
        state[_FORWARD_DRAWN] = True
        if state.get(_HEAD_NORM) or _REVERSE_SECOND not in state:
            var = own  # the first walk, or the head's norm takes the head's scale
            if state.get(_HEAD_NORM):
                ctx.note(f"tied with the output head: table variance {var:.4g} puts the embedding on target; "
                         f"'{state[_HEAD_NORM]}' scales the head's input")
        else:
            var = ctx.signal_variance / (d * state[_REVERSE_SECOND])
            ctx.note(f"tied with the output head: table variance {var:.4g} puts the head's logits on target")
    ctx.weight_scale = var
    w = ctx.draw(layer.embeddings, var).astype(np.float64)
    return _looked_up(ctx, w)


@BUILTIN.rule(keras.layers.SpectralNormalization)
def spectral_normalization_rule(ctx):
    """The wrapped kernel is divided by its largest singular value in training mode.

    The wrapped layer's pre-activation rule draws the kernel; the output is that of W / sigma_max(W).
    """
    inner = ctx.layer.layer
    pre_rule = preactivation_rule_for(inner)
    if pre_rule is None:
        return ctx.probe()
    sub = ctx.sub(inner, share_notes=False)
    pre_rule(sub)
    w = ctx.value(inner.kernel).astype(np.float64)
    sigma = float(np.linalg.norm(w.reshape(-1, w.shape[-1]), 2))
    ctx.weight_scale = sub.weight_scale
    ctx.note(f"kernel divided by sigma_max = {sigma:.4g} in training")
    if isinstance(inner, keras.layers.Dense):
        taps, w3 = [1.0], (w / sigma)[None]
    else:
        taps = _conv_taps(inner, ctx.input_shapes[0], inner.rank)
        w3 = (w / sigma).reshape(-1, w.shape[-2], w.shape[-1])
    pre, _, _ = linear_output(ctx.input, w3, taps, _bias(ctx, inner))
    return fused_activation(inner, pre, ctx.output_shapes[0])
