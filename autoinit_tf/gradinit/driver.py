"""`gradinit`: learn one scale per weight tensor so that one optimizer step from the initialization lowers
the loss most (GradInit, Zhu et al., NeurIPS 2021), then multiply every tensor by its scale in place.

The objective (`objective_math`) is differentiated twice by the backend (`tf_objective`, `jax_objective`,
`torch_objective`); the scales follow `scale_adam.ScaleAdam`. Every iteration draws three disjoint
half-batches B0, B1, B2 (`half_batches`): S = B0 u B1 gives the gradient, S~ = B0 u B2 the loss after the
simulated step. The model's variables are read, never written, until the very end: a failure leaves them
bit-identical. Dropout-like layers are switched off while GradInit runs (and restored); BatchNormalization
uses batch statistics and keeps its moving statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import keras
import numpy as np

from autoinit_tf import graph
from autoinit_tf.gradinit.scale_adam import ScaleAdam

__all__ = ["gradinit", "GradInitReport", "half_batches", "DEFAULTS"]

#: Per-optimizer defaults (the paper's scripts: CIFAR-10 SGD eta 0.1, gamma 1; Adam-target transformers eta 1e-3).
DEFAULTS = {"sgd": {"eta": 0.1, "gamma": 1.0}, "adam": {"eta": 1e-3, "gamma": float("inf")}}

_BIAS_SUFFIXES = ("bias", "beta")


@dataclasses.dataclass
class GradInitReport:
    """What `gradinit` did.

    Attributes:
        scales: ``{variable path: scale}`` for every scaled tensor (zero tensors are not listed: they stay 0).
        loss_before, loss_after: training-mode loss on the first iteration's batch S at scales 1 and at the
            learned scales.
        lookahead_before, lookahead_after: the loss on S~ after one simulated optimizer step from S, at
            scales 1 and at the learned scales: what GradInit minimizes.
        grad_norm_before, grad_norm_after: ||g|| on S (L2 for SGD, L1 for Adam).
        steps, constraint_steps: iterations run, and how many took the gradient-norm constraint branch.
        seconds: wall time of the whole call.
    """

    scales: dict
    loss_before: float
    loss_after: float
    lookahead_before: float
    lookahead_after: float
    grad_norm_before: float
    grad_norm_after: float
    steps: int
    constraint_steps: int
    seconds: float
    optimizer: str = "sgd"
    eta: float = 0.1
    gamma: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        values = np.array(list(self.scales.values()) or [1.0])
        return (f"GradInit ({self.optimizer}, eta={self.eta:g}, gamma={self.gamma:g}): {self.steps} steps "
                f"({self.constraint_steps} constrained) in {self.seconds:.1f}s; {len(self.scales)} tensors scaled "
                f"(min {values.min():.3g}, median {np.median(values):.3g}, max {values.max():.3g}); "
                f"loss {self.loss_before:.4g} -> {self.loss_after:.4g}; loss after one step "
                f"{self.lookahead_before:.4g} -> {self.lookahead_after:.4g}")


def half_batches(n, half, steps, seed=None):
    """Index triples (B0, B1, B2) of three disjoint half-batches per iteration, taken in order from
    successive random permutations of ``range(n)`` (a permutation's tail shorter than 3 * half is dropped)."""
    if n < 3 * half:
        raise ValueError(f"GradInit needs at least 3 half-batches of {half} examples per iteration; the data has {n}.")
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + 3 * half > n:
            order, pos = rng.permutation(n), 0
        yield tuple(order[pos + k * half: pos + (k + 1) * half] for k in range(3))
        pos += 3 * half


@contextlib.contextmanager
def dropout_off(model):
    """Dropout-like layers (a ``rate`` or a GaussianNoise ``stddev``) do nothing inside; restored after."""
    changed = []
    noise = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
             keras.layers.SpatialDropout3D, keras.layers.GaussianDropout, keras.layers.AlphaDropout)
    try:
        for layer in graph.layer_tree(model, include_self=False):
            if isinstance(layer, noise) and getattr(layer, "rate", 0):
                changed.append((layer, "rate", layer.rate))
                layer.rate = 0.0
            elif isinstance(layer, keras.layers.GaussianNoise) and layer.stddev:
                changed.append((layer, "stddev", layer.stddev))
                layer.stddev = 0.0
        yield changed
    finally:
        for layer, attribute, value in changed:
            setattr(layer, attribute, value)


def _objective_class():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from autoinit_tf.gradinit.tf_objective import TensorFlowObjective
        return TensorFlowObjective
    if backend == "jax":
        from autoinit_tf.gradinit.jax_objective import JaxObjective
        return JaxObjective
    if backend == "torch":
        from autoinit_tf.gradinit.torch_objective import TorchObjective
        return TorchObjective
    raise NotImplementedError(f"gradinit needs second-order gradients; backend {backend!r} has none here "
                              "(use tensorflow, jax or torch).")


def _take(x, index):
    return keras.tree.map_structure(lambda a: np.asarray(a)[index], x)


def _concat(a, b):
    return keras.tree.map_structure(lambda u, v: np.concatenate([u, v], axis=0), a, b)


def _length(x):
    lengths = {len(a) for a in keras.tree.flatten(x)}
    if len(lengths) != 1:
        raise ValueError(f"All input arrays must have the same number of examples, got {sorted(lengths)}.")
    return lengths.pop()


