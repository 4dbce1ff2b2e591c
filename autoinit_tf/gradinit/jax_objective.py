"""GradInit's objective and its gradient in the scales on the JAX backend: `jax.grad` of a function that
calls `jax.grad` (second-order terms included), compiled once with `jax.jit`; `jax.lax.cond` takes the
constraint branch when ||g|| > gamma."""

from __future__ import annotations

import numpy as np

from autoinit_tf.gradinit.objective_math import batch_loss, grad_norm, lookahead_weights, scaled_weights


class JaxObjective:
    def __init__(self, model, loss_fn, scaled_index, sgd, eta):
        import jax
        import jax.numpy as jnp

        theta0 = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def objective(alpha, x_s, y_s, x_t, y_t, gamma):
            theta = scaled_weights(theta0, alpha, scaled_index)
            loss_s, grads = jax.value_and_grad(
                lambda th: batch_loss(model, loss_fn, th, non_trainable, x_s, y_s))(theta)
            norm = grad_norm(grads, sgd)
            constrained = norm > gamma

            def lookahead(_):
                return batch_loss(model, loss_fn, lookahead_weights(theta, grads, norm, eta, sgd),
                                  non_trainable, x_t, y_t) / eta

            value = jax.lax.cond(constrained, lambda _: norm, lookahead, None)
            return value, (norm, loss_s, constrained)

        self._step = jax.jit(jax.value_and_grad(objective, has_aux=True))
        self._jnp = jnp

    def __call__(self, alpha, x_s, y_s, x_t, y_t, gamma):
        (value, (norm, loss_s, constrained)), grad = self._step(
            self._jnp.asarray(alpha, "float32"), x_s, y_s, x_t, y_t, self._jnp.float32(gamma))
        return np.asarray(grad, np.float64), float(value), float(norm), float(loss_s), bool(constrained)
