"""The fixed-feature transfer protocol of Kornblith, Shlens & Le (CVPR 2019): a linear probe.

Features are the backbone's outputs (global-averaged over any spatial axes). On them, an L2-regularized
multinomial logistic regression is fitted by L-BFGS (scipy):

    minimize_{W, b}   sum_i -log softmax(x_i W + b)_{y_i}  +  (lambda / 2) ||W||_F^2      (b not penalized)

for each strength lambda of a grid (45 log-spaced values in [1e-6, 1e5]), warm-started from the strongest;
lambda is the argmax of the validation accuracy; the head is then refitted on train + val with it. (This is
scikit-learn's ``LogisticRegression(penalty="l2", solver="lbfgs", C=1/lambda)``.)
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import keras
import numpy as np

__all__ = ["linear_probe", "LinearProbeReport", "extract_features", "fit_logistic", "DEFAULT_L2_GRID"]

#: Kornblith et al.'s grid: 45 log-spaced regularization strengths in [1e-6, 1e5].
DEFAULT_L2_GRID = tuple(np.logspace(-6, 5, 45))


@dataclasses.dataclass
class LinearProbeReport:
    """What `linear_probe` did: ``val_accuracy[k]`` is the validation accuracy at ``l2_grid[k]``."""

    l2_grid: list
    val_accuracy: list
    chosen_l2: float
    train_accuracy: float
    refit_accuracy: float
    num_features: int
    num_classes: int
    seconds: float

    def __str__(self):
        best = max(self.val_accuracy)
        return (f"linear probe: {self.num_features} features, {self.num_classes} classes; lambda = {self.chosen_l2:.3g} "
                f"(validation accuracy {100 * best:.2f}%, {len(self.l2_grid)} strengths); refit on train+val: "
                f"{100 * self.refit_accuracy:.2f}% on train+val, {self.seconds:.1f}s")


def extract_features(backbone, x, batch_size=256):
    """The backbone's outputs on `x` in batches, as float64 (n, d); spatial axes are averaged (with a warning)."""
    features = backbone.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(features, (list, tuple, dict)):
        raise ValueError("linear_probe needs a backbone with one output (the penultimate features).")
    features = np.asarray(keras.ops.convert_to_numpy(features), np.float64)
    if features.ndim > 2:
        warnings.warn(f"The backbone's output has shape {features.shape[1:]}; the probe averages it over the "
                      "spatial axes (global average pooling, as Kornblith et al.'s penultimate features). Give a "
                      "backbone that ends in its own pooling to choose otherwise.", UserWarning, stacklevel=3)
        features = features.mean(axis=tuple(range(1, features.ndim - 1)))
    return features.reshape(len(features), -1)


def _objective(params, x, onehot, l2):
    d, k = x.shape[1], onehot.shape[1]
    w, b = params[: d * k].reshape(d, k), params[d * k:]
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1, keepdims=True))
    logp = z - log_norm
    loss = -np.sum(onehot * logp) + 0.5 * l2 * np.sum(w * w)
    residual = np.exp(logp) - onehot
    grad_w = x.T @ residual + l2 * w
    grad_b = residual.sum(axis=0)
    return loss, np.concatenate([grad_w.ravel(), grad_b])


def fit_logistic(x, y, num_classes, l2, init=None, max_iter=1000, tol=1e-8):
    """``(W (d, K), b (K,))`` minimizing the L2-regularized multinomial cross-entropy (module docstring)."""
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    onehot = np.eye(num_classes)[np.asarray(y, int)]
    d = x.shape[1]
    start = np.zeros(d * num_classes + num_classes) if init is None else init
    result = minimize(_objective, start, args=(x, onehot, float(l2)), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-14})
    w, b = result.x[: d * num_classes].reshape(d, num_classes), result.x[d * num_classes:]
    return w, b, result.x


def _accuracy(x, y, w, b):
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def linear_probe(backbone, train, val, *, l2_grid=DEFAULT_L2_GRID, num_classes=None, batch_size=256,
                 max_iter=1000, progress=True):
    """Fit a linear head on a frozen backbone's features (Kornblith et al.'s fixed-feature protocol).

    Args:
        backbone: a Keras model (or layer with `predict`) whose output is the feature vector.
        train, val: ``(x, y)`` with integer labels.
        l2_grid: the regularization strengths lambda to try (default: 45 log-spaced values in [1e-6, 1e5]).
        num_classes: default ``max(label) + 1``.
        batch_size: feature extraction batch.
        max_iter: L-BFGS iterations per fit.
        progress: a progress bar over the grid.

    Returns:
        ``(head, report)``: ``head`` a built ``keras.layers.Dense(num_classes)`` holding W and b (logits), to
        put on the backbone (``head(backbone(x))``); ``report`` a `LinearProbeReport`.
    """
    t0 = time.perf_counter()
    (x_train, y_train), (x_val, y_val) = train, val
    y_train, y_val = np.asarray(y_train).astype(int).ravel(), np.asarray(y_val).astype(int).ravel()
    k = int(num_classes or max(y_train.max(), y_val.max()) + 1)
    grid = [float(v) for v in l2_grid]
    if not grid or min(grid) <= 0:
        raise ValueError("l2_grid must be a non-empty list of positive strengths.")
    f_train = extract_features(backbone, x_train, batch_size)
    f_val = extract_features(backbone, x_val, batch_size)
    bar = keras.utils.Progbar(len(grid), unit_name="strength") if progress else None
    accuracies = [0.0] * len(grid)
    params = None
    for step, index in enumerate(np.argsort(grid)[::-1]):  # strongest first: each fit warm-starts the next
        w, b, params = fit_logistic(f_train, y_train, k, grid[index], init=params, max_iter=max_iter)
        accuracies[index] = _accuracy(f_val, y_val, w, b)
        if bar is not None:
            bar.update(step + 1)
    chosen = int(np.argmax(accuracies))
    w, b, _ = fit_logistic(f_train, y_train, k, grid[chosen], max_iter=max_iter)
    train_accuracy = _accuracy(f_train, y_train, w, b)
    f_all, y_all = np.concatenate([f_train, f_val]), np.concatenate([y_train, y_val])
    w, b, _ = fit_logistic(f_all, y_all, k, grid[chosen], max_iter=max_iter)
    head = keras.layers.Dense(k, name="linear_probe")
    head.build((None, f_all.shape[1]))
    head.set_weights([w.astype(head.kernel.dtype), b.astype(head.bias.dtype)])
    report = LinearProbeReport(grid, accuracies, grid[chosen], train_accuracy, _accuracy(f_all, y_all, w, b),
                               int(f_all.shape[1]), k, time.perf_counter() - t0)
    return head, report