def gradinit(model, data, *, loss, optimizer="sgd", lr=1e-2, eta=None, gamma=None, steps=200, batch_size=128,
             min_scale=0.01, max_scale=None, grad_clip=1.0, seed=None, progress=True) -> GradInitReport:
    """Learn one scale per weight tensor with GradInit, then multiply each tensor by its scale in place.

    Args:
        model: a built Keras model with one output (default-initialized, or after `autoinit_tf.wrap`).
        data: ``(x, y)``: arrays (``x`` may be a list or dict of arrays) with at least ``1.5 * batch_size``
            examples.
        loss: a Keras loss (name or object) with a mean reduction, as given to `compile`.
        optimizer: the optimizer training will use: ``"sgd"`` (simulated step eta g/||g||_2, constraint on
            ||g||_2) or ``"adam"`` (eta sign(g), constraint on ||g||_1).
        lr: learning rate of the scales' Adam (the paper's scripts use 1e-3 to 1e-1 depending on the model).
        eta: the simulated step size (default 0.1 for SGD, 1e-3 for Adam).
        gamma: the gradient-norm bound; above it the iteration minimizes ||g|| instead (default 1 for SGD,
            infinite for Adam).
        steps: iterations (each uses 1.5 batches).
        batch_size: examples of S = B0 u B1 (even).
        min_scale: lower bound of every weight tensor's scale; biases and normalization betas get 0.
        max_scale: optional upper bound.
        grad_clip: each scale's gradient is clipped to [-grad_clip, grad_clip] (None: no clipping).
        seed: the half-batch sampling seed.
        progress: a Keras progress bar (True), None/False for none.

    Returns:
        A `GradInitReport`. The model's weights are multiplied in place; no variable is added, so
        serialization is unchanged.
    """
    t0 = time.perf_counter()
    optimizer = str(optimizer).lower()
    if optimizer not in DEFAULTS:
        raise ValueError(f"optimizer must be 'sgd' or 'adam' (the simulated step GradInit uses), got {optimizer!r}.")
    eta = DEFAULTS[optimizer]["eta"] if eta is None else float(eta)
    gamma = DEFAULTS[optimizer]["gamma"] if gamma is None else float(gamma)
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta!r}.")
    if int(batch_size) != batch_size or batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be an even integer >= 2 (two half-batches), got {batch_size!r}.")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if not getattr(model, "built", False):
        raise ValueError("gradinit needs a built model: call it on data or build it first.")
    if len(keras.tree.flatten(model.outputs if hasattr(model, "outputs") and model.outputs else [0])) != 1:
        raise ValueError("gradinit supports models with one output tensor.")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError("data must be a pair (x, y) of arrays.")
    x, y = data
    n = _length(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}.")
    loss_fn = keras.losses.get(loss)

    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError("The model has no trainable weight tensor to scale.")
    norms = [float(np.linalg.norm(keras.ops.convert_to_numpy(v.value).astype(np.float64))) for v in variables]
    scaled_index = [i for i, norm in enumerate(norms) if norm > 0.0]  # zero tensors never change
    floors = [0.0 if variables[i].path.split("/")[-1].endswith(_BIAS_SUFFIXES) else float(min_scale)
              for i in scaled_index]
    alpha = np.ones(len(scaled_index))
    scale_opt = ScaleAdam(len(scaled_index), lr, floors, max_scale=max_scale, grad_clip=grad_clip)

    half = int(batch_size) // 2
    batches = list(half_batches(n, half, int(steps), seed))

    def pair(index):
        b0, b1, b2 = index
        return _take(x, np.concatenate([b0, b1])), _take(y, np.concatenate([b0, b1])), \
            _take(x, np.concatenate([b0, b2])), _take(y, np.concatenate([b0, b2]))

    bar = keras.utils.Progbar(int(steps), unit_name="step") if progress else None
    constraint_steps = 0
    with dropout_off(model):
        objective = _objective_class()(model, loss_fn, scaled_index, optimizer == "sgd", eta)
        first = pair(batches[0])
        _, look0, norm0, loss0, _ = _evaluate(objective, alpha, first, eta)
        for k, index in enumerate(batches):
            grad, value, norm, loss_s, constrained = objective(alpha, *pair(index), gamma)
            if not (np.all(np.isfinite(grad)) and np.isfinite(value)):
                raise FloatingPointError(
                    f"GradInit step {k}: the objective or its gradient is not finite (loss {loss_s:.4g}, "
                    f"||g|| {norm:.4g}); try a smaller eta or lr. The model is unchanged.")
            constraint_steps += bool(constrained)
            alpha = scale_opt.step(alpha, grad, "constraint" if constrained else "objective")
            if bar is not None:
                bar.update(k + 1, values=[("loss", loss_s), ("grad_norm", norm)])
        _, look1, norm1, loss1, _ = _evaluate(objective, alpha, first, eta)

    # Everything is computed: assign in place (the same variables, no new ones).
    for k, i in enumerate(scaled_index):
        variable = variables[i]
        variable.assign(keras.ops.cast(variable.value * keras.ops.cast(alpha[k], variable.dtype), variable.dtype))
    return GradInitReport(
        scales={variables[i].path: float(alpha[k]) for k, i in enumerate(scaled_index)},
        loss_before=loss0, loss_after=loss1, lookahead_before=look0, lookahead_after=look1,
        grad_norm_before=norm0, grad_norm_after=norm1, steps=int(steps), constraint_steps=constraint_steps,
        seconds=time.perf_counter() - t0, optimizer=optimizer, eta=eta, gamma=gamma,
    )


def _evaluate(objective, alpha, batch, eta):
    """(grad, look-ahead loss, ||g||, loss on S, constrained) with the constraint off (gamma infinite), so
    the look-ahead loss is always computed."""
    grad, value, norm, loss_s, constrained = objective(alpha, *batch, float("inf"))
    return grad, value * eta, norm, loss_s, constrained
