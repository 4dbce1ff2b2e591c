"""DP-SGD train step and privacy state for the TensorFlow backend.

The per-example part (clipped sum of per-example gradients) is
:class:`autoinit_tf.privacy.per_example.PerExampleGradients`; this module adds the Gaussian
noise, the data-independent regularization gradient, the optimizer update, the step counters
and the parameter average, inside Keras' compiled ``train_step``.
"""

from __future__ import annotations

import math

import keras

from autoinit_tf.privacy.ledger import SLOTS, StepLedger
from autoinit_tf.privacy.state import PrivacyState, parse_sample_weight

#: Stream numbers folded into (seed, step): the noise and the augmentation never share a draw.
NOISE_STREAM, AUGMENT_STREAM = 0, 1


class _SlotCounter:
    """Counts by int64 key in two fixed-size ``tf.Variable`` vectors (key 0 = empty slot), plus
    an overflow count: int64 ops only, no branch, so the compiled step stays fast."""

    def __init__(self, name):
        import tensorflow as tf

        self.keys = tf.Variable(tf.zeros([SLOTS], tf.int64), trainable=False, name=f"dp_{name}_keys")
        self.counts = tf.Variable(tf.zeros([SLOTS], tf.int64), trainable=False, name=f"dp_{name}_counts")
        self.overflow = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"dp_{name}_overflow")

    def add(self, key):
        import tensorflow as tf

        key = tf.cast(key, tf.int64)
        keys = self.keys.read_value()
        match = tf.equal(keys, key)
        empty = tf.equal(keys, 0)
        found = tf.reduce_any(match)
        slot = tf.where(found, tf.argmax(tf.cast(match, tf.int32)), tf.argmax(tf.cast(empty, tf.int32)))
        full = tf.logical_and(tf.logical_not(found), tf.logical_not(tf.reduce_any(empty)))
        onehot = tf.one_hot(slot, SLOTS, dtype=tf.int64) * (1 - tf.cast(full, tf.int64))
        self.keys.assign(tf.where(onehot > 0, key, keys))
        self.counts.assign_add(onehot)
        self.overflow.assign_add(tf.cast(full, tf.int64))

    def items(self):
        keys, counts = self.keys.numpy(), self.counts.numpy()
        return [(int(k), int(n)) for k, n in zip(keys, counts) if n > 0], int(self.overflow.numpy())


class TFPrivacyState(PrivacyState):
    """Counters and EMA as ``tf.Variable`` objects, updated inside the compiled train step.

    ``steps`` is the DP random state's counter: the noise of step k is drawn from
    ``(seed, k)`` whatever the optimizer, compile or fit, so no two steps share noise.
    Poisson rates are counted by their float64 bit pattern, plain batches by their size.
    """

    def __init__(self, model, config, engine, seed: int):
        import tensorflow as tf

        super().__init__(config, engine, seed)
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="dp_steps")
        self.rates = _SlotCounter("poisson_rates")
        self.plain_sizes = _SlotCounter("plain_sizes")
        self.truncated = tf.Variable(0, dtype=tf.int64, trainable=False, name="dp_truncated_steps")
        if config.ema_momentum is not None:
            self.ema = [
                tf.Variable(v.value, trainable=False, name="dp_ema_" + v.name.replace("/", "_"))
                for v in model.trainable_variables
            ]

    def ledger(self) -> StepLedger:
        import numpy as np

        out = StepLedger()
        rates, rate_overflow = self.rates.items()
        for bits, n in rates:
            out.record_poisson(self.accounted_rate(np.int64(bits).view(np.float64)), n=n)
        sizes, size_overflow = self.plain_sizes.items()
        for b, n in sizes:
            out.record_plain(b, n=n)
        out.truncated = int(self.truncated.numpy())
        out.overflow = rate_overflow + size_overflow
        return out

    def record(self, batch_size, rate, truncated):
        """In the compiled step: count one step (plain when ``rate`` is None)."""
        import tensorflow as tf

        self.steps.assign_add(1)
        if rate is None:
            self.plain_sizes.add(batch_size)
            return
        self.rates.add(tf.bitcast(tf.cast(rate, tf.float64), tf.int64))
        if truncated is not None:
            self.truncated.assign_add(tf.cast(tf.cast(truncated, tf.bool), tf.int64))

    def stream_seeds(self, step):
        """``(noise seed, augmentation seed)`` of step ``step``: two independent Philox streams."""
        import tensorflow as tf

        base = tf.stack([tf.constant(self.seed % (2**62), tf.int64), tf.cast(step, tf.int64)])
        noise = tf.random.experimental.stateless_fold_in(base, NOISE_STREAM)
        augment = tf.random.experimental.stateless_fold_in(base, AUGMENT_STREAM)
        return noise, augment


