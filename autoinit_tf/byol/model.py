"""BYOL (Grill et al., NeurIPS 2020): self-supervised pre-training of any Keras encoder with `fit`.

Online network: encoder f, projector g, predictor q; target network: encoder and projector with parameters
xi, never trained by gradients, updated after every optimizer step as

    xi <- tau_k xi + (1 - tau_k) theta,      tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2

(k the step, K the total steps; tau_base 0.996, presets in `TAU_PRESETS`). Loss, symmetric, averaged over the
batch, with a^ = a / ||a||:

    L = || q(g(f(v1)))^ - sg(g'(f'(v2)))^ ||^2 + || q(g(f(v2)))^ - sg(g'(f'(v1)))^ ||^2      (= 4 - 2 cos - 2 cos)

v1, v2 the two augmented views (`augment.byol_augmentation`). Projector and predictor: Dense(hidden) ->
BatchNorm -> ReLU -> Dense(projection, no bias). The target starts as a copy of the online network (the
official code draws it independently; a copy keeps the encoder's initialization, e.g. AutoInit's).

How it runs on every backend with the standard `fit`: the loss is added in `call` (`add_loss`); `compile`
wraps the given optimizer in a `keras.optimizers.MultiOptimizer` whose map sends the online variables to it
and every target variable to `TargetEMA`, an "optimizer" that ignores its (zero) gradient and applies the
moving average above after the online step. Target BatchNorm layers stay trainable, so they normalize with
their own batch statistics as in the paper, but their gradient is exactly zero.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras import ops

from autoinit_tf.byol.augment import byol_augmentation
from autoinit_tf.optimizers import route_by_path

__all__ = ["BYOL", "TargetEMA", "CollapseMonitor", "tau_schedule", "byol_loss", "mlp_head", "TAU_PRESETS",
           "CollapseWarning"]

#: tau_base of the paper's runs: 1000 epochs 0.996, 300 and 100 epochs 0.99, 40 epochs 0.97.
TAU_PRESETS = {1000: 0.996, 300: 0.99, 100: 0.99, 40: 0.97}


class CollapseWarning(UserWarning):
    """The normalized projections' per-dimension spread fell toward 0 (a collapsed representation)."""


