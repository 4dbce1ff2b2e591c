"""GradInit's objective and its gradient in the scales on the PyTorch backend: `torch.autograd.grad` with
``create_graph=True`` for g, then `backward` of the chosen branch to the scales (eager, not compiled)."""

from __future__ import annotations

import numpy as np

from autoinit_tf.gradinit.objective_math import batch_loss, grad_norm, lookahead_weights, scaled_weights


class TorchObjective:
    def __init__(self, model, loss_fn, scaled_index, sgd, eta):
        import torch

        self._torch = torch
        self.model, self.loss_fn, self.scaled_index = model, loss_fn, scaled_index
        self.sgd, self.eta = sgd, eta

    def __call__(self, alpha, x_s, y_s, x_t, y_t, gamma):
        torch = self._torch
        model, loss_fn = self.model, self.loss_fn
        theta0 = [v.value.detach() for v in model.trainable_variables]
        non_trainable = [v.value.detach() for v in model.non_trainable_variables]
        a = torch.tensor(np.asarray(alpha, np.float32), device=theta0[0].device, requires_grad=True)
        theta = scaled_weights(theta0, a, self.scaled_index)
        theta = [t if t.requires_grad else t.detach().requires_grad_(True) for t in theta]
        loss_s = batch_loss(model, loss_fn, theta, non_trainable, x_s, y_s)
        grads = torch.autograd.grad(loss_s, theta, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(theta, grads)]
        norm = grad_norm(grads, self.sgd)
        constrained = bool(norm.detach().cpu() > gamma)
        if constrained:
            value = norm
        else:
            value = batch_loss(model, loss_fn, lookahead_weights(theta, grads, norm, self.eta, self.sgd),
                               non_trainable, x_t, y_t) / self.eta
        (grad,) = torch.autograd.grad(value, [a], allow_unused=True)
        grad = torch.zeros_like(a) if grad is None else grad
        return (grad.detach().cpu().numpy().astype(np.float64), float(value.detach().cpu()),
                float(norm.detach().cpu()), float(loss_s.detach().cpu()), constrained)
