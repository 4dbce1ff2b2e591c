"""Weight-standardized Dense and convolution layers (Qiao et al. 2019; Brock et al. 2021 "scaled WS";
used by the DP-SGD recipe of De et al., arXiv 2204.13650).

The stored kernel ``w`` is reparametrized on every call (no constraint, gradients flow through):

    w^ = gain * (w - mean(w)) / sqrt(max(fan_in * var(w), epsilon))

with mean and (biased) variance per OUTPUT channel over the fan-in axes, a learnable per-channel
``gain`` (init 1) and ``epsilon = 1e-4``. Each output channel then has ``sum w^2 = gain^2`` and
``sum w^ = 0``: for i.i.d. inputs of variance v the pre-activation variance is ``gain^2 v``.
The standardization is computed in float32. Default kernel initializer:
``VarianceScaling(1.0, "fan_in", "normal")`` as in the DP recipe.
"""

from __future__ import annotations

import keras
from keras import ops

_DEFAULT_INIT = {"class_name": "VarianceScaling", "config": {"scale": 1.0, "mode": "fan_in", "distribution": "normal"}}


def standardize_kernel(kernel, gain, epsilon=1e-4):
    """``gain * (w - mean) / sqrt(max(fan_in var, eps))`` per output channel (last axis)."""
    w = ops.cast(kernel, "float32")
    axes = tuple(range(len(w.shape) - 1))
    fan_in = 1
    for d in w.shape[:-1]:
        fan_in *= int(d)
    mean = ops.mean(w, axis=axes, keepdims=True)
    var = ops.mean(ops.square(w - mean), axis=axes, keepdims=True)
    scale = ops.rsqrt(ops.maximum(var * fan_in, epsilon)) * ops.cast(gain, "float32")
    return (w - mean) * scale


class _WSMixin:
    def _ws_init(self, epsilon):
        self.ws_epsilon = float(epsilon)

    def _add_gain(self, n):
        self.gain = self.add_weight(name="gain", shape=(n,), initializer="ones")

    def standardized_kernel(self):
        return standardize_kernel(self.kernel, self.gain, self.ws_epsilon)

    # Conv/Dense save only (kernel, bias) for quantization support; the generic Layer methods save
    # every variable (kernel, bias, gain) in creation order.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)


def _ws_conv(base, rank):
    class _WSConv(_WSMixin, base):
        def __init__(self, *args, ws_epsilon=1e-4, kernel_initializer=None, **kwargs):
            super().__init__(*args, kernel_initializer=kernel_initializer or _DEFAULT_INIT, **kwargs)
            self._ws_init(ws_epsilon)

        def build(self, input_shape):
            super().build(input_shape)
            self._add_gain(self.filters)

        def convolution_op(self, inputs, kernel):
            k = ops.cast(standardize_kernel(kernel, self.gain, self.ws_epsilon), inputs.dtype)
            return super().convolution_op(inputs, k)

        def call(self, inputs):
            # Our own call, not the base class's: Keras 3.15's Conv1D.call runs ops.conv on
            # self.kernel directly (for causal padding), so a convolution_op override alone never
            # standardized WSConv1D.
            padding = self.padding
            if padding == "causal":
                inputs = ops.pad(inputs, self._compute_causal_padding())
                padding = "valid"
            k = ops.cast(standardize_kernel(self.kernel, self.gain, self.ws_epsilon), inputs.dtype)
            outputs = ops.conv(inputs, k, strides=list(self.strides), padding=padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
            if self.use_bias:
                if self.data_format == "channels_last":
                    shape = (1,) * (self.rank + 1) + (self.filters,)
                else:
                    shape = (1, self.filters) + (1,) * self.rank
                outputs = ops.add(outputs, ops.reshape(self.bias, shape))
            if self.activation is not None:
                return self.activation(outputs)
            return outputs

        def get_config(self):
            return {**super().get_config(), "ws_epsilon": self.ws_epsilon}

    name = f"WSConv{rank}D"
    _WSConv.__name__ = name
    _WSConv.__qualname__ = name
    _WSConv.__module__ = __name__
    _WSConv.__doc__ = (
        f"`keras.layers.Conv{rank}D` with a weight-standardized kernel "
        "``gain * (w - mean) / sqrt(max(fan_in var, eps))`` per output channel (see module docstring). "
        "Extra argument: ws_epsilon (1e-4)."
    )
    return keras.saving.register_keras_serializable(package="autoinit_tf", name=name)(_WSConv)


WSConv1D = _ws_conv(keras.layers.Conv1D, 1)
WSConv2D = _ws_conv(keras.layers.Conv2D, 2)
WSConv3D = _ws_conv(keras.layers.Conv3D, 3)


@keras.saving.register_keras_serializable(package="autoinit_tf")
class WSDense(_WSMixin, keras.layers.Dense):
    """`keras.layers.Dense` with a weight-standardized kernel
    ``gain * (w - mean) / sqrt(max(fan_in var, eps))`` per output unit (see module docstring).
    Extra argument: ws_epsilon (1e-4). LoRA and quantization are not supported."""

    def __init__(self, units, ws_epsilon=1e-4, kernel_initializer=None, **kwargs):
        if kwargs.get("lora_rank"):
            raise ValueError("WSDense does not support LoRA.")
        super().__init__(units, kernel_initializer=kernel_initializer or _DEFAULT_INIT, **kwargs)
        self._ws_init(ws_epsilon)

    def build(self, input_shape):
        super().build(input_shape)
        self._add_gain(self.units)

    def call(self, inputs, training=None):
        k = ops.cast(self.standardized_kernel(), inputs.dtype)
        x = ops.matmul(inputs, k)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), "ws_epsilon": self.ws_epsilon}


# A short alias: the reparametrization itself.
WeightStandardization = standardize_kernel
