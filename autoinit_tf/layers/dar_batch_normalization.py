"""Distribution-Aware Routing Batch Normalization (Zada, Benou, Irani; ICML 2022, arXiv 2112.08810).

Batch normalization with a per-example noise mask ``m`` (1 = pure-noise example, 0 = natural):

    natural:  mu_n, var_n = masked batch mean / biased variance over the natural examples
    noise:    mu_z, var_z = masked batch mean / biased variance over the noise examples
    y = gamma * (x - mu) / sqrt(var + epsilon) + beta,  (mu, var) = (mu_z, var_z) if m else (mu_n, var_n)

Only the natural statistics update the moving mean/variance (Keras convention:
``moving = momentum * moving + (1 - momentum) * batch``); the noise statistics are never stored;
gamma and beta are shared; inference uses the moving (natural) statistics for every example. The
statistics are mask-weighted sums (no boolean gather), in float32. With no natural example in a
batch the moving statistics are left unchanged. Without a mask the layer is a plain BatchNorm.
Gradients flow through the noise branch too (the noise images train the network).
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="autoinit_tf")
class DARBatchNormalization(keras.layers.Layer):
    """DAR-BN over the last axis. Call ``layer(x)``, ``layer([x, noise_mask])`` or
    ``layer(x, noise_mask=m)``; the mask has shape (batch,) or (batch, 1), 1 for noise examples.

    Args: momentum (0.99), epsilon (1e-3), center, scale (Keras BatchNormalization conventions).
    """

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        c = input_shape[-1]
        if c is None:
            raise ValueError("DARBatchNormalization needs a static channel (last) dimension.")
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones", trainable=self.scale) if self.scale else None
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros", trainable=self.center) if self.center else None
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,), initializer="ones", trainable=False)

    def _masked_stats(self, x, w, axes):
        n = ops.sum(w, axis=axes)  # scalar-per-channel-broadcastable count
        safe = ops.maximum(n, 1e-12)
        mean = ops.sum(w * x, axis=axes) / safe
        var = ops.sum(w * ops.square(x - mean), axis=axes) / safe
        return mean, var, n

    def call(self, inputs, noise_mask=None, training=None):
        if isinstance(inputs, (list, tuple)):
            inputs, noise_mask = inputs
        x = ops.cast(inputs, "float32")
        rank = len(x.shape)
        axes = tuple(range(rank - 1))
        gamma = ops.cast(self.gamma, "float32") if self.scale else 1.0
        beta = ops.cast(self.beta, "float32") if self.center else 0.0
        moving_mean = ops.cast(self.moving_mean, "float32")
        moving_var = ops.cast(self.moving_variance, "float32")
        if not training:
            out = (x - moving_mean) * ops.rsqrt(moving_var + self.epsilon)
            return ops.cast(out * gamma + beta, self.compute_dtype)
        if noise_mask is None:
            m = ops.zeros((ops.shape(x)[0],) + (1,) * (rank - 1), dtype="float32")
        else:
            m = ops.reshape(ops.cast(noise_mask, "float32"), (-1,) + (1,) * (rank - 1))
        nat_w = (1.0 - m) * ops.ones_like(x[..., :1])
        noise_w = m * ops.ones_like(x[..., :1])
        mean_n, var_n, cnt_n = self._masked_stats(x, nat_w, axes)
        mean_z, var_z, _ = self._masked_stats(x, noise_w, axes)
        mu = m * mean_z + (1.0 - m) * mean_n
        var = m * var_z + (1.0 - m) * var_n
        out = (x - mu) * ops.rsqrt(var + self.epsilon) * gamma + beta
        has = ops.cast(cnt_n > 0, "float32")
        mom = self.momentum
        new_mean = moving_mean * mom + mean_n * (1.0 - mom)
        new_var = moving_var * mom + var_n * (1.0 - mom)
        self.moving_mean.assign(has * new_mean + (1.0 - has) * moving_mean)
        self.moving_variance.assign(has * new_var + (1.0 - has) * moving_var)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
        }
