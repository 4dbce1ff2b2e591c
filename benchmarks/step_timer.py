"""A Keras callback recording the wall time of every training batch (``fit``'s step), for the benchmarks."""

from __future__ import annotations

import time


def step_timer():
    """A new callback whose ``times`` lists each training batch's seconds (Keras imported on first use)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()
