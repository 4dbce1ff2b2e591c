"""``make_private``: install a DP-SGD train step on a Keras model (TensorFlow or JAX backend).

The installed step (Abadi et al. 2016): per-example gradients of the compiled
loss, each clipped to global L2 norm ``l2_norm_clip`` (all trainable tensors
together), summed over the real (unmasked) examples, Gaussian noise
``N(0, sigma^2 C^2 I)`` added once, divided by the expected batch size
(Poisson batches) or the actual batch size (plain batches), then handed to
``model.optimizer``. Weight regularizers (``kernel_regularizer=...``) do not
look at the data: their gradient is added after the noise, outside clipping,
at no privacy cost.

This module is backend-neutral (checks, configuration, calibration, the state interface);
the train steps live in :mod:`autoinit_tf.privacy.tf_step` (TensorFlow, per-example engine
:mod:`autoinit_tf.privacy.per_example`) and :mod:`autoinit_tf.privacy.jax_step` (JAX,
``jax.vmap``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import secrets

import keras
import numpy as np

from autoinit_tf.privacy import accounting
from autoinit_tf.privacy.ledger import StepLedger
from autoinit_tf.privacy.sampling import MASK_KEY, RATE_KEY, TRUNCATED_KEY
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

#: Keras backends make_private supports (TensorFlow: tf_step + per_example; JAX: jax_step).
SUPPORTED_BACKENDS = ("tensorflow", "jax")


def check_backend():
    """The current Keras backend, or a clear error if make_private does not support it."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"autoinit_tf.privacy (DP-SGD) supports the Keras backends {SUPPORTED_BACKENDS}; "
            f"the current backend is {backend!r}. Set KERAS_BACKEND=tensorflow (or jax) before "
            "importing keras."
        )
    return backend

logger = logging.getLogger(__name__)


def resolve_loss_fn(model, loss_fn=None):
    """The per-batch-mean loss ``f(y_true, y_pred)`` used for per-example gradients."""
    if loss_fn is not None:
        return loss_fn

    def compiled(y_true, y_pred):
        compile_loss = getattr(model, "_compile_loss", None)
        if compile_loss is None:
            raise ValueError("Compile the model with a loss before training it with DP-SGD.")
        loss = compile_loss(y_true, y_pred)
        if loss is None:
            raise ValueError("The compiled loss returned None; compile the model with a loss.")
        return loss

    return compiled


@dataclasses.dataclass
class PrivacyConfig:
    l2_norm_clip: float
    noise_multiplier: float
    batch_size: int
    dataset_size: int
    delta: float
    accountant: str
    target_epsilon: float | None
    planned_steps: int | None
    microbatch_size: int | None
    augmult: int
    ema_momentum: float | None

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size


class PrivacyState(abc.ABC):
    """DP configuration and counters kept next to (not inside) the model's variables.

    Backend-neutral interface; the counters live in backend-specific subclasses
    (:mod:`autoinit_tf.privacy.tf_step`, :mod:`autoinit_tf.privacy.jax_step`).
    ``ema`` is ``None`` or a list of variables (``.numpy()``, ``.assign``) holding the averaged
    trainable weights.
    """

    def __init__(self, config: PrivacyConfig, engine, seed: int):
        self.config = config
        self.engine = engine
        self.seed = int(seed)
        self.ema = None

    @abc.abstractmethod
    def ledger(self) -> StepLedger:
        """How every DP step taken so far was sampled (a fresh copy)."""

    @property
    def steps_taken(self) -> int:
        """DP steps taken so far (every batch, Poisson or not)."""
        return self.ledger().steps

    @property
    def poisson_steps_taken(self) -> int:
        """DP steps taken on Poisson-sampled batches (truncated ones included)."""
        return self.ledger().poisson_steps

    @property
    def rate_mismatch_steps(self) -> int:
        """Poisson steps whose batch carried a sampling rate other than the configured one."""
        return sum(n for q, n in self.ledger().poisson.items() if self.rate_differs(q))

    def accounted_rate(self, rate) -> float:
        """The rate a Poisson step is accounted at: the configured one when ``rate`` is it (up to
        float32 rounding); else ``rate`` itself, rounded up by one float32 step when it looks like
        a float32 value (JAX without x64 may have rounded it down; a larger rate only overstates
        epsilon)."""
        q = float(rate)
        if not self.rate_differs(q):
            return self.config.sampling_rate
        if float(np.float32(q)) == q:
            q = float(np.nextafter(np.float32(q), np.float32(2.0)))
        return min(1.0, q)

    def ema_decay(self, t):
        """EMA decay after ``t`` steps: ``min(mu, (1 + t) / (10 + t))`` (warm-up; ``t`` float or tensor)."""
        return keras.ops.minimum(
            keras.ops.cast(self.config.ema_momentum, "float32"), (1.0 + t) / (10.0 + t)
        )

    def rate_differs(self, rate) -> bool:
        # relative 1e-6: the rate may arrive as float32 (JAX without x64)
        q = self.config.sampling_rate
        return abs(float(rate) - q) > 1e-6 * q


