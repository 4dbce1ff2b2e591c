"""Global LogAvgExp pooling (Lowe, Trappenberg, Oore; arXiv 2111.01742).

    LAE_t(x_1..x_n) = t * log((1/n) sum_i exp(x_i / t)) = t * (logsumexp(x / t) - log n)

over the spatial axes of each channel (``log n`` is subtracted once). mean <= LAE_t <= max; it tends
to the max as t -> 0+ and to the arithmetic mean as t -> infinity. The temperature is fixed or
learnable; a learnable temperature is parametrized positively as ``t = exp(theta)`` (one scalar
per layer). Computed in float32 (also under mixed precision). In 1D a Keras mask is respected:
padded steps are excluded and n is the number of valid steps.
"""

from __future__ import annotations

import math

import keras
from keras import ops


class _GlobalLogAvgExpPooling(keras.layers.Layer):
    _rank = None

    def __init__(self, temperature=1.0, learnable=False, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        temperature = float(temperature)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.learnable = bool(learnable)
        if data_format is None:
            data_format = keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}.")
        self.data_format = data_format
        self.keepdims = bool(keepdims)
        self.supports_masking = self._rank == 1

    def build(self, input_shape):
        if len(input_shape) != self._rank + 2:
            raise ValueError(
                f"{type(self).__name__} expects a rank-{self._rank + 2} input, got shape {input_shape}."
            )
        if self.learnable:
            self.log_temperature = self.add_weight(
                name="log_temperature",
                shape=(),
                initializer=keras.initializers.Constant(math.log(self.temperature)),
                dtype="float32",
            )

    @property
    def _axes(self):
        if self.data_format == "channels_last":
            return tuple(range(1, self._rank + 1))
        return tuple(range(2, self._rank + 2))

    def current_temperature(self):
        if self.learnable:
            return ops.exp(ops.cast(self.log_temperature, "float32"))
        return ops.convert_to_tensor(self.temperature, dtype="float32")

    def call(self, inputs, mask=None):
        # Evaluated as c + t * log1p(mean(expm1((x - c) / t))) with c = max(x) (no gradient through
        # c; the value does not depend on it). Equal to t * (logsumexp(x / t) - log n), but it
        # keeps float32 precision for large t, where logsumexp - log n cancels catastrophically.
        x = ops.cast(inputs, "float32")
        t = self.current_temperature()
        axes = self._axes
        if mask is None:
            c = ops.stop_gradient(ops.max(x, axis=axes, keepdims=True))
            s = ops.mean(ops.expm1((x - c) / t), axis=axes, keepdims=True)
            out = c + t * ops.log1p(s)
        else:
            m = ops.cast(mask, "float32")
            m = ops.expand_dims(m, -1 if self.data_format == "channels_last" else 1)
            valid = m > 0
            n = ops.sum(m, axis=axes, keepdims=True)
            low = ops.min(x, axis=axes, keepdims=True)
            c = ops.stop_gradient(ops.max(ops.where(valid, x, low), axis=axes, keepdims=True))
            e = ops.where(valid, ops.expm1(ops.where(valid, x - c, 0.0) / t), 0.0)
            s = ops.sum(e, axis=axes, keepdims=True) / ops.maximum(n, 1.0)
            out = ops.where(n > 0, c + t * ops.log1p(s), 0.0)
        if not self.keepdims:
            out = ops.squeeze(out, axis=axes)
        return ops.cast(out, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        axes = self._axes
        if self.keepdims:
            return tuple(1 if i in axes else d for i, d in enumerate(input_shape))
        return tuple(d for i, d in enumerate(input_shape) if i not in axes)

    def get_config(self):
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "learnable": self.learnable,
            "data_format": self.data_format,
            "keepdims": self.keepdims,
        }


@keras.saving.register_keras_serializable(package="autoinit_tf")
class LogAvgExpPooling1D(_GlobalLogAvgExpPooling):
    """Global LogAvgExp pooling over the steps of (batch, steps, channels); masks respected.

    ``t * (logsumexp(x / t) - log n)`` per channel (Lowe et al., arXiv 2111.01742).
    Args: temperature (> 0), learnable (``t = exp(theta)``), data_format, keepdims.
    """

    _rank = 1


@keras.saving.register_keras_serializable(package="autoinit_tf")
class LogAvgExpPooling2D(_GlobalLogAvgExpPooling):
    """Global LogAvgExp pooling over (H, W): ``t * (logsumexp(x / t) - log(H W))`` per channel.

    Lowe et al., arXiv 2111.01742. Args: temperature (> 0), learnable (``t = exp(theta)``),
    data_format, keepdims.
    """

    _rank = 2


@keras.saving.register_keras_serializable(package="autoinit_tf")
class LogAvgExpPooling3D(_GlobalLogAvgExpPooling):
    """Global LogAvgExp pooling over (D, H, W): ``t * (logsumexp(x / t) - log(D H W))``.

    Lowe et al., arXiv 2111.01742. Args: temperature (> 0), learnable (``t = exp(theta)``),
    data_format, keepdims.
    """

    _rank = 3
