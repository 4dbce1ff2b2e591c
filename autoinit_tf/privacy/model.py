"""``make_private``: install a DP-SGD train step on a Keras model (TensorFlow or JAX backend).

The installed step (Abadi et al. 2016): per-example gradients of the compiled
loss, each clipped to global L2 norm ``l2_norm_clip`` (all trainable tensors
together), summed over the real (unmasked) examples, Gaussian noise
``N(0, sigma^2 C^2 I)`` added once, divided by the expected batch size
(Poisson batches) or the actual batch size (plain batches), then handed to
``model.optimizer``. Weight regularizers (``kernel_regularizer=...``) do not
look at the data: their gradient is added after the noise, outside clipping,
at no privacy cost.

This module is the dispatcher only: it checks the model (:mod:`autoinit_tf.privacy.validators`),
builds the configuration (:class:`autoinit_tf.privacy.state.PrivacyConfig`, sigma calibrated by
:mod:`autoinit_tf.privacy.accounting`) and hands it to the backend's step,
:mod:`autoinit_tf.privacy.tf_step` (TensorFlow, per-example engine
:mod:`autoinit_tf.privacy.per_example`) or :mod:`autoinit_tf.privacy.jax_step` (JAX, ``jax.vmap``).
The engines import only the shared leaf :mod:`autoinit_tf.privacy.state`, never this module.
"""

from __future__ import annotations

import logging
import math
import secrets

import keras

from autoinit_tf.privacy import accounting
from autoinit_tf.privacy.state import PrivacyConfig, check_backend, positive_int, resolve_loss_fn
from autoinit_tf.privacy.validators import all_layers
from autoinit_tf.privacy.validators import (  # noqa: F401  (public names, re-exported)
    EXAMPLE_MIXING_LAYERS,
    DataDependentLossError,
    ExampleMixingLayerError,
    check_example_independence,
    check_model,
    find_example_mixing_layers,
    register_example_mixing_layer,
)

logger = logging.getLogger(__name__)


def make_private(
    model,
    l2_norm_clip: float,
    noise_multiplier: float | None = None,
    *,
    target_epsilon: float | None = None,
    target_delta: float = 1e-5,
    batch_size: int,
    dataset_size: int,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "pld",
    microbatch_size: int | None = None,
    augmult: int = 1,
    augment=None,
    ema_momentum: float | None = None,
    loss_fn=None,
    seed: int | None = None,
    jit_compile: bool = True,
    per_example_method: str = "direct",
    probe_inputs=None,
):
    """Make ``model`` train with DP-SGD; returns the same model object.

    Args:
        model: a built ``keras.Model`` (an AutoInit-wrapped model works the same way).
        l2_norm_clip: C, the per-example global L2 clipping norm (> 0).
        noise_multiplier: sigma (noise std = sigma * C on the gradient sum). Give this or
            ``target_epsilon``.
        target_epsilon: calibrate sigma so that training for ``epochs`` (or ``steps``) spends
            at most this epsilon at ``target_delta``.
        target_delta: delta of the guarantee (default 1e-5; use < 1 / dataset_size).
        batch_size: expected batch size L; the sampling rate is q = L / dataset_size.
        dataset_size: number of training examples N.
        epochs / steps: planned training length (steps = epochs * ceil(N / L)).
        accountant: ``"pld"`` (default, tighter) or ``"rdp"``.
        microbatch_size: examples vectorized at once (bounds memory); None = whole batch.
        augmult: augmentation multiplicity K (De et al.): the per-example loss is averaged
            over K augmented views before clipping; needs ``augment``.
        augment: ``augment(x, seed) -> x`` batched stateless augmentation (see
            :func:`autoinit_tf.privacy.random_flip_and_crop`).
        ema_momentum: keep an exponential moving average of the weights (De et al.), with
            warm-up ``min(mu, (1 + t) / (10 + t))``; evaluate it with
            :func:`autoinit_tf.privacy.ema_weights` or ``PrivacyCallback(evaluate_with_ema=True)``.
        loss_fn: per-batch mean loss ``f(y_true, y_pred)``; default: the compiled loss.
        seed: seed of the noise (default: fresh OS randomness; a fixed seed makes the noise
            predictable, use it only for tests).
        jit_compile: XLA-compile the per-example gradient computation (TensorFlow,
            ``"vectorized_map"`` method; on JAX the trainer's own ``jit_compile`` applies).
        per_example_method: TensorFlow: ``"direct"`` (default: one batched pass, closed-form
            per-example gradients for Dense / Conv1D / Conv2D / Embedding, ``tf.vectorized_map``
            for other variables) or ``"vectorized_map"`` (every variable through
            ``tf.vectorized_map``). JAX always uses ``jax.vmap`` of the one-example gradient.

    After ``make_private``, ``compile`` and ``fit`` as usual; feed
    :func:`autoinit_tf.privacy.poisson_batches` for honest accounting.
    """
    backend = check_backend()
    _check_target(model)
    check_model(model, probe_inputs)
    config = _config(l2_norm_clip, noise_multiplier, target_epsilon, target_delta, batch_size, dataset_size,
                     epochs, steps, accountant, microbatch_size, augmult, ema_momentum)
    if seed is None:
        seed = secrets.randbits(62)
    loss = resolve_loss_fn(model, loss_fn)
    if backend == "jax":
        _install_jax(model, config, loss, seed, augmult, augment)
    else:
        _install_tensorflow(model, config, loss, seed, augment, jit_compile, per_example_method)
    model.train_function = None
    return model


