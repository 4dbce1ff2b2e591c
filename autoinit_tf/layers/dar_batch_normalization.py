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

Computation (two passes over x, like BatchNormalization's moments, plus one output pass): with
``S1_b = sum_pos x_b`` per example and channel, the group means are ``mean_n = sum_b (1 - m_b) S1_b /
N_n`` and ``mean_z = sum_b m_b S1_b / N_z`` (``N`` = examples in the group x positions); with
``mu_b`` the own-group mean and ``S2_b = sum_pos (x_b - mu_b)^2`` the variances are the same
mask-weighted sums of ``S2_b``; then ``y_b = x_b a_b + c_b`` with the per-example scale
``a_b = gamma / sqrt(var_b + epsilon)`` and shift ``c_b = beta - mu_b a_b``. The mask is binary.
"""

from __future__ import annotations

import math

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

    def _scale_shift(self, mean, var, gamma, beta):
        """(a, c) with gamma (x - mean) / sqrt(var + eps) + beta = x * a + c."""
        a = ops.rsqrt(var + self.epsilon)
        if gamma is not None:
            a = a * gamma
        c = -mean * a
        if beta is not None:
            c = c + beta
        return a, c

    def call(self, inputs, noise_mask=None, training=None):
        if isinstance(inputs, (list, tuple)):
            inputs, noise_mask = inputs
        x = ops.cast(inputs, "float32")
        rank = len(x.shape)
        gamma = ops.cast(self.gamma, "float32") if self.scale else None
        beta = ops.cast(self.beta, "float32") if self.center else None
        moving_mean = ops.cast(self.moving_mean, "float32")
        moving_var = ops.cast(self.moving_variance, "float32")
        if not training:  # one scale/shift per channel, one pass over x
            a, c = self._scale_shift(moving_mean, moving_var, gamma, beta)
            return ops.cast(x * a + c, self.compute_dtype)
        if noise_mask is None:
            m = ops.zeros((ops.shape(x)[0], 1), dtype="float32")
        else:
            m = ops.reshape(ops.cast(noise_mask, "float32"), (-1, 1))  # (B, 1)
        spatial = tuple(range(1, rank - 1))
        dims = tuple(ops.shape(x)[1:-1])
        if all(isinstance(d, int) for d in dims):
            pix = float(math.prod(dims))  # positions per example (static)
        else:
            pix = ops.cast(ops.prod(ops.convert_to_tensor(dims)), "float32")
        bcast = (-1,) + (1,) * (rank - 2) + (x.shape[-1],)

        def per_example_sum(t):  # (B, ..., C) -> (B, C)
            return ops.sum(t, axis=spatial) if spatial else t

        # Pass 1: per-example channel sums, then the two group means from (B, C) tensors only.
        s1 = per_example_sum(x)
        cnt_z = ops.sum(m) * pix
        cnt_n = ops.sum(1.0 - m) * pix
        mean_z = ops.sum(m * s1, axis=0) / ops.maximum(cnt_z, 1e-12)
        mean_n = ops.sum((1.0 - m) * s1, axis=0) / ops.maximum(cnt_n, 1e-12)
        mu = m * mean_z + (1.0 - m) * mean_n  # (B, C): each example's group mean
        # Pass 2: centred squares about the own-group mean. The stop_gradient is exact: the
        # derivative of sum_group (x - mean)^2 with respect to its own mean is zero.
        d = x - ops.reshape(ops.stop_gradient(mu), bcast)
        s2 = per_example_sum(ops.square(d))
        var_z = ops.sum(m * s2, axis=0) / ops.maximum(cnt_z, 1e-12)
        var_n = ops.sum((1.0 - m) * s2, axis=0) / ops.maximum(cnt_n, 1e-12)
        var = m * var_z + (1.0 - m) * var_n
        # Normalization fused into one per-example scale and shift: y = x * a_b + c_b.
        a, c = self._scale_shift(mu, var, gamma, beta)
        out = x * ops.reshape(a, bcast) + ops.reshape(c, bcast)
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
