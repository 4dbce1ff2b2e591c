"""``PrivacyCallback``: epsilon after every epoch in the logs / TensorBoard, optional budget stop."""

from __future__ import annotations

import logging
import math

import keras

from autoinit_tf.privacy import accounting, ledger
from autoinit_tf.privacy.ema import swap_in_ema, swap_out_ema
from autoinit_tf.privacy.state import get_state
from autoinit_tf.privacy.statement import statement

logger = logging.getLogger(__name__)


class PrivacyCallback(keras.callbacks.Callback):
    """Log epsilon each epoch; optionally stop before a privacy budget is exceeded.

    The logged ``epsilon`` is the statement's (:func:`autoinit_tf.privacy.statement`): the
    proven bound for the sampling actually used, ``inf`` once a step was not an untruncated
    Poisson step (plain ``fit(x, y, batch_size=...)`` batches, truncated batches); a warning says
    so once.

    Args:
        max_epsilon: budget. After each epoch, if one more epoch (the same steps as the last one,
            at the same rates) would push epsilon above it, training stops -- so the budget is
            never exceeded; with no proven epsilon (inf) training stops too. ``None``: no stop.
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
        self._ledger_at_epoch_start = None
        self._swapped = None
        self._warned = False

    def _state(self):
        return get_state(self.model)

    def _projected_epsilon(self, book):
        """Proven epsilon of the steps in ``book`` (inf unless all untruncated Poisson)."""
        cfg = self._state().config
        if not book.proven:
            return math.inf
        return ledger.epsilon_of_events(
            book.events(cfg.noise_multiplier, cfg.dataset_size), cfg.noise_multiplier, cfg.delta, cfg.accountant
        )

    def on_train_begin(self, logs=None):
        state = self._state()
        if self.evaluate_with_ema and state.ema is None:
            raise ValueError("evaluate_with_ema=True needs make_private(..., ema_momentum=...).")
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_begin(self, epoch, logs=None):
        self._ledger_at_epoch_start = self._state().ledger()

    def on_test_begin(self, logs=None):
        if self.evaluate_with_ema and self._swapped is None:
            self._swapped = swap_in_ema(self.model)

    def on_test_end(self, logs=None):
        if self._swapped is not None:
            swap_out_ema(self.model, self._swapped)
            self._swapped = None

    def on_epoch_end(self, epoch, logs=None):
        st = statement(self.model)
        eps, steps = st.epsilon, st.steps
        if not st.guarantee and not self._warned:
            self._warned = True
            logger.warning("No proven privacy guarantee (epsilon logged as inf): %s", st.caveats[0])
        if logs is not None:
            logs[self.key] = eps
        self.history.append(eps)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default():
                tf.summary.scalar(self.key, eps, step=epoch)
            self._writer.flush()
        if self.max_epsilon is not None:
            book = self._state().ledger()
            last = book.minus(self._ledger_at_epoch_start) if self._ledger_at_epoch_start is not None else book
            if eps >= self.max_epsilon or self._projected_epsilon(book.plus(last)) > self.max_epsilon:
                logger.warning(
                    "Stopping: epsilon is %.4g after %d steps and another epoch would exceed the budget %.4g.",
                    eps, steps, self.max_epsilon,
                )
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
