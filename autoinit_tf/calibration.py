"""Calibration: rescale each weighted layer's kernel so its realized pre-activation variance hits the
target exactly (`calibrate`, and ``wrap(..., calibrate=...)`` through `calibrated_values`).

The replay is `autoinit_tf.signal_replay.SignalReplay`; this module chooses its batch (a Gaussian probe
with the model's input moments, data-free, or real data), grows an automatic probe while a calibrated
variance is known to worse than `CALIBRATION_RSE`, and assigns the calibrated kernels only once the
whole replay succeeded (a failure leaves every variable as it was).
"""

from __future__ import annotations

import logging
import math
import warnings

from keras import ops
from keras import tree

from autoinit_tf import declared, graph
from autoinit_tf.inputs import auto_batch, replay_inputs
from autoinit_tf.report import SignalReport
from autoinit_tf.rules.builtin import register_builtin_rules
from autoinit_tf.signal_replay import SignalReplay

__all__ = ["calibrate", "calibrated_values", "assign_values", "CalibrationWarning", "CALIBRATION_RSE", "AUTO_ROUNDS",
           "MAX_ROUNDS", "TRAINING_BATCH_SIZE"]

logger = logging.getLogger("autoinit_tf")

#: Calibration wants every calibrated variance known to this relative standard error (RSE) or better on
#: its batch: a fresh batch of the same distribution then lands within +-5% of the target with a margin
#: of 2.5 standard errors. Worse triggers the automatic probe's growth, or a `CalibrationWarning`.
CALIBRATION_RSE = 0.02

#: When the automatic probe grows, it grows to reach this RSE (a margin of 3.3 standard errors, the
#: margin every one of a deep network's layers needs). Only networks worse than `CALIBRATION_RSE` pay for
#: it: most stay on the default probe.
GROWTH_RSE = 0.015

#: An automatically sized probe grows (towards `GROWTH_RSE`) only while its largest activation
#: holds at most this many elements (64 MiB of float32).
GROWTH_ELEMENTS = 1 << 24


#: When the automatic probe cannot grow further (memory), up to this many rounds on fresh probes of the
#: same size refine the factors, each moving them by the k-th root of its own estimate (their average):
#: the error falls as 1 / sqrt(rounds) while one probe at a time is in memory.
MAX_ROUNDS = 8

#: `wrap`'s default ``calibrate="auto"`` refines over at most this many probes: it calibrates only the
#: layers the analytic pass cannot predict exactly, and runs inside NAS loops, so its cost stays a small
#: multiple of one replay. On the squeeze-and-excitation networks (per-example energies that vary by 4x
#: their mean) more rounds moved nothing a fresh batch can see (benchmarks/zoo_real.py, BENCHMARKS.md);
#: ``calibrate="probe"`` refines over up to `MAX_ROUNDS`.
AUTO_ROUNDS = 2


#: The batch size training will use, by default (Keras `fit`'s): in the calibration replay, layers that
#: normalize by batch statistics (BatchNormalization) run on consecutive chunks of this many probe
#: examples, so what follows them is calibrated for the batches training will see
#: (`signal_replay.SignalReplay`, ``statistics_batch``). Pass ``training_batch_size`` to `wrap` or
#: `calibrate` when you train with another.
TRAINING_BATCH_SIZE = 32


class CalibrationWarning(UserWarning):
    """Calibration could not fix a layer's variance to the intended precision on its batch."""



