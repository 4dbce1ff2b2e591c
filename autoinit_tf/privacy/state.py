"""The DP-SGD state every privacy module shares: configuration, the per-model state interface,
sample-weight parsing, loss resolution and the backend check.

A leaf: it imports nothing of the engines (:mod:`autoinit_tf.privacy.tf_step`,
:mod:`autoinit_tf.privacy.jax_step`) or of :mod:`autoinit_tf.privacy.model` (the dispatcher), which
all import it.
"""

from __future__ import annotations

import abc
import dataclasses
import logging

import keras
import numpy as np

from autoinit_tf.privacy.ledger import StepLedger
from autoinit_tf.privacy.sampling import MASK_KEY, RATE_KEY, TRUNCATED_KEY

logger = logging.getLogger("autoinit_tf.privacy")

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


def positive_int(name, value):
    if value is None or int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


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
