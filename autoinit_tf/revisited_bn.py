"""The revisited BatchNorm initialization (Davis & Frank, ECCV 2022) and its optimizer.

1. Every BatchNormalization gets gamma = c (the paper: c = 0.1) and beta = 0: `revisited_bn_init` alone,
   or `wrap(model, bn_gamma=c)` together with AutoInit (the propagation then sees gamma = c).
2. Gamma's learning rate is lr / C (the paper: C = 100) and follows the same schedule; no weight decay on
   1-D parameters (gamma, beta, biases); kernels keep it: `bn_optimizer`, a `keras.optimizers.MultiOptimizer`
   whose `OptimizerMap` routes each variable by path.
3. Optionally, a BatchNormalization on the raw input instead of dataset normalization, gamma = c * 0.58
   (sigma_act, the paper's activation scale) and no beta (frozen at 0): `with_input_batch_norm`.
"""

from __future__ import annotations

import keras

from autoinit_tf import graph
from autoinit_tf.layers import DARBatchNormalization
from autoinit_tf.optimizers import route_by_path

__all__ = ["ScaledSchedule", "bn_optimizer", "revisited_bn_init", "with_input_batch_norm", "batch_norm_layers",
           "SIGMA_ACT"]

#: sigma_act of the paper's input-BN variant: the input BN's gamma is c * SIGMA_ACT.
SIGMA_ACT = 0.58


#: The batch-normalizing layer classes whose gamma these techniques set, schedule or prune.
BATCH_NORM_CLASSES = (keras.layers.BatchNormalization, DARBatchNormalization)


def batch_norm_layers(model):
    """Every BatchNormalization / DARBatchNormalization inside `model` (nested ones included)."""
    return [layer for layer in graph.layer_tree(model, include_self=False) if isinstance(layer, BATCH_NORM_CLASSES)]


@keras.saving.register_keras_serializable(package="autoinit_tf")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``factor * schedule(step)``: a learning rate (float or schedule) scaled by a constant factor."""

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            return self.schedule(step) * self.factor
        return keras.ops.convert_to_tensor(float(self.schedule) * self.factor)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        return {"schedule": schedule, "factor": self.factor}


def _learning_rate(config):
    lr = config["learning_rate"]
    if isinstance(lr, dict):
        return keras.optimizers.schedules.deserialize(lr)
    return float(lr)


def _clone(optimizer, name, learning_rate=None, weight_decay="keep"):
    config = optimizer.get_config()
    config["name"] = name
    if learning_rate is not None:
        config["learning_rate"] = learning_rate
    if weight_decay != "keep":
        config["weight_decay"] = weight_decay
    return type(optimizer).from_config(config)


def bn_optimizer(optimizer, model, gamma_lr_scale=0.01, decay_1d=False):
    """A `keras.optimizers.MultiOptimizer` applying the revisited BatchNorm training rule to `model`.

    Args:
        optimizer: the optimizer (instance or name) for every other variable; not built yet.
        model: the model whose BatchNormalization gammas get the scaled learning rate.
        gamma_lr_scale: gamma's learning rate is ``gamma_lr_scale`` times the optimizer's, schedule
            included (the paper: 1/100).
        decay_1d: False (the paper): no weight decay on any 1-D variable (gamma, beta, biases).

    Returns:
        ``MultiOptimizer(OptimizerMap(optimizer, {gamma paths: scaled copy, other 1-D paths: copy without
        weight decay}))``; for plain SGD on gamma (no decay, with or without momentum) the step is exactly
        ``gamma_lr_scale`` times the one the optimizer alone would take.
    """
    base = keras.optimizers.get(optimizer)
    if isinstance(base, (getattr(keras.optimizers, "MultiOptimizer", ()), keras.optimizers.LossScaleOptimizer)):
        raise TypeError("bn_optimizer wraps a plain optimizer (not a MultiOptimizer or LossScaleOptimizer); wrap "
                        "the result in a LossScaleOptimizer if needed.")
    if base.built:
        raise ValueError("bn_optimizer needs an optimizer that is not built yet (create a new one).")
    if not gamma_lr_scale > 0:
        raise ValueError(f"gamma_lr_scale must be > 0, got {gamma_lr_scale!r}.")
    if not getattr(model, "built", False):
        raise ValueError("bn_optimizer needs a built model (its variables are routed by path).")
    config = base.get_config()
    decays = bool(config.get("weight_decay"))
    gamma_opt = _clone(base, f"{base.name}_bn_gamma", ScaledSchedule(_learning_rate(config), gamma_lr_scale),
                       "keep" if decay_1d else None)
    flat_opt = _clone(base, f"{base.name}_no_decay", weight_decay=None) if decays and not decay_1d else None
    routes = {}
    gammas = {layer.gamma.path for layer in batch_norm_layers(model) if getattr(layer, "gamma", None) is not None}
    for variable in model.trainable_variables:
        if variable.path in gammas:
            routes[variable.path] = gamma_opt
        elif flat_opt is not None and len(variable.shape) <= 1:
            routes[variable.path] = flat_opt
    if not gammas:
        raise ValueError(f"Model '{model.name}' has no trainable BatchNormalization gamma; use the optimizer alone.")
    return route_by_path(base, routes, name=f"{base.name}_revisited_bn")


def revisited_bn_init(model, gamma=0.1):
    """Set every BatchNormalization's gamma to `gamma` and beta to 0, in place; the other weights keep their
    values (use ``wrap(model, bn_gamma=gamma)`` to combine it with AutoInit). Returns the layers changed."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}.")
    layers = batch_norm_layers(model)
    for layer in layers:
        if getattr(layer, "gamma", None) is not None:
            layer.gamma.assign(keras.ops.full(layer.gamma.shape, gamma, dtype=layer.gamma.dtype))
        if getattr(layer, "beta", None) is not None:
            layer.beta.assign(keras.ops.zeros(layer.beta.shape, dtype=layer.beta.dtype))
    return layers


def with_input_batch_norm(model, gamma=0.1, sigma_act=SIGMA_ACT, momentum=0.99, epsilon=1e-3):
    """A new model: a BatchNormalization on each raw input (gamma = ``gamma * sigma_act``, no beta, i.e. beta
    frozen at 0) followed by `model` (its layers and weights shared, not copied). Feed it unnormalized
    images instead of dataset-normalized ones (the paper's "BN input normalization")."""
    inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=f"{t.name.split(':')[0]}_raw")
              for t in model.inputs]
    normalized = [
        keras.layers.BatchNormalization(center=False, momentum=momentum, epsilon=epsilon,
                                        gamma_initializer=keras.initializers.Constant(gamma * sigma_act),
                                        name=f"input_bn_{k}")(t)
        for k, t in enumerate(inputs)
    ]
    outputs = model(normalized[0] if len(normalized) == 1 else normalized)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=f"{model.name}_input_bn")
