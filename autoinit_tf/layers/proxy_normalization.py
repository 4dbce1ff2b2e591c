"""Proxy Normalization, the PN-Act step (Labatie, Masters, Eaton-Rosen, Luschi, NeurIPS 2021).

Placed after a batch-independent normalization (LayerNormalization / GroupNormalization, without
an affine of their own). For an input ``y`` (channels last):

    z = phi(gamma * y + beta)                      (per-channel affine, then the activation)
    y~_j = sqrt(2) erfinv(2 (j + 0.5) / n - 1)     (n deterministic N(0, 1) quantile samples)
    z~_j = phi(gamma * y~_j + beta);  mu~ = mean_j z~_j;  s~^2 = var_j z~_j  (biased, per channel)
    out = (z - mu~) / sqrt(s~^2 + epsilon)

The proxy statistics depend only on (gamma, beta, phi), so gradients reach gamma and beta through
both ``z`` and ``(mu~, s~^2)``. Defaults n = 256 and epsilon = 0.03 (part of the method; a small
epsilon is advised against). The proxy statistics are computed in float32 under mixed precision.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from autoinit_tf.moments import standard_normal_quantiles


@keras.saving.register_keras_serializable(package="autoinit_tf")
class ProxyNormalization(keras.layers.Layer):
    """PN-Act: per-channel affine, activation, then normalization by proxy statistics.

    Args:
        activation: any Keras activation (name or callable), default ``"relu"``.
        n_samples: number of deterministic Gaussian quantile samples (default 256).
        epsilon: added to the proxy variance (default 0.03).
        axis: the channel axis (default -1).
        gamma_initializer, beta_initializer: initializers of the affine (ones, zeros).

    Reference: Labatie et al., "Proxy-Normalizing Activations to Match Batch Normalization while
    Removing Batch Dependence", NeurIPS 2021.
    """

    def __init__(
        self,
        activation="relu",
        n_samples=256,
        epsilon=0.03,
        axis=-1,
        gamma_initializer="ones",
        beta_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.n_samples = int(n_samples)
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}.")
        self.epsilon = float(epsilon)
        self.axis = int(axis)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self._quantiles = standard_normal_quantiles(self.n_samples).astype("float32")
        self.supports_masking = True

    def build(self, input_shape):
        axis = self.axis % len(input_shape)
        c = input_shape[axis]
        if c is None:
            raise ValueError("ProxyNormalization needs a static channel dimension.")
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer=self.gamma_initializer)
        self.beta = self.add_weight(name="beta", shape=(c,), initializer=self.beta_initializer)

    def _broadcast(self, v, rank):
        shape = [1] * rank
        shape[self.axis % rank] = v.shape[0]
        return ops.reshape(v, shape)

    def proxy_statistics(self):
        """(mu~, s~^2) per channel, float32."""
        g = ops.cast(self.gamma, "float32")
        b = ops.cast(self.beta, "float32")
        q = ops.convert_to_tensor(self._quantiles[:, None], dtype="float32")
        zt = self.activation(q * g[None, :] + b[None, :])
        zt = ops.cast(zt, "float32")
        mu = ops.mean(zt, axis=0)
        var = ops.mean(ops.square(zt - mu[None, :]), axis=0)
        return mu, var

    def call(self, inputs):
        rank = len(inputs.shape)
        x = ops.cast(inputs, self.compute_dtype)
        g = self._broadcast(ops.cast(self.gamma, self.compute_dtype), rank)
        b = self._broadcast(ops.cast(self.beta, self.compute_dtype), rank)
        z = ops.cast(self.activation(x * g + b), "float32")
        mu, var = self.proxy_statistics()
        out = (z - self._broadcast(mu, rank)) * self._broadcast(ops.rsqrt(var + self.epsilon), rank)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {
            **super().get_config(),
            "activation": keras.activations.serialize(self.activation),
            "n_samples": self.n_samples,
            "epsilon": self.epsilon,
            "axis": self.axis,
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
        }


_ = np  # numpy only used for the constant quantiles