def install(model, config, engine, seed):
    """Attach the state and the DP ``train_step`` to ``model`` (plain attributes, not saved)."""
    state = TFPrivacyState(model, config, engine, seed)
    object.__setattr__(model, "_dp_privacy_state", state)
    object.__setattr__(model, "train_step", dp_train_step.__get__(model))
    return state


def dp_train_step(self, data):
    import tensorflow as tf

    state = self._dp_privacy_state
    cfg = state.config
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    mask, rate, truncated = parse_sample_weight(sample_weight)
    first = tf.nest.flatten(x)[0]
    plain = mask is None
    if plain:
        mask = tf.ones(tf.shape(first)[:1], tf.bool)
        denominator = tf.cast(tf.shape(first)[0], tf.float32)
    else:
        denominator = tf.constant(float(cfg.batch_size), tf.float32)
        if rate is None:
            rate = tf.constant(cfg.sampling_rate, tf.float64)
    variables = self.trainable_variables
    trainable = [v.value for v in variables]
    non_trainable = [v.value for v in self.non_trainable_variables]
    noise_seed, augment_seed = state.stream_seeds(state.steps.read_value())

    grad_sum, losses, y_pred, _, seed_states = state.engine.clipped_sum(
        trainable, non_trainable, x, y, mask, tf.constant(cfg.l2_norm_clip, tf.float32), augment_seed
    )

    # One Gaussian draw for all parameters: N(0, (sigma C)^2) per coordinate on the sum.
    std = cfg.noise_multiplier * cfg.l2_norm_clip
    grads = []
    if std > 0:
        sizes = [int(math.prod(v.shape)) for v in variables]
        noise = tf.random.stateless_normal([sum(sizes)], seed=noise_seed, dtype=tf.float32) * std
        pieces = tf.split(noise, sizes)
        for g, n, v in zip(grad_sum, pieces, variables):
            grads.append((g + tf.cast(tf.reshape(n, v.shape), g.dtype)) / tf.cast(denominator, g.dtype))
    else:
        grads = [g / tf.cast(denominator, g.dtype) for g in grad_sum]

    # Data-independent weight regularization: exact gradient, no clipping, no privacy cost.
    regularized = [(i, v) for i, v in enumerate(variables) if getattr(v, "regularizer", None) is not None]
    reg_loss = tf.constant(0.0)
    if regularized:
        with tf.GradientTape() as tape:
            watched = [trainable[i] for i, _ in regularized]
            tape.watch(watched)
            reg_loss = tf.add_n([tf.cast(v.regularizer(t), tf.float32) for (_, v), t in zip(regularized, watched)])
        for (i, _), g in zip(regularized, tape.gradient(reg_loss, watched)):
            grads[i] = grads[i] + tf.cast(g, grads[i].dtype)

    self.optimizer.apply(grads, variables)

    # RNG seed states (dropout etc.) advance as in a normal step.
    nt_vars = self.non_trainable_variables
    for k, new in zip(state.engine.seed_state_index, seed_states):
        nt_vars[k].assign(new)

    # Counted by the float64 rate's bit pattern (int64 ops): assigning the float64 rate itself
    # to a variable made the whole step ~1.6x slower on CPU (measured, TF 2.21).
    state.record(tf.shape(first)[0], None if plain else rate, truncated)
    if state.ema is not None:
        t = tf.cast(state.steps.read_value(), tf.float32)
        mu = state.ema_decay(t)
        for e, v in zip(state.ema, variables):
            e.assign(tf.cast(mu, e.dtype) * e + tf.cast(1.0 - mu, e.dtype) * v.value)

    # Logged training loss/metrics use the private data directly (as in any DP-SGD library,
    # they are not covered by the guarantee); padded rows have weight 0.
    maskf = tf.cast(mask, tf.float32)
    n_real = tf.reduce_sum(maskf)
    mean_loss = tf.reduce_sum(losses * maskf) / tf.maximum(n_real, 1.0) + reg_loss
    self._loss_tracker.update_state(mean_loss, sample_weight=n_real)
    return self.compute_metrics(x, y, y_pred, sample_weight=maskf)