def _check_target(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    if getattr(model, "_dp_privacy_state", None) is not None:
        raise ValueError("make_private was already applied to this model.")
    if not model.built:
        raise ValueError(
            "The model must be built before make_private (give it an Input or call it on a batch)."
        )


def _planned_steps(steps, epochs, dataset_size, batch_size):
    if steps is not None:
        return positive_int("steps", steps)
    if epochs is not None:
        if not (float(epochs) > 0):
            raise ValueError(f"epochs must be > 0, got {epochs!r}.")
        return int(math.ceil(float(epochs) * accounting.steps_per_epoch(dataset_size, batch_size)))
    return None


def _noise_multiplier(noise_multiplier, target_epsilon, q, planned, delta, accountant):
    """sigma as given, or calibrated to spend ``target_epsilon`` over the planned steps."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("Give exactly one of noise_multiplier and target_epsilon.")
    if target_epsilon is not None:
        accounting.check_epsilon(target_epsilon)
        if planned is None:
            raise ValueError("target_epsilon needs the training length: give epochs or steps.")
        sigma = accounting.calibrate_noise_multiplier(target_epsilon, q, planned, delta, accountant)
        logger.info(
            "Calibrated noise_multiplier=%.4f for epsilon=%g, delta=%g over %d steps (q=%.5g, %s).",
            sigma, target_epsilon, delta, planned, q, accountant,
        )
        return sigma
    sigma = accounting.check_noise_multiplier(noise_multiplier)
    if sigma == 0.0:
        logger.warning("noise_multiplier=0: gradients are clipped but NOT noised; there is no privacy guarantee.")
    return sigma


def _config(l2_norm_clip, noise_multiplier, target_epsilon, target_delta, batch_size, dataset_size, epochs, steps,
            accountant, microbatch_size, augmult, ema_momentum) -> PrivacyConfig:
    """Every argument checked, sigma resolved: the configuration the steps and the statement read."""
    c = float(l2_norm_clip)
    if not (c > 0.0) or math.isinf(c):
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {l2_norm_clip!r}.")
    batch_size = positive_int("batch_size", batch_size)
    dataset_size = positive_int("dataset_size", dataset_size)
    if batch_size > dataset_size:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than dataset_size ({dataset_size}): the sampling "
            "rate q = batch_size / dataset_size must be <= 1."
        )
    delta = accounting.check_delta(target_delta)
    accountant = accounting.check_accountant(accountant)
    planned = _planned_steps(steps, epochs, dataset_size, batch_size)
    sigma = _noise_multiplier(noise_multiplier, target_epsilon, batch_size / dataset_size, planned, delta, accountant)
    if ema_momentum is not None and not (0.0 < float(ema_momentum) < 1.0):
        raise ValueError(f"ema_momentum must be in (0, 1), got {ema_momentum!r}.")
    return PrivacyConfig(
        l2_norm_clip=c,
        noise_multiplier=float(sigma),
        batch_size=batch_size,
        dataset_size=dataset_size,
        delta=delta,
        accountant=accountant,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        planned_steps=planned,
        microbatch_size=microbatch_size,
        augmult=int(augmult),
        ema_momentum=None if ema_momentum is None else float(ema_momentum),
    )


def _install_jax(model, config, loss, seed, augmult, augment):
    from autoinit_tf.privacy import jax_step

    if augmult != 1 or augment is not None:
        raise NotImplementedError(
            "augmult / augment are implemented for the TensorFlow backend only (the augment "
            "function is TensorFlow code); on JAX use augmult=1."
        )
    jax_step.install(model, config, loss, seed)


def _install_tensorflow(model, config, loss, seed, augment, jit_compile, per_example_method):
    from autoinit_tf.privacy import tf_step
    from autoinit_tf.privacy.per_example import PerExampleGradients

    attention = [layer.name for layer in all_layers(model) if isinstance(layer, keras.layers.MultiHeadAttention)]
    if per_example_method == "direct" and attention:
        logger.info(
            "Attention layers %s: per-example gradients through tf.vectorized_map (the direct "
            "engine is not used for attention models on TensorFlow).", attention,
        )
        per_example_method = "vectorized_map"
    engine = PerExampleGradients(
        model,
        loss,
        microbatch_size=config.microbatch_size,
        augmult=config.augmult,
        augment=augment,
        jit_compile=jit_compile,
        method=per_example_method,
    )
    tf_step.install(model, config, engine, seed)


def per_example_gradients(model, x, y, loss_fn=None, microbatch_size=None, method="direct"):
    """Stacked per-example gradients of the compiled (or given) loss at the current weights, on the
    current backend (TensorFlow: :class:`~autoinit_tf.privacy.per_example.PerExampleGradients` with
    ``method``; JAX: ``jax.vmap``)."""
    loss = resolve_loss_fn(model, loss_fn)
    if check_backend() == "jax":
        from autoinit_tf.privacy import jax_step

        return jax_step.per_example_gradients(model, x, y, loss_fn=loss, microbatch_size=microbatch_size)
    from autoinit_tf.privacy.per_example import PerExampleGradients

    engine = PerExampleGradients(model, loss, microbatch_size=microbatch_size, method=method)
    grads, _, _ = engine.per_example_gradients(x, y)
    return grads
