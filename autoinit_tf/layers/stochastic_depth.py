"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger; ECCV 2016) and its DropPath variant.

The layer takes ``[shortcut, residual]`` and returns their gated sum. Two modes, side by side:

=============  ================================================  ==============================
mode           training                                          inference
=============  ================================================  ==============================
``"paper"``    ``shortcut + b * residual``, ONE b ~ Bernoulli(p)  ``shortcut + p * residual``
               per mini-batch (the whole batch shares it)
``"drop_path"`` ``shortcut + (b_i / p) * residual``, one           ``shortcut + residual``
               b_i ~ Bernoulli(p) per example
=============  ================================================  ==============================

p is the survival probability. Both modes have the same expected output in training and at test.
The paper drops the block by skipping its computation; here the branch is multiplied by b (same
maths, no compute saved). ``linear_decay_survival(L, p_L)`` gives the paper's linear decay rule
``p_l = 1 - (l / L) (1 - p_L)`` for blocks l = 1..L (default p_L = 0.5).
"""

from __future__ import annotations

import keras
from keras import ops

MODES = ("paper", "drop_path")


def linear_decay_survival(num_blocks: int, p_last: float = 0.5) -> list:
    """Survival probabilities ``p_l = 1 - (l / L) (1 - p_L)`` for l = 1..L (Huang et al., 2016)."""
    num_blocks = int(num_blocks)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
    if not 0.0 <= p_last <= 1.0:
        raise ValueError(f"p_last must be in [0, 1], got {p_last}.")
    return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]


@keras.saving.register_keras_serializable(package="autoinit_tf")
class StochasticDepth(keras.layers.Layer):
    """Gated residual sum ``shortcut + b * residual`` with survival probability p.

    Args:
        survival_probability: p in [0, 1] (default 0.5, the paper's p_L).
        mode: ``"paper"`` (one Bernoulli per batch, test-time scaling by p) or ``"drop_path"``
            (one Bernoulli per example, training-time scaling by 1/p, test-time identity).
        seed: optional int seed for the Bernoulli draws.

    Call: ``layer([shortcut, residual], training=...)``.
    """

    def __init__(self, survival_probability=0.5, mode="paper", seed=None, **kwargs):
        super().__init__(**kwargs)
        p = float(survival_probability)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"survival_probability must be in [0, 1], got {survival_probability}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.survival_probability = p
        self.mode = mode
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2 and isinstance(input_shape[0], (list, tuple))):
            raise ValueError("StochasticDepth expects two inputs: [shortcut, residual].")

    def call(self, inputs, training=None):
        shortcut, residual = inputs
        p = self.survival_probability
        dtype = residual.dtype
        if not training:
            if self.mode == "paper":
                return shortcut + ops.cast(p, dtype) * residual
            return shortcut + residual
        if p == 1.0:
            return shortcut + residual
        if p == 0.0:
            return shortcut + ops.zeros_like(residual)
        if self.mode == "paper":
            u = keras.random.uniform((), seed=self.seed_generator)
            b = ops.cast(u < p, dtype)
            return shortcut + b * residual
        shape = (ops.shape(residual)[0],) + (1,) * (len(residual.shape) - 1)
        u = keras.random.uniform(shape, seed=self.seed_generator)
        b = ops.cast(u < p, dtype) / ops.cast(p, dtype)
        return shortcut + b * residual

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {
            **super().get_config(),
            "survival_probability": self.survival_probability,
            "mode": self.mode,
            "seed": self.seed,
        }
