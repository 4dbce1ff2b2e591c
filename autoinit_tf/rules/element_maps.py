"""Per-element moments of feature maps: every (position, channel) has its own mean and variance.

Padding makes border positions of a convolution output weaker than interior ones, and the next layer
reads border inputs less often: the product of the two is invisible to per-channel averages and
compounds with depth. In a deep random ReLU CNN most of a channel's spread ends up in these
per-position means rather than across examples (VGG16 at 96x96, block4_conv3 pre-activations: variance
over examples 0.020 per element, spread of the per-position means 0.21), and two things read that
structure: a 2x2 max pool, whose window entries have different means and small spreads (per-channel
order statistics over-predicted VGG16's pooled means by up to 28%, and every layer after block3 ended
up to 25% low), and a Dense after Flatten, whose variance over examples sums the per-element variances
only. For maps of at most `ELEMENT_LIMIT` (1,048,576) elements the rules below therefore propagate the
full maps (elements assumed independent across positions and examples; measured within-window
correlation in VGG16 ~0.01):

    conv:     mean_out = conv(mean_in, W) + b,     var_out = conv(var_in, W * W)
    dense:    mean_out = mean_in @ W + b,          var_out = var_in @ (W * W)
    avg pool: mean_out = window average of mean_in, var_out = window sum of var_in / k^2
    max pool: each window the max of its own independent Gaussians (`moments.max_expectations`)

and activations (ReLU in closed form, others by quadrature once per distinct element), batch
normalization, dropout, merges, zero padding and reshapes act per element. Away from the borders the
elements repeat, so the quadratures run once per distinct value (`moments.distinct_rows`). Larger maps
use per-channel moments (`Moments.ch_mean`).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from autoinit_tf.moments import Moments, max_expectations

ELEMENT_LIMIT = 1 << 20

#: The exact per-element max pool costs `moments.max_expectations_cost` CDF evaluations (~14 ns each here),
#: counted per distinct window. Above this many the pool uses per-channel order statistics instead (as maps
#: larger than `ELEMENT_LIMIT` always do). VGG16 at 96x96: 0.17 M (first pool, 576 distinct windows of
#: 147k) to 5.3 M (block5, every window distinct) on the common grid.
MAX_POOL_EVALUATIONS = 20_000_000


def element_maps(m: Moments, shape):
    """(mean, var) arrays of the element shape `shape` (no batch axis) for `m`, or None."""
    shape = tuple(shape)
    if not shape or any(d is None for d in shape) or int(np.prod(shape)) > ELEMENT_LIMIT:
        return None
    if m.el_mean is not None:
        return (m.el_mean, m.el_var) if tuple(m.el_mean.shape) == shape else None
    if m.ch_mean is not None and m.channels == shape[-1]:
        return np.broadcast_to(m.ch_mean, shape).copy(), np.broadcast_to(m.ch_var, shape).copy()
    if m.ch_mean is None and m.between == 0.0:
        return np.full(shape, m.mean), np.full(shape, m.var)
    return None


def conv_maps(layer, m: Moments, in_shape, kernel, bias):
    """Output element maps of a channels-last Conv1D/2D/3D with `kernel`, or None.

    1-D and 2-D convolutions of maps up to `NUMPY_CONV_ELEMENTS` run in NumPy (`correlate_maps`): handing
    the kernel and its square to the backend copies both into fresh backend tensors (ResNet50V2's first
    wrap: 0.26 s of 1.2 in those copies); per conv 1.5-20x faster on ResNet-sized maps and kernels.
    Grouped convolutions (``groups > 1``: keras-hub's MobileNetV3 writes its depthwise stages as
    ``Conv2D(groups=channels)``) of an input that has element maps go to the backend's depthwise convolution
    (one input channel per group) or grouped convolution (without maps, a strided one after a ZeroPadding on
    a small map was 1.3-1.7x off)."""
    groups = int(getattr(layer, "groups", 1) or 1)
    if groups != 1:
        if m.el_mean is None:
            # per-channel input: the per-channel path's tap fractions already place a 'same' padding's border
            # (ConvNeXt's 7x7 stages; maps from per-channel moments cost its wrap 1.7x for the same numbers)
            return None
        k = np.asarray(kernel)
        if k.shape[-2] == 1 and k.shape[-1] % groups == 0:
            # one input channel per group (ConvNeXt's 7x7 stages): a depthwise convolution, kernel (taps, C, dm);
            # the backend's grouped convolution of the same maps cost ConvNeXtTiny's wrap 3x
            dk = k.reshape(k.shape[:-2] + (groups, k.shape[-1] // groups))
            return _filtered_maps(keras.ops.depthwise_conv, layer, m, in_shape, dk, bias)
        return _filtered_maps(keras.ops.conv, layer, m, in_shape, kernel, bias)
    dims = tuple(in_shape[1:])
    numpy_sized = len(dims) in (2, 3) and None not in dims and int(np.prod(dims)) <= NUMPY_CONV_ELEMENTS
    return _filtered_maps(None if numpy_sized else keras.ops.conv, layer, m, in_shape, kernel, bias)


#: Maps of at most this many elements are convolved in NumPy (`correlate_maps`); larger ones (VGG's
#: first blocks, 96x96x64: 18 ms against the backend's 15 ms) by the backend.
NUMPY_CONV_ELEMENTS = 1 << 18

#: `correlate_maps` gathers the input patches of this many output elements x taps at a time.
PATCH_BLOCK = 1 << 22


def correlate_maps(x, kernel, *, strides, padding, dilation):
    """A convolution (cross-correlation, as Keras' Conv) of one channels-last map `x` of shape
    (*spatial, Cin) (1 or 2 spatial axes) with `kernel` (*taps, Cin, Cout), in float32: the patches of a
    block of output rows gathered and multiplied by the kernel reshaped to (taps * Cin, Cout) (BLAS).
    'same' pads as TensorFlow does (the extra row or column after)."""
    x = np.asarray(x, dtype=np.float32)
    spatial = x.ndim - 1
    if spatial == 1:
        y = correlate_maps(x[None], kernel[None], strides=(1,) + tuple(strides), padding=padding,
                           dilation=(1,) + tuple(dilation))
        return y[0]
    taps = kernel.shape[:2]
    cout = kernel.shape[3]
    pads = []
    out = []
    for n, k, st, d in zip(x.shape[:2], taps, strides, dilation):
        span = (k - 1) * d + 1
        if padding == "same":
            o = -(-n // st)
            total = max((o - 1) * st + span - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            o = (n - span) // st + 1
            pads.append((0, 0))
        out.append(o)
    w = kernel.reshape(-1, cout)
    if taps == (1, 1):
        # a 1x1 kernel reads no padding: the strided positions times the kernel, one product (no patches)
        xs = x[:(out[0] - 1) * strides[0] + 1:strides[0], :(out[1] - 1) * strides[1] + 1:strides[1], :]
        return (xs.reshape(-1, w.shape[0]) @ w.astype(np.float32, copy=False)).reshape(out[0], out[1], cout)
    xp = np.pad(x, pads + [(0, 0)]) if any(p != (0, 0) for p in pads) else x
    y = np.empty((out[0], out[1], cout), dtype=np.float32)
    rows = max(1, PATCH_BLOCK // max(out[1] * w.shape[0], 1))
    for r0 in range(0, out[0], rows):
        r1 = min(r0 + rows, out[0])
        # patches[i, j, a, b, c] = xp[(r0 + i) * s0 + a * d0, j * s1 + b * d1, c]
        parts = [xp[r0 * strides[0] + a * dilation[0]:(r1 - 1) * strides[0] + a * dilation[0] + 1:strides[0],
                    b * dilation[1]:(out[1] - 1) * strides[1] + b * dilation[1] + 1:strides[1], :]
                 for a in range(taps[0]) for b in range(taps[1])]
        patches = np.stack(parts, axis=2)  # (rows, out1, taps, Cin)
        y[r0:r1] = (patches.reshape(-1, w.shape[0]) @ w).reshape(r1 - r0, out[1], cout)
    return y


def depthwise_maps(layer, m: Moments, in_shape, kernel, bias):
    """Output element maps of a channels-last DepthwiseConv1D/2D (output channel c * dm + d reads input
    channel c alone), or None.

    A strided depthwise conv on a small padded map reads particular positions (EfficientNetB0 at 96x96,
    block6a: a 5x5 stride-2 conv on a 6x6 map whose centre has 3-4x the variance of its edges): the
    per-channel form, which averages the input over positions, predicted 1.0 there, measured 1.7."""
    if len(in_shape) not in (3, 4):
        return None
    return _filtered_maps(keras.ops.depthwise_conv, layer, m, in_shape, kernel, bias)


def _filtered_maps(op, layer, m: Moments, in_shape, kernel, bias):
    """mean_out = op(mean_in, W) + b and var_out = op(var_in, W * W), each one single-example call of the
    convolution `op` (None: `correlate_maps`, in NumPy) with the layer's strides, padding and dilation;
    None where maps are not tracked."""
    if getattr(layer, "data_format", "channels_last") != "channels_last" or layer.padding == "causal":
        return None
    maps = element_maps(m, in_shape[1:])
    if maps is None:
        return None
    mean, var = maps
    k = np.asarray(kernel, dtype=np.float32)

    def run(x, w):
        if op is None:
            return correlate_maps(x, w, strides=tuple(layer.strides), padding=layer.padding,
                                  dilation=tuple(layer.dilation_rate)).astype(np.float64)
        y = op(keras.ops.convert_to_tensor(x[None].astype(np.float32)), keras.ops.convert_to_tensor(w),
               strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate)
        return np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float64)[0]

    out_mean = run(mean, k)
    if bias is not None:
        out_mean = out_mean + np.asarray(bias, dtype=np.float64)
    return Moments.from_elements(out_mean, run(var, k * k))


def dense_maps(m: Moments, in_shape, kernel, bias):
    """Output element maps of a Dense (or a 1x1 pointwise stage) applied at every position, or None:
    mean_out = mean_in @ W + b, var_out = var_in @ (W * W), in float32 as `correlate_maps` (Xception's
    728 x 728 pointwise kernels: 0.8 ms against 5.5 ms in float64, most of it copying the kernel)."""
    maps = element_maps(m, in_shape[1:])
    if maps is None:
        return None
    mean, var = maps
    kernel = np.asarray(kernel, dtype=np.float32)
    units = kernel.shape[-1]
    lead = mean.shape[:-1]
    mean32 = np.asarray(mean, dtype=np.float32).reshape(-1, kernel.shape[0])
    var32 = np.asarray(var, dtype=np.float32).reshape(-1, kernel.shape[0])
    out_mean = (mean32 @ kernel).astype(np.float64).reshape(lead + (units,))
    out_var = squared_kernel_product(var32, kernel)
    if bias is not None:
        out_mean = out_mean + np.asarray(bias, dtype=np.float64)
    return Moments.from_elements(out_mean, out_var.reshape(lead + (units,)))


def squared_kernel_product(a, kernel) -> np.ndarray:
    """a @ (kernel * kernel) as float64, a and the kernel's square in the kernel's own precision, the square
    taken in column blocks of at most 2^20 entries (4 MiB of float32): no kernel-sized float64 copy or square
    (a variance through a linear map, var_in @ W^2)."""
    out = np.empty((a.shape[0], kernel.shape[1]))
    step = max(1, (1 << 20) // max(kernel.shape[0], 1))
    for j0 in range(0, kernel.shape[1], step):
        w = kernel[:, j0:j0 + step]
        out[:, j0:j0 + step] = a @ (w * w)
    return out


def window_bounds(n, k, stride, padding):
    """(start, stop) of each pooling window along one dimension, padding excluded."""
    if padding == "valid":
        out = (n - k) // stride + 1
        starts = np.arange(max(out, 1)) * stride
    else:
        out = int(math.ceil(n / stride))
        left = max((out - 1) * stride + k - n, 0) // 2
        starts = np.arange(out) * stride - left
    return [(max(a, 0), min(a + k, n)) for a in starts]


def _window_index(windows):
    """(index, valid) arrays (windows x largest window) of the entries of each window."""
    k = max(b - a for a, b in windows)
    t = np.arange(k)[None, :]
    start = np.array([a for a, _ in windows])[:, None]
    stop = np.array([b for _, b in windows])[:, None]
    return np.minimum(start + t, stop - 1), start + t < stop


def pool_maps(m: Moments, in_shape, pool_size, strides, padding, kind, fn=None, kinks=()):
    """Local average or max pooling of 1D/2D element maps, or None.

    Max: the maximum of each window's entries, independent Gaussians with their own means and
    variances (`max_expectations`, padding excluded). With `fn` (monotone non-decreasing), the moments
    of fn(max) instead, integrated over the distribution of the max.
    """
    maps = element_maps(m, in_shape[1:])
    if maps is None or len(pool_size) not in (1, 2):
        return None
    mean, var = maps
    if len(pool_size) == 1:
        mean, var = mean[:, None, :], var[:, None, :]
        pool_size, strides = (pool_size[0], 1), (strides[0], 1)
    rows = window_bounds(mean.shape[0], pool_size[0], strides[0], padding)
    cols = window_bounds(mean.shape[1], pool_size[1], strides[1], padding)
    if kind == "max":
        (ri, rok), (ci, cok) = _window_index(rows), _window_index(cols)
        gather = (ri[:, None, :, None], ci[None, :, None, :])
        nr, nc, c = len(rows), len(cols), mean.shape[-1]
        wm = np.moveaxis(mean[gather], -1, 2).reshape(nr, nc, c, -1)
        wv = np.moveaxis(var[gather], -1, 2).reshape(nr, nc, c, -1)
        ok = (rok[:, None, :, None] & cok[None, :, None, :]).reshape(nr, nc, 1, -1)
        out = max_expectations(fn, wm, wv, kinks, valid=ok, coarse=True, max_evaluations=MAX_POOL_EVALUATIONS)
        if out is None:
            return None  # too costly: per-channel order statistics (the caller's fallback)
        e1, e2 = out
        out_mean, out_var = e1, e2 - e1 * e1
        if len(in_shape) == 3:  # 1D
            out_mean, out_var = out_mean[:, 0, :], out_var[:, 0, :]
        return Moments.from_elements(out_mean, out_var)
    counts = np.outer([b - a for a, b in rows], [b - a for a, b in cols]).astype(np.float64)[..., None]
    out_mean = window_sums(mean, rows, cols) / counts
    out_var = window_sums(var, rows, cols) / (counts * counts)
    if len(in_shape) == 3:  # 1D
        out_mean, out_var = out_mean[:, 0, :], out_var[:, 0, :]
    return Moments.from_elements(out_mean, out_var)


def window_sums(a, rows, cols):
    """Sum of a (H, W, C) map over each window (rows x cols of (start, stop)), by an integral image."""
    h, w = a.shape[:2]
    integral = np.zeros((h + 1, w + 1) + a.shape[2:])
    integral[1:, 1:] = a.cumsum(axis=0).cumsum(axis=1)
    r0, r1 = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    c0, c1 = np.array([c[0] for c in cols]), np.array([c[1] for c in cols])
    return (integral[r1[:, None], c1[None, :]] - integral[r0[:, None], c1[None, :]]
            - integral[r1[:, None], c0[None, :]] + integral[r0[:, None], c0[None, :]])


def global_average_maps(m: Moments, in_shape):
    """Global average over positions: the positional mean pattern averages out exactly."""
    maps = element_maps(m, in_shape[1:])
    if maps is None:
        return None
    mean, var = maps
    c = mean.shape[-1]
    n = mean.size // c
    return Moments.from_channels(mean.reshape(-1, c).mean(axis=0), var.reshape(-1, c).sum(axis=0) / (n * n))


def batch_norm_maps(m: Moments, gamma, beta, epsilon):
    """Training-mode BatchNormalization on the last axis, element by element."""
    if m.el_mean is None:
        return None
    scale = np.sqrt(m.ch_var + epsilon)
    g = np.ones(m.channels) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1)
    b = np.zeros(m.channels) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    return Moments.from_elements(g * (m.el_mean - m.ch_mean) / scale + b, g * g * m.el_var / scale**2)


def same_shape(ms):
    shapes = {None if m.el_mean is None else m.el_mean.shape for m in ms}
    return len(shapes) == 1 and None not in shapes
