"""Group-wise iterative batch whitening, IterNorm (Huang et al., CVPR 2019), as used by Cho et al.
(ICCV 2021, arXiv 2108.10629, "whitening before the convolution").

Channels (last axis) are split into groups of g (default 64; halved until it divides C). For each
group, over all m = N * H * W positions (float32):

    X_c = X - mu;  Sigma = X_c X_c^T / m + epsilon I;  Sigma_N = Sigma / tr(Sigma);  P_0 = I
    P_{k+1} = (3 P_k - P_k^3 Sigma_N) / 2,  k = 0..T-1   (Newton iterations, T = 5)
    W = P_T / sqrt(tr(Sigma))  (~ Sigma^(-1/2));  X^ = W X_c;  y = gamma * X^ + beta (per channel)

Running mean and running whitening matrix: ``r <- r + momentum (batch - r)``, momentum 0.1
(PyTorch convention), used at inference. Gradients flow through the iterations.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def resolve_group_size(channels: int, group_size: int) -> int:
    """The group size actually used: ``group_size`` halved until it divides ``channels``."""
    g = max(1, int(group_size))
    while channels % g:
        g //= 2
    return g


@keras.saving.register_keras_serializable(package="autoinit_tf")
class IterNormWhitening(keras.layers.Layer):
    """Group-wise ZCA-style whitening by Newton iterations (see the module docstring).

    Args: group_size (64), iterations T (5), epsilon (1e-5), momentum (0.1), center, scale.
    """

    def __init__(self, group_size=64, iterations=5, epsilon=1e-5, momentum=0.1, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        self.group_size = int(group_size)
        self.iterations = int(iterations)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.center = bool(center)
        self.scale = bool(scale)

    def build(self, input_shape):
        c = input_shape[-1]
        if c is None:
            raise ValueError("IterNormWhitening needs a static channel (last) dimension.")
        self.channels = int(c)
        self.g = resolve_group_size(self.channels, self.group_size)
        self.groups = self.channels // self.g
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
        if self.center:
            self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
        self.running_mean = self.add_weight(
            name="running_mean", shape=(self.groups, self.g), initializer="zeros", trainable=False
        )
        g, groups = self.g, self.groups

        def identity_stack(shape, dtype=None):
            eye = np.broadcast_to(np.eye(g, dtype="float32"), (groups, g, g)).copy()
            return ops.convert_to_tensor(eye, dtype=dtype or "float32")

        self.running_whitening = self.add_weight(
            name="running_whitening", shape=(groups, g, g), initializer=identity_stack, trainable=False
        )
        self._eye = np.eye(self.g, dtype="float32")

    def whitening_matrix(self, xc):
        """W (G, g, g) from centred data xc (m, G, g), float32."""
        m = ops.cast(ops.shape(xc)[0], "float32")
        eye = ops.convert_to_tensor(self._eye)
        sigma = ops.einsum("mgi,mgj->gij", xc, xc) / m + self.epsilon * eye[None]
        tr = ops.sum(sigma * eye[None], axis=(1, 2))  # (G,)
        sigma_n = sigma / tr[:, None, None]
        p = ops.broadcast_to(eye[None], ops.shape(sigma_n))
        for _ in range(self.iterations):
            p3 = ops.matmul(ops.matmul(p, p), p)
            p = 1.5 * p - 0.5 * ops.matmul(p3, sigma_n)
        return p * ops.rsqrt(tr)[:, None, None]

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        shape = ops.shape(x)
        flat = ops.reshape(x, (-1, self.groups, self.g))
        if training:
            mean = ops.mean(flat, axis=0)
            xc = flat - mean[None]
            w = self.whitening_matrix(xc)
            mom = self.momentum
            r_mean = ops.cast(self.running_mean, "float32")
            r_w = ops.cast(self.running_whitening, "float32")
            self.running_mean.assign(r_mean + mom * (ops.stop_gradient(mean) - r_mean))
            self.running_whitening.assign(r_w + mom * (ops.stop_gradient(w) - r_w))
        else:
            mean = ops.cast(self.running_mean, "float32")
            xc = flat - mean[None]
            w = ops.cast(self.running_whitening, "float32")
        out = ops.einsum("gij,mgj->mgi", w, xc)
        out = ops.reshape(out, shape)
        if self.scale:
            out = out * ops.cast(self.gamma, "float32")
        if self.center:
            out = out + ops.cast(self.beta, "float32")
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "group_size": self.group_size,
            "iterations": self.iterations,
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "center": self.center,
            "scale": self.scale,
        }
