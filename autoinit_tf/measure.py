"""The measured signal: replay the graph on real tensors, side-effect free (`measure`).

One replay (`autoinit_tf.signal_replay.SignalReplay`, a visitor of `graph.walk`, the walker of the
analytic pass) in which every layer runs through ``layer.stateless_call(trainable_values,
non_trainable_values, ...)``: the layer computes with the values it is handed and returns its would-be
state updates, which are dropped. So `measure` leaves every weight, BatchNormalization moving
statistic, optimizer slot and seed-generator (RNG) state exactly as it was, on every backend. Raw ops
(``x + y``, ``ops.relu``...) are plain calls.

`measure(model, x)` -> `SignalReport` whose rows hold the *measured* moments of every node's outputs,
plus the Signal Propagation Plot quantities (Brock et al. 2021) per output: the average squared
channel mean and the average channel variance (channels = last axis), and, for layers with a fused
activation (``Dense(..., activation="relu")``), the pre-activation moments; for recurrent layers
(SimpleRNN/LSTM/GRU, Bidirectional) the moments of the input contribution x W of every step to the gate
pre-activations (all gates side by side), the quantity AutoInit's recurrent rule sets.

The same replay calibrates (`autoinit_tf.calibration`; its names are importable from here too, as
before the split); `autoinit_tf.compare` puts the measured moments beside the analytic ones.
"""

from __future__ import annotations

from autoinit_tf import graph
from autoinit_tf.calibration import (  # noqa: F401  (this module's public names before the split)
    CALIBRATION_RSE,
    CalibrationWarning,
    assign_values,
    calibrate,
    calibrated_values,
)
from autoinit_tf.inputs import replay_inputs
from autoinit_tf.report import SignalReport
from autoinit_tf.rules.builtin import register_builtin_rules
from autoinit_tf.signal_replay import CALIBRATION_KERNELS, SignalReplay, calibration_kernel  # noqa: F401

_Replay = SignalReplay  # the name tests patch

__all__ = ["measure", "calibrate", "calibrated_values", "assign_values", "calibration_kernel", "CALIBRATION_KERNELS",
           "CalibrationWarning", "CALIBRATION_RSE"]


def measure(model, x=None, *, training=True, batch_size=256, seed=None, input_moments=None) -> SignalReport:
    """Measure the mean and variance of every node's output on a batch; change nothing.

    Args:
        model: a built `keras.Model` (Functional, built Sequential, or traceable subclassed model).
        x: a batch of inputs (array, list/dict of arrays, tf.data dataset or iterable: its first
            batch is used). None: a deterministic Gaussian probe with `input_moments`.
        training: run layers in training mode (BatchNormalization uses batch statistics, Dropout is
            active with a fixed, throw-away RNG state).
        batch_size: the probe's batch size; `x` is cut to this many examples.
        seed: the probe's seed, and of the masks of dropout and other random layers in training mode
            (None means 0: the measurement is deterministic; the layers' own seed states are not advanced).
        input_moments: ``(mean, var)`` of the probe (per input or for all). Default: what the model's
            preprocessing declares (`declared.input_moments`), else ``(0, 1)``.

    Returns:
        A `SignalReport` (``source="measured"``) with one row per call of each layer or op, named like
        the rows of `analyze`. ``row.outputs`` are the measured moments, ``row.channel`` the average
        squared channel mean and average channel variance per output (channels = last axis), and
        ``row.preactivation`` the moments before a fused activation.
    """
    register_builtin_rules()
    fn = graph.as_functional(model)
    inputs, _ = replay_inputs(fn, x, batch_size, seed, input_moments)
    replay = SignalReplay(fn, training=training, rng_seed=0 if seed is None else int(seed))
    replay.run(inputs)
    return SignalReport(model.name, replay.rows, assigned=[], source="measured")


