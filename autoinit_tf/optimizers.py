"""LARS (You, Gitman & Ginsburg 2017) as BYOL trains with it (Grill et al. 2020), a Keras 3 optimizer.

For every variable w with gradient g (k the step):

    adapted w (rank >= 2 by default):   u = g + wd * w
                                       r = eta * ||w|| / ||u||  if ||w|| > 0 and ||u|| > 0, else 1
                                       u = r * u
    excluded w (biases, normalization scales and offsets: rank <= 1):   u = g   (no decay, no adaptation)
    momentum:                          v = m * v + u
                                       w = w - lr * v                   (Nesterov: w - lr * (m * v + u))

with eta the trust coefficient (1e-3) and wd the weight decay (BYOL: 1.5e-6). The weight decay is part of
the update before the trust ratio, not Keras' decoupled decay.
"""

from __future__ import annotations

import fnmatch
import re

import keras
from keras import ops

__all__ = ["LARS", "route_by_path"]


@keras.saving.register_keras_serializable(package="autoinit_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (module docstring).

    Args:
        learning_rate: float or schedule (BYOL: 0.2 x batch / 256 with warm-up and cosine decay).
        momentum: 0.9.
        weight_decay: applied to the adapted variables only (1.5e-6 in BYOL's 1000-epoch runs).
        eta: the trust coefficient (1e-3).
        nesterov: Nesterov momentum.
        exclude: glob patterns on variable paths also excluded from decay and adaptation; variables of
            rank <= 1 (biases, BatchNorm/LayerNorm gamma and beta) are always excluded.
    """

    def __init__(self, learning_rate=0.2, momentum=0.9, weight_decay=0.0, eta=1e-3, nesterov=False, exclude=(),
                 name="lars", **kwargs):
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay or 0.0)
        self.eta = float(eta)
        self.nesterov = bool(nesterov)
        self.exclude = tuple(exclude or ())

    def adapts(self, variable) -> bool:
        """Whether `variable` gets weight decay and the trust ratio (rank >= 2 and not excluded by name)."""
        if len(variable.shape) <= 1:
            return False
        return not any(fnmatch.fnmatchcase(variable.path, p) for p in self.exclude)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        u = ops.cast(gradient, variable.dtype)
        if self.adapts(variable):
            if self.lars_weight_decay:
                u = u + ops.cast(self.lars_weight_decay, variable.dtype) * variable
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            u_norm = ops.sqrt(ops.sum(ops.square(u)))
            ratio = ops.where(ops.logical_and(w_norm > 0, u_norm > 0),
                              ops.cast(self.eta, variable.dtype) * w_norm / ops.maximum(u_norm, 1e-30),
                              ops.ones_like(w_norm))
            u = u * ratio
        v = self.velocities[self._get_variable_index(variable)]
        m = ops.cast(self.momentum, variable.dtype)
        self.assign(v, m * v + u)
        step = m * v + u if self.nesterov else v
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay, eta=self.eta,
                      nesterov=self.nesterov, exclude=list(self.exclude))
        return config


def route_by_path(default, routes, name=None):
    """``keras.optimizers.MultiOptimizer``: each variable whose path is a key of `routes` is trained by that
    optimizer (exact path match), every other variable by `default`. Needs Keras >= 3.15."""
    if not hasattr(keras.optimizers, "MultiOptimizer"):
        raise ImportError("Routing variables to several optimizers needs keras.optimizers.MultiOptimizer "
                          f"(Keras >= 3.15); this is Keras {keras.__version__}: pip install -U keras.")
    mapping = {re.escape(path): optimizer for path, optimizer in routes.items()}
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(default, mapping), name=name)