def tau_schedule(step, total_steps, tau_base=0.996):
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (works on numbers and on tensors)."""
    if isinstance(step, (int, float)) and isinstance(total_steps, (int, float)):
        frac = min(step / max(total_steps, 1), 1.0)
        return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * frac) + 1.0) / 2.0
    frac = ops.minimum(ops.cast(step, "float32") / ops.maximum(ops.cast(total_steps, "float32"), 1.0), 1.0)
    return 1.0 - (1.0 - tau_base) * (ops.cos(math.pi * frac) + 1.0) / 2.0


def byol_loss(p, z):
    """Per-example || p^ - z^ ||^2 = 2 - 2 cos(p, z) (z is not differentiated by the caller's stop-gradient)."""
    p = ops.cast(p, "float32")
    z = ops.cast(z, "float32")
    p = p / ops.maximum(ops.norm(p, axis=-1, keepdims=True), 1e-12)
    z = z / ops.maximum(ops.norm(z, axis=-1, keepdims=True), 1e-12)
    return ops.sum(ops.square(p - z), axis=-1)


def mlp_head(hidden_dim, out_dim, name):
    """Dense(hidden) -> BatchNormalization -> ReLU -> Dense(out, no bias): BYOL's projector and predictor."""
    return keras.Sequential([keras.layers.Dense(hidden_dim, name=f"{name}_hidden"),
                             keras.layers.BatchNormalization(name=f"{name}_bn"), keras.layers.ReLU(),
                             keras.layers.Dense(out_dim, use_bias=False, name=f"{name}_out")], name=name)


def _zero_gradient(z):
    """The value of z with a gradient of exactly zero that is still connected (TensorFlow would otherwise give
    None for the target's variables, and the optimizer would skip them)."""
    stopped = ops.stop_gradient(z)
    return stopped + 0.0 * (z - stopped)


class _Links:
    """A plain holder: Keras' attribute tracking does not look inside it."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.online = []


@keras.saving.register_keras_serializable(package="autoinit_tf")
class TargetEMA(keras.optimizers.Optimizer):
    """xi <- tau_k xi + (1 - tau_k) theta for each target variable xi (its online counterpart theta given by
    `pairs`); the gradient is ignored. k counts this optimizer's steps, K is the `total_steps` variable."""

    def __init__(self, pairs=None, tau_base=0.996, name="target_ema", **kwargs):
        kwargs.pop("learning_rate", None)
        super().__init__(learning_rate=0.0, name=name, **kwargs)  # unused
        # held outside the optimizer's variable tracking (the online variables are not this optimizer's)
        self._links = _Links(dict(pairs or {}))
        self.tau_base = float(tau_base)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.total_steps = self.add_variable((), initializer="ones", dtype="float32", name="total_steps")
        pairs = self._links.pairs
        missing = [v.path for v in variables if v.path not in pairs]
        if missing:
            raise ValueError(f"TargetEMA has no online counterpart for {missing[:3]}.")
        self._links.online = [pairs[v.path] for v in variables]  # by the optimizer's variable index

    def tau(self):
        return tau_schedule(self.iterations, self.total_steps, self.tau_base)

    def update_step(self, gradient, variable, learning_rate):
        online = self._links.online[self._get_variable_index(variable)]
        tau = ops.cast(self.tau(), variable.dtype)
        self.assign(variable, tau * variable + (1.0 - tau) * ops.cast(online, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(tau_base=self.tau_base)
        return config


class CollapseMonitor(keras.callbacks.Callback):
    """Every `every` batches, the std over a fixed probe batch of each dimension of the online network's
    normalized projections, averaged over dimensions and multiplied by sqrt(dim) (1 for projections spread
    evenly over the sphere, 0 for a collapsed representation). Warns (`CollapseWarning`) when it falls below
    `threshold` times its value at the start of training (random networks already start well below 1: their
    projections share a common direction). ``history`` holds (step, value)."""

    def __init__(self, probe, every=50, threshold=0.1):
        super().__init__()
        self.probe, self.every, self.threshold = probe, int(every), float(threshold)
        self.history, self.warned = [], False
        self._step = 0

    def value(self):
        byol = self.model
        z = byol.projector(byol.encoder(self.probe, training=False), training=False)
        z = keras.ops.convert_to_numpy(z).astype(np.float64)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return float(z.std(axis=0).mean() * math.sqrt(z.shape[1]))

    def on_train_begin(self, logs=None):
        if not self.history:
            self.record()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self.record()

    def on_train_end(self, logs=None):
        self.record()

    def record(self):
        value = self.value()
        self.history.append((self._step, value))
        start = self.history[0][1]
        if value < self.threshold * start and not self.warned:
            self.warned = True
            warnings.warn(f"BYOL: the normalized projections' spread fell from {start:.3g} to {value:.3g} (x sqrt(dim)) "
                          f"after {self._step} steps: the representation is collapsing. Check tau "
                          "(closer to 1), the predictor's learning rate and the augmentations.", CollapseWarning,
                          stacklevel=2)


class BYOL(keras.Model):
    """Pre-train `encoder` (a Keras model: images -> feature vector) with BYOL by ``compile`` and ``fit(x)``.

    Args:
        encoder: the network to pre-train; after `fit`, ``byol.encoder`` is it, ready for a linear probe
            (`autoinit_tf.transfer.linear_probe`) or fine-tuning.
        projection_dim, hidden_dim: the MLP heads (paper: 256 and 4096).
        tau_base: the target's base decay (paper: 0.996 for 1000 epochs; `TAU_PRESETS`).
        augment: ``(view1, view2)`` layers; default `byol_augmentation` 1 and 2 for the encoder's input shape.
        value_range: the images' value range, for the colour augmentations.
        seed: augmentation seed.
    Call ``byol(x)`` outside training gives the encoder's features.
    """

    def __init__(self, encoder, *, projection_dim=256, hidden_dim=4096, tau_base=0.996, augment=None,
                 value_range=(0.0, 1.0), seed=None, name="byol", **kwargs):
        super().__init__(name=name, **kwargs)
        if not getattr(encoder, "built", False) or not getattr(encoder, "inputs", None):
            raise ValueError("BYOL needs a built functional encoder (keras.Model with inputs).")
        self.encoder = encoder
        self.image_shape = tuple(encoder.inputs[0].shape[1:])
        features = int(encoder.outputs[0].shape[-1])
        self.projector = mlp_head(hidden_dim, projection_dim, "projector")
        self.predictor = mlp_head(hidden_dim, projection_dim, "predictor")
        self.target_encoder = keras.models.clone_model(
            encoder, clone_function=lambda layer: type(layer).from_config({**layer.get_config(),
                                                                            "name": f"target_{layer.name}"}))
        self.target_projector = mlp_head(hidden_dim, projection_dim, "target_projector")
        self.tau_base = float(tau_base)
        self.view1, self.view2 = augment or (byol_augmentation(1, self.image_shape, value_range, seed),
                                             byol_augmentation(2, self.image_shape, value_range, seed))
        self.projector.build((None, features))
        self.predictor.build((None, projection_dim))
        self.target_projector.build((None, features))
        self.target_encoder.set_weights(encoder.get_weights())
        self.target_projector.set_weights(self.projector.get_weights())
        self.build((None,) + self.image_shape)

    def build(self, input_shape):
        self.built = True

    @property
    def online_variables(self):
        return self.encoder.trainable_variables + self.projector.trainable_variables + \
            self.predictor.trainable_variables

    def variable_pairs(self):
        """{target variable path: online variable}: encoder with encoder, projector with projector (all
        weights, moving statistics included, in the same order)."""
        pairs = {}
        for target, online in ((self.target_encoder, self.encoder), (self.target_projector, self.projector)):
            for t, o in zip(target.weights, online.weights):
                pairs[t.path] = o
        return pairs

    def compile(self, optimizer="sgd", **kwargs):
        """`optimizer` trains the online network (BYOL: `autoinit_tf.optimizers.LARS`); the target follows
        `TargetEMA`. A loss must not be given (BYOL's is built in)."""
        if kwargs.get("loss") is not None:
            raise ValueError("BYOL computes its own loss; compile(optimizer=...) without loss=.")
        online = keras.optimizers.get(optimizer)
        pairs = self.variable_pairs()
        shared = {v.path for v in self.online_variables} & set(pairs)
        if shared:
            raise ValueError(f"Online and target variables share paths {sorted(shared)[:3]}; give the encoder's "
                             "layers unique names.")
        self.ema = TargetEMA(pairs, tau_base=self.tau_base)
        multi = route_by_path(self.ema, {v.path: online for v in self.online_variables}, name="byol_optimizer")
        if multi.optimizers.index(online) > multi.optimizers.index(self.ema):
            raise RuntimeError("BYOL needs the online step before the target's moving average.")
        super().compile(optimizer=multi, **kwargs)

    def call(self, images, training=None):
        if not training:
            return self.encoder(images, training=False)
        v1 = self.view1(images, training=True)
        v2 = self.view2(images, training=True)
        p1 = self.predictor(self.projector(self.encoder(v1, training=True), training=True), training=True)
        p2 = self.predictor(self.projector(self.encoder(v2, training=True), training=True), training=True)
        z1 = _zero_gradient(self.target_projector(self.target_encoder(v1, training=True), training=True))
        z2 = _zero_gradient(self.target_projector(self.target_encoder(v2, training=True), training=True))
        loss = ops.mean(byol_loss(p1, z2) + byol_loss(p2, z1))
        self.add_loss(loss)
        return p1

    def fit(self, x=None, y=None, *, epochs=1, batch_size=None, total_steps=None, monitor=True, callbacks=None,
            **kwargs):
        """``fit(x, epochs=...)``: `total_steps` (K of the tau schedule) defaults to this call's steps plus
        the steps already taken; with `monitor`, a `CollapseMonitor` on the first 256 images of an array `x`
        is added (``byol.collapse_monitor``)."""
        if y is not None:
            raise ValueError("BYOL is self-supervised: fit(x) without labels.")
        if not hasattr(self, "ema"):
            raise RuntimeError("Call compile(optimizer=...) before fit.")
        steps = kwargs.get("steps_per_epoch")
        if steps is None:
            if isinstance(x, np.ndarray):
                steps = math.ceil(len(x) / (batch_size or 32))
            elif hasattr(x, "__len__"):
                steps = len(x)
        if total_steps is None:
            if steps is None:
                raise ValueError("Give total_steps= (the tau schedule's K) or steps_per_epoch= for this input.")
            total_steps = int(keras.ops.convert_to_numpy(self.ema.iterations)) + steps * epochs \
                if self.ema.built else steps * epochs
        callbacks = list(callbacks or [])
        self.collapse_monitor = None
        if monitor and isinstance(x, np.ndarray):
            self.collapse_monitor = CollapseMonitor(x[:256], every=max(1, (steps or 50) // 2))
            callbacks.append(self.collapse_monitor)
        self._total_steps = int(total_steps)
        callbacks.append(_SetTotalSteps(self))
        return super().fit(x, epochs=epochs, batch_size=batch_size, callbacks=callbacks, **kwargs)


class _SetTotalSteps(keras.callbacks.Callback):
    def __init__(self, byol):
        super().__init__()
        self.byol = byol

    def on_train_begin(self, logs=None):
        if not self.byol.ema.built:
            self.byol.optimizer.build(self.byol.trainable_variables)
        self.byol.ema.total_steps.assign(float(self.byol._total_steps))
