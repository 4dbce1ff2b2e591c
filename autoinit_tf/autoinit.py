"""The public AutoInit API: `analyze` (dry run), `wrap` (initialize in place) and `compare`
(predicted beside measured). The analytic pass itself is `autoinit_tf.engine`; calibration and
measurement are `autoinit_tf.measure`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

from autoinit_tf import distribute
from autoinit_tf.calibration import AUTO_ROUNDS, TRAINING_BATCH_SIZE
from autoinit_tf.engine import FallbackRuleWarning, PassOptions, run_analytic_pass
from autoinit_tf.measure import calibrated_values, measure
from autoinit_tf.moments import Moments
from autoinit_tf.report import SignalReport
from autoinit_tf.rewrite import rewrite

logger = logging.getLogger("autoinit_tf")

__all__ = ["wrap", "analyze", "compare", "FallbackRuleWarning"]


def analyze(
    model,
    *,
    input_moments=None,
    data=None,
    signal_variance=1.0,
    distribution="truncated_normal",
    seed=None,
    strict=False,
    rules=None,
    include_frozen=False,
    progress=None,
    bn_gamma=None,
) -> SignalReport:
    """Predict the mean and variance at every node as `wrap` would leave them; change nothing.

    Returns a `SignalReport` (one row per call of each layer or op, in topological order).
    """
    options = PassOptions(input_moments, data, signal_variance, distribution, seed, strict, rules, include_frozen,
                          progress, bn_gamma)
    engine = run_analytic_pass(model, options, keep_drawn=False)
    report = SignalReport(model.name, engine.rows, assigned=[])
    report.amplification = engine.amplification.worst[:2]
    report.untouched = engine.untouched()
    return report


def wrap(
    model,
    *,
    input_moments=None,
    data=None,
    signal_variance=1.0,
    distribution="truncated_normal",
    seed=None,
    strict=False,
    rules=None,
    include_frozen=False,
    swaps=None,
    calibrate="auto",
    return_report=False,
    progress=None,
    bn_gamma=None,
    only=None,
    training_batch_size=TRAINING_BATCH_SIZE,
):
    """Re-initialize every weight tensor of `model` in place so the signal keeps its scale.

    Args:
        model: a built `keras.Model` (Functional, built Sequential, or a subclassed model whose
            `call` can be traced symbolically).
        input_moments: ``(mean, var)`` of the inputs, one pair for all inputs or one per input
            (list, or dict keyed by input name). Default: what the model's preprocessing declares
            (`declared.input_moments`: a Normalization's adapted statistics, 8-bit pixels after a
            Rescaling by 1/255 or 1/127.5), else ``(0, 1)``.
        data: a sample of real inputs (array, dict of arrays, tf.data dataset or iterable of batches)
            to compute the input moments from instead.
        signal_variance: the target variance of every weighted layer's pre-activation output.
        distribution: ``truncated_normal`` | ``untruncated_normal`` | ``uniform`` | ``orthogonal``.
        seed: an int makes the weights depend only on the seed and each layer's place in the graph (the
            calibration's probes and the masks of dropout and other random layers in its replay too, whatever
            seed those layers were given: the same weights in every process).
        strict: raise `UnsupportedLayerError` for a layer without a rule instead of warning.
        rules: ``{LayerClass: rule}`` overriding the registry for this call.
        include_frozen: also re-initialize layers with ``trainable=False``.
        swaps: swap recipes applied first (a new model is built; see `autoinit_tf.rewrite`).
        calibrate: ``"auto"`` (default): after the analytic pass, rescale on a probe exactly the weighted
            layers whose prediction the pass knows is not exact (a layer without a rule measured on a
            probe, an attention mask, a probe-estimated op upstream, amplification above
            `stability.AMPLIFICATION_LIMIT`); models the pass handles exactly pay nothing. The report's
            ``auto_calibrated`` says which layers and why. ``None``: the pure analytic pass.
            ``"probe"`` or a data sample: rescale every weighted layer so its realized output variance
            hits the target exactly.
        return_report: also return the `SignalReport`.
        progress: optional ``callable(done, total, node_name)`` called after every node of the walk
            (the CLI draws its progress bar with it).
        bn_gamma: the revisited BatchNorm initialization (Davis & Frank, ECCV 2022): every
            BatchNormalization (and DAR-BN) gets gamma = `bn_gamma` (the paper: 0.1) and beta = 0, and the
            propagation uses that gamma, so the layers after a BN see its smaller output. Pair it with
            `autoinit_tf.bn_optimizer` (gamma's learning rate / 100). None keeps gamma and beta.
        only: layer names or glob patterns (a nested layer as ``outer/inner``): initialize only these
            layers (a new head on a pretrained backbone), every other variable stays bit-identical. The
            layers are fitted on a replay of the real model: on `data` when given (the moments the
            pretrained backbone really produces; recommended), else on a Gaussian probe (with a warning).
        training_batch_size: the batch size you will train with (default 32, Keras fit's). Where
            `calibrate` runs, BatchNormalization's batch statistics are taken over consecutive chunks of
            this many probe examples, as training takes them: behind squeeze-and-excitation gates a
            layer's variance depends on the batch size BN normalizes over. None: the whole probe at once.

    BatchNormalization (and DAR-BN) moving statistics are set to the statistics the initialized network
    gives its input (the analytic per-channel prediction; with `calibrate`, those measured on the
    calibration batch, averaged over its chunks of `training_batch_size`), so inference right after
    `wrap` normalizes as training mode does.

    Returns:
        The same model object (or the rewritten model when `swaps` are given), with new weights.
    """
    t0 = time.perf_counter()
    distribute.check_assign_context()  # tf.distribute: assign from cross-replica context only
    seed = distribute.consensus_seed(seed, model)  # multi-worker: every worker draws the same weights
    if swaps:
        model = rewrite(model, swaps=swaps)
    allowed, only_paths = (None, None) if only is None else _layers_selected(model, only)
    if only is not None and isinstance(calibrate, str) and calibrate == "auto":
        # The pass reads the pretrained weights but its independence assumptions do not hold for them:
        # the new layers are fitted on the real model's response (data when given).
        if data is None:
            warnings.warn(f"wrap(only={only!r}) without data=: the new layers are fitted to the model's response "
                          "to a Gaussian probe; pass data=<a sample of real inputs> to fit them to the features "
                          "the pretrained layers really produce.", FallbackRuleWarning, stacklevel=2)
        calibrate = "probe" if data is None else data
    # Calibration is the remedy for an unstable prediction: no warning when it runs.
    options = PassOptions(input_moments, data, signal_variance, distribution, seed, strict, rules, include_frozen,
                          progress, bn_gamma, None if allowed is None else frozenset(allowed))
    auto = isinstance(calibrate, str) and calibrate == "auto"
    engine = run_analytic_pass(model, options, warn_unstable=calibrate is None)
    # Everything is computed before anything is assigned: the analytic arrays, then (with
    # `calibrate`) the calibrated kernels on a replay that reads the drawn arrays in place of the
    # variables. A failure anywhere leaves every variable bit-identical.
    report = SignalReport(model.name, engine.rows, assigned=sorted(engine.pending))
    report.amplification = engine.amplification.worst[:2]
    report.untouched = engine.untouched()
    report.auto_calibrated = dict(engine.inexact) if auto else {}
    if auto and not engine.inexact:
        calibrate = None  # exact: nothing to correct, no replay
    if calibrate is not None:
        # With data=..., the probe takes the data's moments.
        resolved = input_moments if data is None else [(m.mean, m.var) for m in engine.input_moments]
        values = {id(variable): array for variable, array in engine.pending.values()}
        if only_paths is not None:  # the selected layers' rows only: the others keep their weights
            only = {r.name for r in report.rows if r.weighted and _row_under(r.name, only_paths)}
        else:
            only = set(engine.inexact) if auto else {r.name for r in report.rows if r.weighted}
        report, values = calibrated_values(
            model, "probe" if auto else calibrate, report=report if return_report else None, only=only, values=values,
            record=return_report, input_moments=resolved, seed=seed, signal_variance=signal_variance,
            targets=report.targets(),
            moving_statistics=True, max_rounds=AUTO_ROUNDS if auto else None,
            training_batch_size=training_batch_size, energy_spread=_energy_spread(report.rows, only),
        )
        engine.replace_pending(values)
        del values
    assigned = engine.apply()
    n_assigned = len(assigned)
    logger.info(
        "autoinit: %d weight tensors re-initialized in '%s' (%.2fs).",
        n_assigned,
        model.name,
        time.perf_counter() - t0,
    )
    return (model, report) if return_report else model


def _energy_spread(rows, names):
    """The largest predicted squared coefficient of variation of the examples' energies, expm1 of the
    per-example log-scale variance (`Moments.scale`), over the rows `names` (0 where none is tracked)."""
    lams = [float(r.outputs[0].scale) for r in rows if r.name in names and r.outputs
            and isinstance(r.outputs[0], Moments) and r.outputs[0].scale is not None]
    return math.expm1(max(lams)) if lams else 0.0


def _row_under(name, paths) -> bool:
    """Whether report row `name` (``outer/inner``, ``#k`` for a repeated call) belongs to one of `paths`."""
    base = name.split("#", 1)[0]
    return any(base == p or base.startswith(p + "/") for p in paths)


def _layers_selected(model, only):
    """``(variable paths, layer paths)`` of the layers `only` names (names or globs; nested ``outer/inner``)."""
    from autoinit_tf import formats

    patterns = [only] if isinstance(only, str) else list(only)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"only must be a layer name, a glob pattern or a list of them, got {only!r}.")
    matched = formats.layers_matching(model, patterns)
    if not matched:
        names = ", ".join(path for path, _ in formats.model_layers(model))
        raise ValueError(f"only={patterns} matched no layer. The model's layers: {names}.")
    return {variable.path for _, layer in matched for variable in layer.weights}, [path for path, _ in matched]


def compare(model, x=None, *, training=True, batch_size=256, probe_seed=None, input_moments=None,
            **analyze_kwargs):
    """The analytic report (`autoinit_tf.analyze`) with the measured moments beside the predicted ones.

    The predictions are those of the analytic pass (what `wrap` would leave, drawn with
    ``analyze_kwargs.get("seed")``); the measurements use the model's current weights. So call it on a
    model wrapped with the same ``seed`` (or on a fresh model to see how far its default initialization
    is from the AutoInit signal). When `x` is given and neither ``input_moments`` nor ``data`` is, the
    analytic pass takes its input moments from `x`; otherwise the probe (seed `probe_seed`) and the
    analytic pass share ``input_moments``. Other keyword arguments go to `analyze`.
    """
    if x is not None and input_moments is None and "data" not in analyze_kwargs:
        analyze_kwargs["data"] = x
    elif input_moments is not None:
        analyze_kwargs["input_moments"] = input_moments
    predicted = analyze(model, **analyze_kwargs)
    measured = measure(model, x, training=training, batch_size=batch_size, seed=probe_seed,
                       input_moments=input_moments)
    return predicted.with_measurement(measured)
