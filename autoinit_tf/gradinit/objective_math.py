"""GradInit's objective, written once for every backend in `keras.ops` (the backends only differentiate it).

With theta_i = alpha_i theta_i^0 (one scale per weight tensor), S = B0 u B1 and S~ = B0 u B2 (half-batches):

    g        = grad_theta L(S; theta)                      (kept differentiable in alpha)
    ||g||    = ||g||_2 (SGD)   or   ||g||_1 (Adam)          over all tensors jointly
    theta'   = theta - eta g / ||g||_2 (SGD)   or   theta - eta sign(g) (Adam)
    objective = L(S~; theta') / eta                          when ||g|| <= gamma
              = ||g||                                        otherwise (the gradient-norm constraint)

BatchNormalization uses the batch statistics (training mode) and its moving statistics are not updated (the
updated values `stateless_call` returns are dropped).
"""

from __future__ import annotations

from keras import ops

__all__ = ["scaled_weights", "batch_loss", "grad_norm", "lookahead_weights"]


def scaled_weights(theta0, alpha, scaled_index):
    """theta_i = alpha_k theta0_i for the scaled tensors (k-th scale), theta0_i for the others."""
    out = list(theta0)
    for k, i in enumerate(scaled_index):
        out[i] = theta0[i] * ops.cast(alpha[k], theta0[i].dtype)
    return out


def batch_loss(model, loss_fn, theta, non_trainable, x, y):
    """L(batch; theta) in training mode, averaged over the batch (a loss function's per-example values are
    averaged; a `keras.losses.Loss` applies its own reduction); the updated non-trainable state is dropped."""
    y_pred, _ = model.stateless_call(theta, non_trainable, x, training=True)
    return ops.mean(ops.cast(loss_fn(y, y_pred), "float32"))


def grad_norm(grads, sgd):
    """||g||_2 (SGD) or ||g||_1 (Adam) over all tensors jointly."""
    if sgd:
        return ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads))
    return sum(ops.sum(ops.abs(ops.cast(g, "float32"))) for g in grads)


def lookahead_weights(theta, grads, norm, eta, sgd):
    """theta' = theta - eta g/||g||_2 (SGD, normalized gradient) or theta - eta sign(g) (Adam)."""
    if sgd:
        step = eta / ops.maximum(norm, 1e-30)  # a zero gradient moves nothing
        return [t - ops.cast(step, t.dtype) * ops.cast(g, t.dtype) for t, g in zip(theta, grads)]
    return [t - ops.cast(eta, t.dtype) * ops.sign(ops.cast(g, t.dtype)) for t, g in zip(theta, grads)]
