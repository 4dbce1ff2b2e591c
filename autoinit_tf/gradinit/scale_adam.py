"""The optimizer of GradInit's scales: Adam on one scalar per weight tensor, clipped and projected.

GradInit (Zhu et al. 2021) learns alpha_i >= min_scale_i for every weight tensor theta_i = alpha_i theta_i^0.
Its scale optimizer is Adam (beta1 0.9, beta2 0.999, eps 1e-8) with three changes:

    g      <- clip(g, -grad_clip, grad_clip)                    per scalar
    m_b    <- beta1 m_b + (1 - beta1) g                          b = the branch of this step
    v      <- beta2 v + (1 - beta2) g^2                          shared by both branches
    alpha  <- alpha - lr (m_b / (1 - beta1^t_b)) / (sqrt(v / (1 - beta2^t)) + eps)
    alpha  <- min(max(alpha, min_scale), max_scale)

The two branches are the gradient-norm constraint steps and the look-ahead objective steps; each keeps its
own first moment and its own step count t_b (for its bias correction), the second moment and its count t
are shared.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ScaleAdam"]


class ScaleAdam:
    """Adam on a float64 vector of scales with per-branch first moments (see the module docstring)."""

    BRANCHES = ("objective", "constraint")

    def __init__(self, size, lr, min_scale, max_scale=None, beta_1=0.9, beta_2=0.999, epsilon=1e-8, grad_clip=1.0):
        if not (lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        self.lr = float(lr)
        self.min_scale = np.broadcast_to(np.asarray(min_scale, np.float64), (size,)).copy()
        self.max_scale = np.inf if max_scale is None else float(max_scale)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.m = {b: np.zeros(size) for b in self.BRANCHES}
        self.t_branch = {b: 0 for b in self.BRANCHES}
        self.v = np.zeros(size)
        self.t = 0

    def step(self, alpha, grad, branch):
        """The scales after one step on `grad` (d objective / d alpha) taken in `branch`."""
        if branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {self.BRANCHES}, got {branch!r}.")
        g = np.asarray(grad, np.float64)
        if self.grad_clip is not None:
            g = np.clip(g, -self.grad_clip, self.grad_clip)
        self.t_branch[branch] += 1
        self.t += 1
        m = self.m[branch] = self.beta_1 * self.m[branch] + (1.0 - self.beta_1) * g
        self.v = self.beta_2 * self.v + (1.0 - self.beta_2) * g * g
        m_hat = m / (1.0 - self.beta_1 ** self.t_branch[branch])
        v_hat = self.v / (1.0 - self.beta_2 ** self.t)
        new = np.asarray(alpha, np.float64) - self.lr * m_hat / (np.sqrt(v_hat) + self.epsilon)
        return np.minimum(np.maximum(new, self.min_scale), self.max_scale)
