"""`SignalMonitor`: watch the measured signal evolve during training."""

from __future__ import annotations

import re

import keras

__all__ = ["SignalMonitor"]


class SignalMonitor(keras.callbacks.Callback):
    """Measure every node's output variance on a fixed batch at the end of every n-th epoch.

    The measurement is `autoinit_tf.measure` (one side-effect-free forward pass of `x`: weights,
    BatchNormalization statistics, optimizer and RNG state are untouched). Per node it writes

    * ``logs["signal_var/<node>"]`` (so `History` and later callbacks see it), and
    * a TensorBoard scalar ``signal_var/<node>`` at step ``epoch`` under ``log_dir`` when given
      (needs TensorFlow's summary writer: ``tensorflow`` must be importable, whatever the backend).

    The latest report is kept as ``self.last_report`` and all of them in ``self.history``
    (``{epoch: {node: variance}}``).

    Args:
        x: the batch to measure on (array, list/dict of arrays, or a dataset whose first batch is used),
            or None for a deterministic Gaussian probe with ``input_moments``.
        every_n_epochs: measure at epochs ``0, n, 2n, ...`` (0-based).
        log_dir: TensorBoard log directory (None: no TensorBoard output).
        training: measure in training mode (BatchNormalization on batch statistics, Dropout active).
        batch_size: at most this many examples of `x` (or the probe size).
        to_logs: also write the values into ``logs``.
        input_moments: the probe's moments when `x` is None.
    """

    def __init__(self, x=None, every_n_epochs=1, log_dir=None, *, training=True, batch_size=256, to_logs=True,
                 input_moments=None):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs!r}.")
        self.x = x
        self.every_n_epochs = int(every_n_epochs)
        self.log_dir = None if log_dir is None else str(log_dir)
        self.training = training
        self.batch_size = batch_size
        self.to_logs = to_logs
        self.input_moments = input_moments
        self.last_report = None
        self.history: dict = {}
        self._writer = None
        if self.log_dir is not None:
            self._summary()  # fail early with a clear message

    def _summary(self):
        try:
            import tensorflow as tf
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SignalMonitor(log_dir=...) writes TensorBoard scalars with tensorflow's summary writer; "
                "install tensorflow (or tensorflow-cpu), or pass log_dir=None and read the values from "
                "the History logs."
            ) from exc
        return tf.summary

    def _get_writer(self):
        if self._writer is None:
            self._writer = self._summary().create_file_writer(self.log_dir)
        return self._writer

    def measure(self):
        """Measure now; returns ``{node name: variance}`` (also stored as ``last_report``)."""
        from autoinit_tf.measure import measure

        # `self.model` (not a layer reference captured earlier): on JAX it syncs the trainer's state
        # into the variables first (see the field notes, section 2).
        model = self.model
        report = measure(model, self.x, training=self.training, batch_size=self.batch_size,
                         input_moments=self.input_moments)
        self.last_report = report
        return {r.name: float(r.outputs[0].var) for r in report.rows if r.outputs}

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every_n_epochs != 0:
            return
        values = self.measure()
        self.history[epoch] = values
        if self.to_logs and logs is not None:
            for name, v in values.items():
                logs[f"signal_var/{name}"] = v
        if self.log_dir is not None:
            summary = self._summary()
            writer = self._get_writer()
            with writer.as_default():
                for name, v in values.items():
                    summary.scalar(f"signal_var/{_tag(name)}", v, step=epoch)
            writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)
