"""Scaled residual sums for normalization-free ResNets.

``y = sum_i a_i x_i`` over the inputs ``[shortcut, branch, ...]`` with the coefficients of:

* ``"idshort"`` (Civitelli et al., arXiv 2112.12299): fixed ``a_i = 1/sqrt(N)``; for a block
  ``y = (x + F(x)) / sqrt(2)`` so a variance-preserving branch keeps the variance.
* ``"learnscalar"`` (Civitelli et al.): trainable scalars ``a`` (shortcut) and ``b`` (branch), both
  initialised to ``1/sqrt(2)`` (the IdShort point of the condition ``a^2 + b^2 = 1``; the paper's
  exact constants are unverified, see notes §17). Two inputs.
* ``"skipinit"`` / ``"rezero"`` (De & Smith 2020; Bachlechner et al. 2020): ``y = x + alpha F(x)``,
  trainable ``alpha`` initialised to 0. Two inputs.
* ``"autoinit"``: ``a_i`` are NON-trainable weights (init 1) set by the AutoInit engine to
  ``a_i = sqrt(target / (N var_i))`` from the predicted variances of the N inputs, so the sum has
  the target variance.
"""

from __future__ import annotations

import math

import keras
from keras import ops

MODES = ("idshort", "learnscalar", "skipinit", "rezero", "autoinit")


@keras.saving.register_keras_serializable(package="autoinit_tf")
class ScaledResidual(keras.layers.Layer):
    """``y = sum_i a_i x_i`` for inputs ``[shortcut, branch, ...]`` (see the module docstring).

    Args:
        mode: one of ``idshort, learnscalar, skipinit, rezero, autoinit``.
        alpha_init: initial value of the branch gain in skipinit/rezero (default 0.0).
    """

    def __init__(self, mode="idshort", alpha_init=0.0, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.mode = mode
        self.alpha_init = float(alpha_init)

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple))):
            raise ValueError("ScaledResidual expects a list of inputs [shortcut, branch, ...].")
        n = len(input_shape)
        if n < 2:
            raise ValueError("ScaledResidual needs at least two inputs.")
        if self.mode in ("learnscalar", "skipinit", "rezero") and n != 2:
            raise ValueError(f"mode={self.mode!r} takes exactly two inputs [shortcut, branch], got {n}.")
        self.num_inputs = n
        if self.mode == "learnscalar":
            c = keras.initializers.Constant(1.0 / math.sqrt(2.0))
            self.shortcut_scale = self.add_weight(name="shortcut_scale", shape=(), initializer=c)
            self.branch_scale = self.add_weight(name="branch_scale", shape=(), initializer=c)
        elif self.mode in ("skipinit", "rezero"):
            self.alpha = self.add_weight(
                name="alpha", shape=(), initializer=keras.initializers.Constant(self.alpha_init)
            )
        elif self.mode == "autoinit":
            self.coefficients = [
                self.add_weight(name=f"coefficient_{i}", shape=(), initializer="ones", trainable=False)
                for i in range(n)
            ]

    def scale_variables(self):
        """The coefficient variables, in input order (None entries where a coefficient is 1)."""
        if self.mode == "learnscalar":
            return [self.shortcut_scale, self.branch_scale]
        if self.mode in ("skipinit", "rezero"):
            return [None, self.alpha]
        if self.mode == "autoinit":
            return list(self.coefficients)
        return [None] * self.num_inputs

    def call(self, inputs):
        dtype = inputs[0].dtype
        if self.mode == "idshort":
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out * ops.cast(1.0 / math.sqrt(len(inputs)), dtype)
        if self.mode == "learnscalar":
            return ops.cast(self.shortcut_scale, dtype) * inputs[0] + ops.cast(self.branch_scale, dtype) * inputs[1]
        if self.mode in ("skipinit", "rezero"):
            return inputs[0] + ops.cast(self.alpha, dtype) * inputs[1]
        out = ops.cast(self.coefficients[0], dtype) * inputs[0]
        for a, x in zip(self.coefficients[1:], inputs[1:]):
            out = out + ops.cast(a, dtype) * x
        return out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "alpha_init": self.alpha_init}
