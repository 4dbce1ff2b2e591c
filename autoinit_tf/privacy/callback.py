"""``PrivacyCallback``: epsilon after every epoch in the logs / TensorBoard, optional budget stop."""

from __future__ import annotations

import logging

import keras

from autoinit_tf.privacy import accounting
from autoinit_tf.privacy.ema import swap_in_ema, swap_out_ema
from autoinit_tf.privacy.model import get_state

logger = logging.getLogger(__name__)


class PrivacyCallback(keras.callbacks.Callback):
    """Log epsilon each epoch; optionally stop before a privacy budget is exceeded.

    Args:
        max_epsilon: budget. After each epoch, if one more epoch (as many steps as the last one)
            would push epsilon above it, training stops -- so the budget is never exceeded.
            ``None``: no stop.
        log_dir: if given, also write ``epsilon`` to a TensorBoard event file there. Without it,
            a ``keras.callbacks.TensorBoard`` placed after this callback in the list records the
            ``epsilon`` entry of the logs.
        evaluate_with_ema: with ``make_private(..., ema_momentum=...)``, run validation on the
            averaged weights (swapped in for evaluation and back afterwards).
        key: name of the logs entry.
    """

    def __init__(self, max_epsilon=None, log_dir=None, evaluate_with_ema=False, key="epsilon"):
        super().__init__()
        if max_epsilon is not None:
            accounting.check_epsilon(max_epsilon)
        self.max_epsilon = max_epsilon
        self.log_dir = log_dir
        self.evaluate_with_ema = evaluate_with_ema
        self.key = key
        self.history = []
        self._writer = None
        self._steps_at_epoch_start = 0
        self._swapped = None

    def _state(self):
        return get_state(self.model)

    def _epsilon(self, steps):
        cfg = self._state().config
        return accounting.compute_epsilon(cfg.sampling_rate, cfg.noise_multiplier, steps, cfg.delta, cfg.accountant)

    def on_train_begin(self, logs=None):
        state = self._state()
        if self.evaluate_with_ema and state.ema is None:
            raise ValueError("evaluate_with_ema=True needs make_private(..., ema_momentum=...).")
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_begin(self, epoch, logs=None):
        self._steps_at_epoch_start = self._state().steps_taken

    def on_test_begin(self, logs=None):
        if self.evaluate_with_ema and self._swapped is None:
            self._swapped = swap_in_ema(self.model)

    def on_test_end(self, logs=None):
        if self._swapped is not None:
            swap_out_ema(self.model, self._swapped)
            self._swapped = None

    def on_epoch_end(self, epoch, logs=None):
        steps = self._state().steps_taken
        eps = self._epsilon(steps)
        if logs is not None:
            logs[self.key] = eps
        self.history.append(eps)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default():
                tf.summary.scalar(self.key, eps, step=epoch)
            self._writer.flush()
        if self.max_epsilon is not None:
            per_epoch = max(steps - self._steps_at_epoch_start, 1)
            if eps >= self.max_epsilon or self._epsilon(steps + per_epoch) > self.max_epsilon:
                logger.warning(
                    "Stopping: epsilon is %.4g after %d steps and another epoch would exceed the budget %.4g.",
                    eps, steps, self.max_epsilon,
                )
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