def calibrate(model, data="probe", *, report=None, input_moments=None, seed=None, signal_variance=1.0,
              training=True, batch_size=None, targets=None, only=None,
              training_batch_size=TRAINING_BATCH_SIZE) -> SignalReport:
    """Rescale each weighted layer's kernel so its realized pre-activation variance hits the target.

    One replay in topological order: at each calibratable layer (see `CALIBRATION_KERNELS`; recurrent
    layers: see the module docstring, their factor is a tuple, one per gate and direction) the layer is
    run on the already-calibrated upstream signal, the kernel is multiplied by ``s`` so that the
    variance of the layer's output *before its fused activation* equals the target exactly on this
    batch (with a nonzero bias, ``s`` solves ``Var(s*Wx + b) = target``), and the scaled output is passed
    on. The kernels are assigned in place at the end, once the whole replay succeeded (a failure leaves
    every variable as it was). Frozen layers are left alone; a layer called several times is
    calibrated on its first call.

    Args:
        model: the model (usually just initialized by the analytic pass).
        data: ``"probe"`` (a Gaussian probe with `input_moments`, data-free) or a batch of real inputs
            (LSUV-style; an array, list/dict of arrays, or a dataset whose first batch is used).
        report: the analytic `SignalReport` of this model: only its weighted rows are calibrated, and it
            gets the scale factors (``report.calibration`` and a note per row) and the realized moments
            (``row.measured``); a row's own ``target`` (a position table the analytic pass draws as a small
            per-position bias, `NodeRow.target`) is where that layer is aimed. None: every calibratable layer,
            each aimed at `signal_variance` (such a table included), and a measured report is returned.
        input_moments, seed: the probe's moments and seed (None: what the model's preprocessing
            declares, `declared.input_moments`, else ``(0, 1)``; and 0).
        signal_variance: the target pre-activation variance.
        training: run layers in training mode.
        batch_size: the probe's batch size (None: about 2**17 input elements, between 8 and 1024, grown
            where a calibrated variance is known to worse than `CALIBRATION_RSE`, see
            `calibration_replay`) or the number of examples of `data` used.
        targets: optional ``{row name: target variance}`` overriding `signal_variance` per layer (the
            rows of `report` that carry their own ``target`` keep it unless named here).
        only: optional set of row names to calibrate (default: the weighted rows of `report`, or every
            calibratable layer when there is no report).
        training_batch_size: the batch size you will train with: in training mode, BatchNormalization
            runs on consecutive chunks of this many examples (`TRAINING_BATCH_SIZE`, Keras fit's
            default 32); None: on the whole batch at once.

    Returns:
        The report (the given one, updated in place, or a new measured one).
    """
    report, values = calibrated_values(model, data, report=report, input_moments=input_moments, seed=seed,
                                       signal_variance=signal_variance, training=training, batch_size=batch_size,
                                       targets=targets, only=only, training_batch_size=training_batch_size)
    assign_values(model, values)
    return report


def calibrated_values(model, data="probe", *, report=None, input_moments=None, seed=None, signal_variance=1.0,
                      training=True, batch_size=None, targets=None, only=None, values=None, record=True,
                      moving_statistics=False, max_rounds=None, training_batch_size=TRAINING_BATCH_SIZE,
                      energy_spread=None):
    """`calibrate` without assigning anything: ``(report, values)`` with ``values`` the calibrated
    kernels as ``id(variable) -> value``.

    ``values`` (optional) maps variables to the values they stand for before calibration (`wrap`
    passes the analytic pass's drawn arrays, so calibration runs before anything is assigned); the
    calibrated kernels are written into it. ``record=False`` keeps no per-node statistics and returns
    no report (``report`` must then be None; ``only`` names the rows to calibrate).
    ``moving_statistics=True`` (`wrap`) also sets the moving statistics of batch-normalizing layers to
    the statistics their inputs have on the calibrated replay (`calibrate` itself leaves them alone).
    ``max_rounds``: the most probes an automatically sized probe refines over (None: `MAX_ROUNDS`).
    ``energy_spread``: see `calibration_replay`.
    """
    if only is None and report is not None:
        only = {r.name for r in report.rows if r.weighted}
    if report is not None:  # the analytic pass's own per-row aims (a position table's bias scale)
        targets = {**report.targets(), **(targets or {})}
    replay, source = calibration_replay(model, data, only=only, record=record, input_moments=input_moments,
                                         seed=seed, signal_variance=signal_variance, training=training,
                                         batch_size=batch_size, targets=targets, values=values,
                                         moving_statistics=moving_statistics, max_rounds=max_rounds,
                                         training_batch_size=training_batch_size, energy_spread=energy_spread)
    if not record:
        return None, replay.values
    if report is None:
        out = SignalReport(model.name, replay.rows, assigned=[], source="measured")
        out.calibration = dict(replay.factors)
        out.calibration_error = dict(replay.rse)
        out.calibration_batch = replay.batch
        return out, replay.values
    by_name = {r.name: r for r in replay.rows}
    for row in report.rows:
        got = by_name.get(row.name)
        if got is None:
            continue
        row.measured = list(got.outputs)
        row.channel = got.channel
        row.preactivation = got.preactivation
        for note in got.notes:
            row.notes.append(note + f" on the {source}")
    report.calibration = dict(replay.factors)
    report.calibration_error = dict(replay.rse)
    report.calibration_batch = replay.batch
    report.calibrated_on = source
    return report, replay.values


