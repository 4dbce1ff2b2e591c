"""GradInit's objective and its gradient in the scales on the TensorFlow backend: a `tf.GradientTape`
(the scales) around a `tf.GradientTape` (the weights), compiled once with `tf.function`; `tf.cond` takes
the constraint branch when ||g|| > gamma."""

from __future__ import annotations

import numpy as np

from autoinit_tf.gradinit.objective_math import batch_loss, grad_norm, lookahead_weights, scaled_weights


class TensorFlowObjective:
    def __init__(self, model, loss_fn, scaled_index, sgd, eta):
        import tensorflow as tf

        variables = list(model.trainable_variables)
        non_trainable = [v.value for v in model.non_trainable_variables]

        def objective(alpha, x_s, y_s, x_t, y_t, gamma):
            theta0 = [tf.convert_to_tensor(v.value) for v in variables]
            with tf.GradientTape() as outer:
                outer.watch(alpha)
                theta = scaled_weights(theta0, alpha, scaled_index)
                with tf.GradientTape() as inner:
                    inner.watch(theta)
                    loss_s = batch_loss(model, loss_fn, theta, non_trainable, x_s, y_s)
                grads = inner.gradient(loss_s, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                norm = grad_norm(grads, sgd)
                constrained = norm > gamma
                value = tf.cond(
                    constrained,
                    lambda: norm,
                    lambda: batch_loss(model, loss_fn, lookahead_weights(theta, grads, norm, eta, sgd),
                                       non_trainable, x_t, y_t) / eta,
                )
            grad = outer.gradient(value, alpha, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grad, value, norm, loss_s, constrained

        self._step = tf.function(objective, reduce_retracing=True)
        self._tf = tf

    def __call__(self, alpha, x_s, y_s, x_t, y_t, gamma):
        grad, value, norm, loss_s, constrained = self._step(
            self._tf.constant(np.asarray(alpha, np.float32)), x_s, y_s, x_t, y_t, self._tf.constant(gamma, "float32"))
        return np.asarray(grad, np.float64), float(value), float(norm), float(loss_s), bool(constrained)