def get_state(model) -> PrivacyState:
    state = getattr(model, "_dp_privacy_state", None)
    if state is None:
        raise ValueError("This model was not made private: call privacy.make_private(model, ...) first.")
    return state


def _positive_int(name, value):
    if value is None or int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


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
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    if getattr(model, "_dp_privacy_state", None) is not None:
        raise ValueError("make_private was already applied to this model.")
    if not model.built:
        raise ValueError(
            "The model must be built before make_private (give it an Input or call it on a batch)."
        )
    check_model(model, probe_inputs)
    c = float(l2_norm_clip)
    if not (c > 0.0) or math.isinf(c):
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {l2_norm_clip!r}.")
    batch_size = _positive_int("batch_size", batch_size)
    dataset_size = _positive_int("dataset_size", dataset_size)
    if batch_size > dataset_size:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than dataset_size ({dataset_size}): the sampling "
            "rate q = batch_size / dataset_size must be <= 1."
        )
    delta = accounting.check_delta(target_delta)
    accountant = accounting.check_accountant(accountant)
    q = batch_size / dataset_size
    planned = None
    if steps is not None:
        planned = _positive_int("steps", steps)
    elif epochs is not None:
        if not (float(epochs) > 0):
            raise ValueError(f"epochs must be > 0, got {epochs!r}.")
        planned = int(math.ceil(float(epochs) * accounting.steps_per_epoch(dataset_size, batch_size)))
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
    else:
        sigma = accounting.check_noise_multiplier(noise_multiplier)
        if sigma == 0.0:
            warnings_msg = "noise_multiplier=0: gradients are clipped but NOT noised; there is no privacy guarantee."
            logger.warning(warnings_msg)
    if ema_momentum is not None and not (0.0 < float(ema_momentum) < 1.0):
        raise ValueError(f"ema_momentum must be in (0, 1), got {ema_momentum!r}.")
    config = PrivacyConfig(
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
    if seed is None:
        seed = secrets.randbits(62)
    loss = resolve_loss_fn(model, loss_fn)
    if backend == "jax":
        from autoinit_tf.privacy import jax_step

        if augmult != 1 or augment is not None:
            raise NotImplementedError(
                "augmult / augment are implemented for the TensorFlow backend only (the augment "
                "function is TensorFlow code); on JAX use augmult=1."
            )
        jax_step.install(model, config, loss, seed)
    else:
        from autoinit_tf.privacy import tf_step
        from autoinit_tf.privacy.per_example import PerExampleGradients

        attention = [
            layer.name
            for layer in all_layers(model)
            if isinstance(layer, keras.layers.MultiHeadAttention)
        ]
        if per_example_method == "direct" and attention:
            logger.info(
                "Attention layers %s: per-example gradients through tf.vectorized_map (the direct "
                "engine is not used for attention models on TensorFlow).", attention,
            )
            per_example_method = "vectorized_map"
        engine = PerExampleGradients(
            model,
            loss,
            microbatch_size=microbatch_size,
            augmult=augmult,
            augment=augment,
            jit_compile=jit_compile,
            method=per_example_method,
        )
        tf_step.install(model, config, engine, seed)
    model.train_function = None
    return model


def parse_sample_weight(sample_weight):
    """``(mask, rate, truncated)`` from a Poisson batch; ``(None, None, None)`` for plain batches;
    errors otherwise. ``rate`` and ``truncated`` are ``None`` when the batch does not carry them."""
    if sample_weight is None:
        return None, None, None
    if isinstance(sample_weight, dict) and MASK_KEY in sample_weight:
        return sample_weight[MASK_KEY], sample_weight.get(RATE_KEY), sample_weight.get(TRUNCATED_KEY)
    raise ValueError(
        "DP-SGD does not accept sample_weight or class_weight: a weight > 1 would scale an "
        "example's clipped gradient past l2_norm_clip and void the privacy bound. Rebalance by "
        "resampling the data instead (use privacy.poisson_batches for the batches)."
    )