def assign_values(model, values):
    """Assign ``values`` (``id(variable) -> value``) to the model's variables, after every check passed."""
    for variable in model.variables:
        v = values.get(id(variable))
        if v is not None:
            variable.assign(ops.cast(v, variable.dtype))


def calibration_replay(model, data, *, only, record, input_moments=None, seed=None, signal_variance=1.0,
                        training=True, batch_size=None, targets=None, values=None, moving_statistics=False,
                        max_rounds=None, training_batch_size=TRAINING_BATCH_SIZE, energy_spread=None):
    """The calibration replay of `calibrate`; ``record=False`` keeps no per-node statistics (for `wrap`
    without a report). Returns the `SignalReplay` (its ``factors``, ``rse`` and ``batch``) and the source
    ("probe" or "data").

    With an automatically sized probe (``data="probe"``, ``batch_size=None``) the probe grows when a
    calibrated variance is known to worse than `CALIBRATION_RSE` on it (heavy-tailed signals, where a few
    examples carry most of the energy: for per-example energies q the relative standard error of the
    variance is std(q) / (mean(q) sqrt(n))): the replay runs again on about n (rse / GROWTH_RSE)^2
    examples, refining the kernels already calibrated, while the largest activation stays within
    `GROWTH_ELEMENTS`, cut down to whole batches of `training_batch_size`. A layer still short of
    `CALIBRATION_RSE` gets a `CalibrationWarning`.

    ``energy_spread``: the largest squared coefficient of variation of the examples' energies that the analytic
    pass predicts at a layer to calibrate (``expm1(Moments.scale)``: per-example log-scales after
    squeeze-and-excitation gates). Its relative standard error on n examples is about sqrt(spread / n); when
    reaching `GROWTH_RSE` needs more examples than memory lets the probe grow to, the first probe is already
    that large (the small first probe would only measure what the prediction says, at the cost of one
    more replay).
    """
    register_builtin_rules()
    fn = graph.as_functional(model)
    probe = data is None or isinstance(data, str)
    grow = probe and batch_size is None
    if batch_size is None:
        batch_size = auto_batch(fn) if probe else None
    if grow and energy_spread and energy_spread > 0.0:
        cap = _whole_batches(max(batch_size, GROWTH_ELEMENTS // max(declared.largest_activation(
            fn, declared.probe_length(fn)), 1)), training_batch_size)
        if 1.1 * energy_spread / GROWTH_RSE**2 >= cap:
            batch_size = cap
    replay = None
    values = {} if values is None else values
    rounds_allowed = MAX_ROUNDS if max_rounds is None else max_rounds
    for _ in range(3):  # the first round, then up to two growths (each grown probe re-estimates the RSE)
        inputs, source = replay_inputs(fn, data, batch_size, seed, input_moments)
        n = int(tree.flatten(inputs)[0].shape[0])
        # Only the last replay's per-node statistics reach the report: a probe the predicted spread says
        # more rounds will follow is not recorded (a third to half of a replay's time is the statistics).
        followed = grow and rounds_allowed >= 2 and _predicted_rse(energy_spread, n) > CALIBRATION_RSE
        replay = SignalReplay(fn, training=training, calibrate=True, targets=targets, signal_variance=signal_variance,
                         only=None if only is None else set(only), record=record and not followed,
                         prior=None if replay is None else replay.factors, values=values,
                         moving_statistics=moving_statistics, statistics_batch=training_batch_size,
                         rng_seed=_round_seed(seed, 1))
        replay.run(inputs)
        replay.batch = n
        del inputs
        worst = max(replay.rse.values(), default=0.0)
        if not grow or worst <= CALIBRATION_RSE:
            break
        cap = max(n, GROWTH_ELEMENTS // max(replay.widest, 1))
        want = min(math.ceil(1.1 * n * (worst / GROWTH_RSE) ** 2), cap) if math.isfinite(worst) else cap
        want = _whole_batches(want, training_batch_size)
        if want < 1.25 * n:
            break
        logger.info("autoinit: a calibrated variance is known to +-%.1f%% on %d probe examples; "
                    "calibrating again on %d.", 100 * worst, n, want)
        batch_size = want
    worst = max(replay.rse.values(), default=0.0)
    rounds = 1
    unrecorded = record and not replay.record  # the prediction said more rounds; the report needs one recorded
    if unrecorded or (grow and worst > CALIBRATION_RSE and math.isfinite(worst)):
        # The probe is as large as memory allows: accumulate precision over fresh probes instead.
        wanted = min(rounds_allowed, math.ceil((worst / GROWTH_RSE) ** 2)) if math.isfinite(worst) else rounds_allowed
        wanted = max(wanted, 2) if unrecorded else wanted
        first = replay
        for k in range(2, wanted + 1):
            inputs, _ = replay_inputs(fn, data, batch_size, _round_seed(seed, k), input_moments)
            replay = SignalReplay(fn, training=training, calibrate=True, targets=targets,
                                  signal_variance=signal_variance, only=None if only is None else set(only),
                                  record=record and k == wanted, prior=replay.factors, values=values,
                                  moving_statistics=moving_statistics, step=1.0 / k,
                                  statistics_batch=training_batch_size, rng_seed=_round_seed(seed, k))
            replay.run(inputs)
            del inputs
            rounds = k
        replay.batch = first.batch
        replay.rse = {name: r / math.sqrt(rounds) for name, r in replay.rse.items()}
        logger.info("autoinit: calibrated over %d probes of %d examples.", rounds, replay.batch)
    replay.rounds = rounds
    warn_imprecise(replay, source, grow, limited=max_rounds is not None and max_rounds < MAX_ROUNDS)
    return replay, source


def _round_seed(seed, k) -> int:
    """The seed of round `k` (k >= 2: its probe; every round: its random layers' masks), fixed by wrap's seed
    (None counts as 0), another for each round."""
    return (0 if seed is None else int(seed)) * 1009 + k


def _predicted_rse(energy_spread, n) -> float:
    """The relative standard error of a variance over `n` examples whose energies have the predicted squared
    coefficient of variation `energy_spread` (`calibration_replay`): sqrt(spread / n); 0 where none is
    predicted."""
    if not energy_spread or energy_spread <= 0.0 or not n:
        return 0.0
    return math.sqrt(energy_spread / n)


def _whole_batches(n, training_batch_size):
    """`n` cut down to whole training batches (when more than one): batch-statistics layers then normalize every
    chunk over as many examples as training will (a shorter last chunk would have noisier statistics)."""
    if training_batch_size and n > training_batch_size:
        n -= n % int(training_batch_size)
    return n


def warn_imprecise(replay, source, grew, limited=False):
    name, rse = max(replay.rse.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if name is None or not rse > CALIBRATION_RSE:
        return
    n = replay.batch
    rounds = getattr(replay, "rounds", 1)
    need = math.ceil(n * rounds * (rse / CALIBRATION_RSE) ** 2) if math.isfinite(rse) else None
    where = ("probe" if source == "probe" else "data sample") if rounds == 1 else f"{rounds} probes"
    limit = " (the automatic probe stops growing there to bound memory)" if grew else ""
    spread = rse * math.sqrt(n * rounds)  # std / mean of the examples' energies at that layer
    if need is None:
        advice = "Use more examples"
    elif limited:  # wrap's default bounds its cost; calibrate="probe" refines further
        advice = (f"wrap(..., calibrate=\"probe\") refines over up to {MAX_ROUNDS} probes of {n} examples "
                  f"(+-{100 * rse * math.sqrt(rounds / MAX_ROUNDS):.1f}%); for +-{100 * CALIBRATION_RSE:.0f}%")
        more = math.ceil(need / max(n, 1))
        advice += f" set autoinit_tf.calibration.MAX_ROUNDS = {more} as well"
    elif grew:  # memory bounds the batch: more rounds, not a bigger batch, is the remedy
        more = math.ceil(need / max(n, 1))
        advice = (f"Set autoinit_tf.calibration.MAX_ROUNDS = {more} (each round one replay on a fresh probe of "
                  f"{n} examples, about {more / max(rounds, 1):.0f}x this calibration's time)")
    else:
        advice = (f"Calibrate on about {need} examples (calibrate(..., batch_size={need})"
                  + (", or more real data" if source != "probe" else "") + ")")
    warnings.warn(
        f"Calibration fixes the variance of '{name}' only to +-{100 * rse:.1f}% (one standard error of a "
        f"variance estimated on the {where} of {n} examples{limit}; the examples' energies at that layer vary "
        f"by {spread:.2g}x their mean: a batch of 64 examples lands +-{100 * spread / 8:.0f}% from their mean), "
        f"so another batch may land further from the target. "
        f"{advice}" + ("." if limited else f" for +-{100 * CALIBRATION_RSE:.0f}%."),
        CalibrationWarning,
        stacklevel=4,
    )


