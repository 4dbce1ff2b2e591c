"""The two layers `quantize.prepare` puts in a model, `keras.ops` only, serializable.

`FakeQuant` quantizes an activation tensor (per tensor) with one of four methods:

    "minmax"  EMA min/max observer: in training, range <- m range + (1 - m) batch range (m = 0.9; the first
              batch, or calibration, sets it); scale and zero point from the range (`minmax_params`), no
              gradient to them.
    "lsq"     LSQ: a learned scale (and, asymmetric, a learned zero point: LSQ+), gradient scale
              1 / sqrt(n q_max); initialized from the calibration's min/max grid (MQBench's library).
              The gradient scale is designed for SGD: Adam moves every parameter by about its learning
              rate per step, so with Adam keep lr <= 1e-3 (or give the scales a slower optimizer).
    "pact"    PACT: clip to [lower, alpha], alpha learned (init 6; lower = 0 unsigned, -alpha symmetric
              signed, a learned beta init -6 asymmetric); no gradient inside the range.
    "dorefa"  DoReFa: clip to [0, 1] (unsigned) or [-1, 1] (signed), quantize.

`QuantizedLayer` wraps a Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D, Dense or EinsumDense (and
the BatchNormalization right after it, folded): the forward pass uses fake-quantized kernels, per tensor
or per output channel, with the weight method ("lsq": learned scale; "minmax": the kernel's current
range; "pact" and "dorefa": DoReFa's tanh-normalized weights, as MQBench pairs them).

**BatchNorm folding during QAT: MQBench's "TorchFold" (strategy 4, PyTorch's ConvBn QAT modules).** With
f = gamma / sqrt(moving_var + eps) per output channel:

    y = BN( conv(x, Q(w f)) / f + b )

BN acts as itself: batch statistics in training (its moving statistics updated as BN would), moving
statistics in inference, where the expression is exactly the merged layer conv(x, Q(w f)) + beta + (b - mu) f,
so what QAT trains is what `quantize.convert` deploys. The expression is evaluated in closed form on
conv(x, Q(w f)) (`QuantizedLayer._folded_batch_norm`): no division pass, no separate BN pass.
"""

from __future__ import annotations

import math

import numpy as np

import keras
from keras import ops

from autoinit_tf.quantize.fake_quant import (dorefa_activation, dorefa_weights, fake_quantize, lsq_quantize,
                                             minmax_grid, minmax_params, pact_quantize, pow2_scale, quant_range,
                                             range_grid, round_ste)

__all__ = ["FakeQuant", "QuantizedLayer", "METHODS", "QUANTIZABLE", "quantizable", "kernel_names",
           "linear_call"]

METHODS = ("lsq", "minmax", "pact", "dorefa")

#: The layer classes whose weights `prepare` quantizes.
QUANTIZABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.DepthwiseConv1D,
               keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
               keras.layers.Dense, keras.layers.EinsumDense)

_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def quantizable(layer) -> str | None:
    """None when `prepare` can quantize `layer`'s weights, else the reason it stays in float."""
    if not isinstance(layer, QUANTIZABLE) or isinstance(layer, (keras.layers.Conv1DTranspose,
                                                               keras.layers.Conv2DTranspose,
                                                               keras.layers.Conv3DTranspose)):
        return f"{type(layer).__name__} has no quantized form"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "channels_first layers are kept in float"
    if getattr(layer, "quantization_mode", None):
        return f"already quantized by Keras ({layer.quantization_mode})"
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled layers are kept in float"
    return None


def kernel_names(layer) -> tuple:
    return ("depthwise_kernel", "pointwise_kernel") if isinstance(layer, _SEPARABLE) else ("kernel",)


def _channel_view_shape(kernel_shape, depthwise):
    """A kernel as (rows, output channels): a depthwise kernel (..., in, mult) has in * mult channels."""
    channels = kernel_shape[-2] * kernel_shape[-1] if depthwise else kernel_shape[-1]
    return (-1, int(channels))


def linear_call(layer, x, kernels, bias=None):
    """`layer`'s linear op on `x` with `kernels` in place of its own (bias and activation not applied)."""
    if isinstance(layer, _SEPARABLE):
        return ops.separable_conv(x, kernels[0], kernels[1], strides=layer.strides, padding=layer.padding,
                                  data_format=layer.data_format, dilation_rate=layer.dilation_rate)
    if isinstance(layer, _DEPTHWISE):
        return ops.depthwise_conv(x, kernels[0], strides=layer.strides, padding=layer.padding,
                                  data_format=layer.data_format, dilation_rate=layer.dilation_rate)
    if isinstance(layer, _CONV):
        padding = layer.padding
        if padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            x = ops.pad(x, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        return ops.conv(x, kernels[0], strides=list(layer.strides), padding=padding,
                        dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    if isinstance(layer, keras.layers.EinsumDense):
        return ops.einsum(layer.equation, x, kernels[0])
    return ops.matmul(x, kernels[0])


class _Observed:
    """Running min, max and mean |x| of what a quantizer saw during calibration (NumPy, float64)."""

    def __init__(self):
        self.lo, self.hi, self.abs_sum, self.count = math.inf, -math.inf, 0.0, 0

    def add(self, x):
        x = np.asarray(ops.convert_to_numpy(x), np.float64)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.abs_sum += float(np.abs(x).sum())
        self.count += x.size


def _check(bits, method):
    if method not in METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; choose one of {METHODS}.")
    if not (isinstance(bits, (int, np.integer)) and 2 <= bits <= 16):
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}.")


@keras.saving.register_keras_serializable(package="autoinit_tf")
class FakeQuant(keras.layers.Layer):
    """Fake quantization of an activation (per tensor); see the module docstring for the methods.

    `signed=False` is the unsigned grid [0, 2^b - 1] (after a ReLU, MQBench's adaptive signedness);
    `narrow_range` the symmetric [-(2^(b-1) - 1), 2^(b-1) - 1] of TensorRT; `pow2` power-of-two scales."""

    def __init__(self, bits=8, method="minmax", symmetric=True, signed=True, narrow_range=False, pow2=False,
                 momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        _check(bits, method)
        self.bits, self.method, self.symmetric, self.signed = int(bits), method, bool(symmetric), bool(signed)
        self.narrow_range, self.pow2, self.momentum = bool(narrow_range), bool(pow2), float(momentum)
        self.q_min, self.q_max = quant_range(self.bits, self.signed, self.narrow_range and self.signed)
        self.observing = False
        self.observed = None

    def build(self, input_shape):
        if self.method == "minmax":
            self.range_min = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_min")
            self.range_max = self.add_weight(shape=(), initializer="zeros", trainable=False, name="range_max")
            self.initialized = self.add_weight(shape=(), initializer="zeros", trainable=False, name="initialized")
        elif self.method == "lsq":
            self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
            if not self.symmetric:
                self.zero_point = self.add_weight(shape=(), initializer="zeros", name="zero_point")
        elif self.method == "pact":
            self.alpha = self.add_weight(shape=(), initializer=keras.initializers.Constant(6.0), name="alpha")
            if not self.symmetric and self.signed:
                self.lower = self.add_weight(shape=(), initializer=keras.initializers.Constant(-6.0), name="lower")

    def call(self, x, training=False):
        if self.observing:
            self.observed.add(x)
            return x
        if self.method == "minmax":
            lo, hi = self.range_min, self.range_max
            if training:
                batch_lo = ops.stop_gradient(ops.cast(ops.min(x), lo.dtype))
                batch_hi = ops.stop_gradient(ops.cast(ops.max(x), hi.dtype))
                seen = self.initialized > 0.5
                lo = ops.where(seen, self.momentum * lo + (1.0 - self.momentum) * batch_lo, batch_lo)
                hi = ops.where(seen, self.momentum * hi + (1.0 - self.momentum) * batch_hi, batch_hi)
                self.range_min.assign(lo)
                self.range_max.assign(hi)
                self.initialized.assign(1.0)
            s, z = minmax_grid(lo, hi, self.q_min, self.q_max, self.symmetric, self.pow2)
            return fake_quantize(x, ops.stop_gradient(s), ops.stop_gradient(z), self.q_min, self.q_max)
        if self.method == "lsq":
            z = round_ste(self.zero_point) if not self.symmetric else 0.0
            return lsq_quantize(x, ops.abs(self.scale) + 1e-12, self.q_min, self.q_max, zero_point=z, pow2=self.pow2)
        if self.method == "pact":
            lower = self.lower if (not self.symmetric and self.signed) else None
            return pact_quantize(x, self.alpha, self.q_min, self.q_max, lower)
        return dorefa_activation(x, self.q_min, self.q_max)

    # ---------------------------------------------------------------------------------------------
    def grid(self):
        """(scale, zero_point) the layer uses in inference, as floats."""
        if self.method == "minmax":
            s, z = minmax_grid(self.range_min, self.range_max, self.q_min, self.q_max, self.symmetric, self.pow2)
        elif self.method == "lsq":
            s = ops.abs(self.scale) + 1e-12
            if self.pow2:
                s = pow2_scale(s)
            z = ops.round(self.zero_point) if not self.symmetric else 0.0
        else:  # the clip range of PACT (alpha, lower) or DoReFa ([0, 1] or [-1, 1])
            alpha = ops.convert_to_tensor(self.alpha if self.method == "pact" else 1.0, "float32")
            if self.method == "pact" and not self.symmetric and self.signed:
                lower = self.lower
            else:
                lower = ops.zeros_like(alpha) if self.q_min == 0 else -alpha
            s, z = range_grid(lower, alpha, self.q_min, self.q_max)
        return float(ops.convert_to_numpy(s)), float(ops.convert_to_numpy(z))

    def value_range(self):
        """(lowest, highest) representable value: ((q_min - z) s, (q_max - z) s)."""
        s, z = self.grid()
        return (self.q_min - z) * s, (self.q_max - z) * s

    def start_observing(self):
        self.observing, self.observed = True, _Observed()

    def finish_observing(self):
        """Set the range (minmax) or the initial scale (LSQ) from what calibration saw."""
        self.observing, seen = False, self.observed
        self.observed = None
        if seen is None or seen.count == 0:
            return
        if self.method == "minmax":
            self.range_min.assign(seen.lo)
            self.range_max.assign(seen.hi)
            self.initialized.assign(1.0)
        elif self.method == "lsq":  # the observer's grid, as MQBench's library initializes LSQ
            s, z = minmax_params(np.float32(seen.lo), np.float32(seen.hi), self.q_min, self.q_max, self.symmetric)
            self.scale.assign(float(ops.convert_to_numpy(s)))
            if not self.symmetric:
                self.zero_point.assign(float(ops.convert_to_numpy(z)))

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "method": self.method, "symmetric": self.symmetric,
                "signed": self.signed, "narrow_range": self.narrow_range, "pow2": self.pow2,
                "momentum": self.momentum}

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="autoinit_tf")
class QuantizedLayer(keras.layers.Layer):
    """A conv / dense layer (and the BatchNormalization folded into it) with fake-quantized kernels.

    The wrapped layers keep their own variables (kernel, bias, gamma, beta, moving statistics), so a
    `.keras` file of a prepared model reloads them by name; LSQ adds one learned scale per kernel (per
    output channel with `per_channel`) and, asymmetric, a zero point."""

    def __init__(self, layer, batch_norm=None, bits=8, method="minmax", per_channel=True, symmetric=True,
                 narrow_range=False, pow2=False, **kwargs):
        super().__init__(**kwargs)
        _check(bits, method)
        reason = quantizable(layer)
        if reason:
            raise ValueError(f"Cannot quantize layer '{layer.name}': {reason}.")
        if batch_norm is not None and isinstance(layer, keras.layers.EinsumDense):
            raise ValueError("BatchNormalization is folded only into conv and Dense layers.")
        self.layer, self.batch_norm = layer, batch_norm
        self.bits, self.method, self.per_channel = int(bits), method, bool(per_channel)
        self.symmetric, self.narrow_range, self.pow2 = bool(symmetric), bool(narrow_range), bool(pow2)
        self.q_min, self.q_max = quant_range(self.bits, True, self.narrow_range)
        # per kernel: is it depthwise, (..., in, mult) with in * mult output channels
        self.depthwise = [True, False] if isinstance(layer, _SEPARABLE) else [isinstance(layer, _DEPTHWISE)]
        self.observing = False

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.batch_norm is not None and not self.batch_norm.built:
            self.batch_norm.build(self.layer.compute_output_shape(input_shape))
        self.weight_scales, self.weight_zero_points = [], []
        if self.method == "lsq":
            for i, name in enumerate(kernel_names(self.layer)):
                k = getattr(self.layer, name)
                shape = (_channel_view_shape(k.shape, self.depthwise[i])[1],) if self.per_channel else ()
                self.weight_scales.append(self.add_weight(shape=shape, initializer="ones", name=f"{name}_scale"))
                if not self.symmetric:
                    self.weight_zero_points.append(self.add_weight(shape=shape, initializer="zeros",
                                                                   name=f"{name}_zero_point"))

    # ---------------------------------------------------------------------------------------------
    def fold_factor(self):
        """f = gamma / sqrt(moving_var + eps) per output channel (None without a folded BatchNorm)."""
        bn = self.batch_norm
        if bn is None:
            return None
        f = ops.rsqrt(ops.cast(bn.moving_variance, "float32") + bn.epsilon)
        if bn.scale:
            f = f * bn.gamma
        return ops.where(ops.abs(f) < 1e-12, 1e-12, f)

    def _kernel_views(self, f):
        """The float kernels as (rows, channels) views, the last one multiplied by the fold factor `f`."""
        names = kernel_names(self.layer)
        views = []
        for i, name in enumerate(names):
            k = getattr(self.layer, name)
            v = ops.reshape(k, _channel_view_shape(k.shape, self.depthwise[i]))
            if f is not None and i == len(names) - 1:
                v = v * f
            views.append(v)
        return views

    def _quantize_view(self, i, v):
        axis = -1 if self.per_channel else None
        if self.method == "lsq":
            z = round_ste(self.weight_zero_points[i]) if not self.symmetric else 0.0
            return lsq_quantize(v, ops.abs(self.weight_scales[i]) + 1e-12, self.q_min, self.q_max, axis=axis,
                                zero_point=z, pow2=self.pow2)
        if self.method == "minmax":
            s, z = self._minmax_grid(v)
            return fake_quantize(v, s, z, self.q_min, self.q_max, axis=axis)
        return dorefa_weights(v, self.q_min, self.q_max, axis=axis)

    def _minmax_grid(self, v):
        if self.per_channel:
            lo, hi = ops.min(v, axis=0), ops.max(v, axis=0)
        else:
            lo, hi = ops.min(v), ops.max(v)
        return minmax_grid(ops.stop_gradient(lo), ops.stop_gradient(hi), self.q_min, self.q_max, self.symmetric,
                           self.pow2)

    def quantized_kernels(self, quantize=True, f=None):
        """The kernels the forward pass uses (BN folded in the last one, with the fold factor `f` when the
        caller has it), in the layer's kernel shapes."""
        f = self.fold_factor() if f is None else f
        out = []
        for i, (name, v) in enumerate(zip(kernel_names(self.layer), self._kernel_views(f))):
            q = self._quantize_view(i, v) if quantize else v
            out.append(ops.reshape(q, getattr(self.layer, name).shape))
        return out

    def weight_grids(self):
        """[(scale, zero_point)] per kernel, NumPy, as used in inference (DoReFa: the grid of tanh(w) / max)."""
        grids = []
        for i, v in enumerate(self._kernel_views(self.fold_factor())):
            if self.method == "lsq":
                s = ops.abs(self.weight_scales[i]) + 1e-12
                if self.pow2:
                    s = pow2_scale(s)
                z = ops.round(self.weight_zero_points[i]) if not self.symmetric else ops.zeros_like(s)
            elif self.method == "minmax":
                s, z = self._minmax_grid(v)
            else:
                s = np.float32(2.0 / (self.q_max - self.q_min))
                z = np.float32(0.0)
            grids.append((np.asarray(ops.convert_to_numpy(s), np.float32),
                          np.asarray(ops.convert_to_numpy(z), np.float32)))
        return grids

    def folded_bias(self):
        """The bias of the merged layer: beta + (b - mu) f with a folded BN, else the layer's bias (or None)."""
        layer, bn = self.layer, self.batch_norm
        b = ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        if bn is None:
            return b
        f = ops.convert_to_numpy(self.fold_factor())
        mu = ops.convert_to_numpy(bn.moving_mean)
        beta = ops.convert_to_numpy(bn.beta) if bn.center else 0.0
        return (beta + ((0.0 if b is None else b) - mu) * f).astype("float32")

    def init_weight_scales(self):
        """LSQ's initial weight scales (and zero points): the min/max grid of the folded kernels, per channel
        with `per_channel`, as MQBench's library initializes LSQ from its observers. (The paper's
        2 mean|w| / sqrt(q_max), `lsq_init_scale`, is meant for 2-4 bits: at 8 bits its step is about 8x
        coarser than the weights' range needs.)"""
        if self.method != "lsq":
            return
        for i, v in enumerate(self._kernel_views(self.fold_factor())):
            v = np.asarray(ops.convert_to_numpy(v), np.float32)
            lo, hi = (v.min(axis=0), v.max(axis=0)) if self.per_channel else (v.min(), v.max())
            s, z = minmax_params(lo, hi, self.q_min, self.q_max, self.symmetric)
            self.weight_scales[i].assign(ops.convert_to_numpy(s))
            if not self.symmetric:
                self.weight_zero_points[i].assign(ops.convert_to_numpy(z))

    def call(self, x, training=False):
        layer = self.layer
        f = self.fold_factor()  # once per call: the kernels and the BN expression share it
        y = linear_call(layer, x, self.quantized_kernels(quantize=not self.observing, f=f))
        if self.batch_norm is not None:
            y = self._folded_batch_norm(y, training, f)
        elif layer.use_bias:
            y = y + layer.bias
        return layer.activation(y) if layer.activation is not None else y

    def _folded_batch_norm(self, c, training, f):
        """TorchFold's BN(c / f + b) computed on c = conv(x, Q(w f)) itself, without the division and the bias
        pass: with y0 = c / f + b the batch has mean m_c / f + b and variance v_c / f^2, so

            training:   BN(y0) = (c - m_c) |gamma| / sqrt(v_c + eps f^2) + beta   (sign(f) = sign(gamma)),
                        two element-wise passes instead of BN's own plus a division and a bias add,
                        moving statistics updated with (m_c / f + b, v_c / f^2) as BN itself would;
            inference:  BN(y0) = c + beta + (b - mu) f.
        """
        bn, layer = self.batch_norm, self.layer
        f = ops.cast(f, c.dtype)
        b = ops.cast(layer.bias, c.dtype) if layer.use_bias else 0.0
        beta = ops.cast(bn.beta, c.dtype) if bn.center else 0.0
        if training and bn.trainable:
            mean, var = ops.moments(c, axes=list(range(len(c.shape) - 1)))
            m = bn.momentum
            bn.moving_mean.assign(bn.moving_mean * m + (mean / f + b) * (1.0 - m))
            bn.moving_variance.assign(bn.moving_variance * m + (var / (f * f)) * (1.0 - m))
            gamma = ops.abs(ops.cast(bn.gamma, c.dtype)) if bn.scale else 1.0
            scale = gamma * ops.rsqrt(var + bn.epsilon * f * f)
            # b cancels in training (d BN / d b = 0, as for a conv bias before BN); 0 * b keeps it in the graph so
            # that optimizers get a zero gradient rather than none
            return c * scale + (beta - mean * scale + 0.0 * b)
        return c + (beta + (b - ops.cast(bn.moving_mean, c.dtype)) * f)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(layer=keras.saving.serialize_keras_object(self.layer),
                      batch_norm=(None if self.batch_norm is None
                                  else keras.saving.serialize_keras_object(self.batch_norm)),
                      bits=self.bits, method=self.method, per_channel=self.per_channel, symmetric=self.symmetric,
                      narrow_range=self.narrow_range, pow2=self.pow2)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        if config.get("batch_norm") is not None:
            config["batch_norm"] = keras.saving.deserialize_keras_object(config["batch_norm"])
        return cls(**config)
