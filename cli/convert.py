"""`autoinit-tf convert INPUT [OUTPUT]`: load a stored model, optionally swap layers, re-initialize it with
AutoInit and save it as a Keras 3 ``.keras`` file (atomically, never over an existing path without
``--overwrite``).

Exit codes: 0 success, 1 conversion error (a one-paragraph message; the traceback only with ``-v``),
2 usage error.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import warnings

import importlib

import click

# -- helpers shared with `autoinit-tf report` --------------------------------------------------------


class LibraryChoice(click.Choice):
    """A `click.Choice` whose choices are a tuple of the library (``"module:NAME"``), read when first
    needed: the CLI offers exactly what the library accepts, and `autoinit-tf --help` does not load Keras."""

    def __init__(self, ref, case_sensitive=True):
        self.ref = ref
        self._choices = None
        super().__init__((), case_sensitive=case_sensitive)

    @property
    def choices(self):
        if not self._choices:
            module, name = self.ref.split(":")
            self._choices = tuple(getattr(importlib.import_module(module), name))
        return self._choices

    @choices.setter
    def choices(self, value):
        self._choices = tuple(value) or None


def common_model_options(f):
    """--input-format, --custom-objects, --allow-lambda."""
    f = click.option("--allow-lambda", is_flag=True,
                     help="Allow Lambda layers (runs Python code stored in the file: only for trusted files).")(f)
    f = click.option("--custom-objects", multiple=True, metavar="MODULE[:NAME]",
                     help="Import this module for custom layer classes (repeatable).")(f)
    f = click.option("--input-format", type=LibraryChoice("autoinit_tf.formats:FORMATS"), default=None,
                     help="Force the input format (default: detected).")(f)
    return f


def resolve_verbosity(local):
    """The command's -v count, or the group's (`autoinit-tf -v convert ...`)."""
    ctx = click.get_current_context(silent=True)
    group = 0
    if ctx is not None and ctx.find_root() is not ctx:
        group = ctx.find_root().params.get("verbose", 0) or 0
    return max(local or 0, group)


#: autoinit-tf's own warnings, always shown (others only with -v), with what to do on the command line.
_OWN_WARNINGS = {
    "FallbackRuleWarning": "",
    "UnstableSignalWarning": " On the command line: autoinit-tf convert --calibrate probe.",
    "CalibrationWarning": "",
}


def echo_warnings(caught, verbose, skip=()):
    """Echo caught warnings as one `warning:` line each on standard error: autoinit-tf's own always
    (except the categories named in `skip`), any other only with -v."""
    for w in caught:
        name = w.category.__name__
        if name in skip:
            continue
        if name in _OWN_WARNINGS:
            click.echo(f"warning: {w.message}{_OWN_WARNINGS[name]}", err=True)
        elif verbose:
            click.echo(f"warning: {w.message}", err=True)


def fail(exc, verbose):
    """Echo a one-paragraph error (plus the traceback with -v) and exit with status 1."""
    if verbose:
        click.echo("".join(traceback.format_exception(exc)), err=True)
    msg = " ".join(str(exc).split()) or type(exc).__name__
    from autoinit_tf.formats import ConversionError

    if not isinstance(exc, ConversionError):
        msg = f"{type(exc).__name__}: {msg}"
        if not verbose:
            msg += " (run with -v for the traceback)"
    click.echo(f"Error: {msg}", err=True)
    sys.exit(1)


def load_data(path, model):
    """A .npy array, or a .npz: its single array, or a dict keyed by the model's input names."""
    import numpy as np

    from autoinit_tf.formats import ConversionError

    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"Cannot read --data '{path}': {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    keys = list(loaded.files)
    names = [getattr(t, "name", None) for t in getattr(model, "inputs", [])]
    if len(keys) == 1:
        return loaded[keys[0]]
    if names and all(n in keys for n in names):
        return {n: loaded[n] for n in names}
    raise ConversionError(
        f"--data '{path}' holds arrays {keys}; pass a single array or one per model input named {names}."
    )


class stage_progress:  # noqa: N801 - used like a function
    """A click progress bar over named stages (load, swap, walk, calibrate, save) on standard error."""

    def __init__(self, stages, enabled=True):
        self.stages = list(stages)
        self.enabled = enabled
        self.bar = None
        self.current = None

    def __enter__(self):
        if self.enabled:
            self.bar = click.progressbar(length=len(self.stages), label="autoinit-tf",
                                         item_show_func=lambda _: self.current, file=sys.stderr,
                                         show_eta=False)
            self.bar.__enter__()
        return self

    def __call__(self, stage):
        _io().ABORT.check()  # between stages: stop on a signal even if its exception was swallowed
        if self.bar is None:
            return
        if self.current is not None:
            self.bar.update(1)
        self.current = stage
        self.bar.update(0)

    def detail(self, text):
        """Show `text` beside the current stage (e.g. the node being walked)."""
        if self.bar is None:
            return
        stage = self.current.split(" ", 1)[0] if self.current else ""
        self.current = f"{stage} {text}"
        self.bar.update(0)

    def walk_callback(self):
        """A `progress=` callback for wrap/analyze that redraws about 100 times per walk."""

        def report(done, total, name):
            if done == total or done % max(total // 100, 1) == 0:
                self.detail(f"{done}/{total} {name}")

        return report

    def finish(self):
        if self.bar is not None:
            self.current = "done"
            self.bar.update(self.bar.length - self.bar.pos)
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __exit__(self, *exc):
        if self.bar is not None:
            if exc[0] is None:
                self.finish()
            else:
                self.bar.__exit__(*exc)
                self.bar = None
        return False


def _io():
    """autoinit_tf.io_utils, imported late (importing autoinit_tf loads Keras: `--help` stays fast)."""
    from autoinit_tf import io_utils

    return io_utils


def refuse_input_paths(input_path, **outputs):
    """Usage error when an output is the input, or inside it, once symbolic links are resolved."""
    for what, path in outputs.items():
        if path and _io().same_or_inside(path, input_path):
            raise click.UsageError(
                f"{what} '{path}' is the INPUT (or inside it), once symbolic links are resolved: the input is "
                "never modified; choose another path."
            )


def check_finite_options(**values):
    """Usage errors (exit 2) for a NaN/inf option or a non-positive variance, before anything loads."""
    import math

    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, got {value}.", param_hint=flag)
        if name != "input_mean" and not value > 0:
            raise click.BadParameter("must be positive.", param_hint=flag)


def run_guarded(work, verbose):
    """Run a command's `work()` with the signal handlers installed: SIGINT/SIGTERM exit 130/143 with nothing
    written, any other failure a one-paragraph message and exit 1."""
    _io().install_signal_handlers()
    try:
        work()
        _io().ABORT.check()  # a signal whose exception a library swallowed still fails the run
    except SystemExit:
        raise
    except (KeyboardInterrupt, _io().Interrupted) as exc:
        code = exc.exit_code if isinstance(exc, _io().Interrupted) else 130
        click.echo("Interrupted; nothing was written.", err=True)
        sys.exit(code)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-paragraph message, exit 1
        fail(exc, verbose)


def load_trained(input_path):
    """`formats.load` (which rebuilds the model with fresh weights) with the stored, trained weights put back
    in every layer: what commands that transform a trained model (prune, quantize) start from."""
    from autoinit_tf import formats

    loaded = formats.load(input_path)
    stored = loaded.stored_weights()
    for path, layer in formats.model_layers(loaded.model):
        if layer.weights and not hasattr(layer, "layers"):
            if path not in stored:
                raise formats.ConversionError(f"No stored weights were found for layer '{path}' in the input.")
            layer.set_weights(stored[path])
    return loaded


def default_output(input_path, suffix="autoinit", ext=".keras"):
    """``NAME.<suffix><ext>`` next to the input (for a directory: beside it)."""
    path = os.path.normpath(os.fspath(input_path))
    base = os.path.basename(path)
    for known in (".keras", ".h5", ".hdf5", ".json"):
        if base.lower().endswith(known):
            base = base[: -len(known)]
            break
    return os.path.join(os.path.dirname(os.path.abspath(path)), f"{base}.{suffix}{ext}")


@click.command("convert")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=True, file_okay=True))
@click.argument("output_path", metavar="[OUTPUT]", required=False, type=click.Path(dir_okay=False))
@common_model_options
@click.option("--swap", "swaps", multiple=True, metavar="RECIPE",
              help="Apply a swap recipe first (repeatable; see `autoinit-tf recipes`).")
@click.option("--input-mean", type=float, default=None, help="Mean of the model inputs (default 0).")
@click.option("--input-var", type=float, default=None, help="Variance of the model inputs (default 1).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A .npy/.npz sample of real inputs: input moments from data (and --calibrate data).")
@click.option("--calibrate", type=click.Choice(["auto", "none", "probe", "data"]), default="auto", show_default=True,
              help="auto: rescale on a probe only the layers the analytic pass knows it cannot predict exactly; "
                   "none: the pure analytic pass; probe/data: rescale every layer so its realized variance hits "
                   "the target.")
@click.option("--training-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="The batch size you will train with: calibration takes BatchNormalization's statistics over "
                   "batches of this many examples.")
@click.option("--seed", type=int, default=None, help="Seed: weights depend only on (seed, variable path).")
@click.option("--signal-variance", type=float, default=1.0, show_default=True,
              help="Target variance of every weighted layer's pre-activation output.")
@click.option("--distribution", type=LibraryChoice("autoinit_tf.distributions:DISTRIBUTIONS"), default="truncated_normal",
              show_default=True, help="Weight distribution.")
@click.option("--strict", is_flag=True, help="Fail on layers without a propagation rule (no fallback).")
@click.option("--bn-gamma", type=float, default=None, metavar="C",
              help="Revisited BatchNorm init (Davis & Frank): every BN gamma = C (the paper: 0.1), beta = 0; "
                   "train with autoinit_tf.bn_optimizer.")
@click.option("--include-frozen", is_flag=True, help="Also re-initialize layers with trainable=False.")
@click.option("--keep-weights-of", "keep", multiple=True, metavar="LAYER_GLOB",
              help="Keep the stored (pretrained) weights of layers matching this glob (repeatable).")
@click.option("--export-saved-model", "export_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a serving SavedModel (model.export) to this directory.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the per-layer signal report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG plot of the predicted per-layer signal (needs matplotlib).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the predicted per-layer table; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files/directories.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", count=True, help="Print the per-layer table, fix-ups and tracebacks.")
def command(input_path, output_path, input_format, custom_objects, allow_lambda, swaps, input_mean, input_var,
            data_path, calibrate, training_batch_size, seed, signal_variance, distribution, strict, bn_gamma,
            include_frozen, keep, export_dir, report_path, plot_path, dry_run, overwrite, quiet, verbose):
    """Re-initialize a stored model with AutoInit and save it as .keras.

    INPUT is a .keras file, a legacy .h5 file (Keras 2 or 3), a Keras-2 SavedModel directory or a JSON
    model config (auto-detected; --input-format forces one). OUTPUT defaults to NAME.autoinit.keras next
    to INPUT.
    """
    verbose = resolve_verbosity(verbose)
    # -- usage checks (exit 2) --
    if data_path is not None and (input_mean is not None or input_var is not None):
        raise click.UsageError("Pass either --data or --input-mean/--input-var, not both.")
    if calibrate == "data" and data_path is None:
        raise click.UsageError("--calibrate data needs --data FILE.npy|.npz.")
    check_finite_options(input_mean=input_mean, input_var=input_var, signal_variance=signal_variance)
    if bn_gamma is not None and not (math.isfinite(bn_gamma) and bn_gamma > 0):
        raise click.BadParameter(f"must be a positive number, got {bn_gamma}.", param_hint="--bn-gamma")
    if output_path is not None and not output_path.endswith(".keras"):
        raise click.BadParameter(f"'{output_path}' must end in .keras.", param_hint="OUTPUT")
    if data_path is not None and not data_path.lower().endswith((".npy", ".npz")):
        raise click.BadParameter("must be a .npy or .npz file.", param_hint="--data")
    output_path = output_path or default_output(input_path)
    refuse_input_paths(input_path, OUTPUT=output_path, **{"--export-saved-model": export_dir, "--report": report_path,
                                                         "--plot": plot_path})

    arguments = dict(locals())
    run_guarded(lambda: _convert(**arguments), verbose)


def _convert(*, input_path, output_path, input_format, custom_objects, allow_lambda, swaps, input_mean,
             input_var, data_path, calibrate, training_batch_size, seed, signal_variance, distribution, strict,
             bn_gamma, include_frozen, keep, export_dir, report_path, plot_path, dry_run, overwrite, quiet, verbose):
    """The stages: refuse unwritable outputs, load, swap, initialize, then print (dry run) or publish."""
    from autoinit_tf import formats

    t0 = time.perf_counter()
    echo = (lambda *a, **k: None) if quiet else click.echo
    if not dry_run:
        _check_outputs(output_path, export_dir, report_path, plot_path, overwrite)

    stages = (["load"] + (["swap"] if swaps else []) + ["walk"]
              + (["calibrate"] if calibrate in ("probe", "data") else []) + ([] if dry_run else ["save"]))
    with stage_progress(stages, enabled=not quiet) as progress:
        progress("load")
        objs = formats.load_custom_objects(custom_objects)
        loaded = formats.load(input_path, input_format=input_format, custom_objects=objs, allow_lambda=allow_lambda)
        model = loaded.model
        data = load_data(data_path, model) if data_path else None
        kept, snapshot = _select_kept(loaded, keep)
        plan = None
        if swaps:
            progress("swap")
            model, plan = _swap(model, swaps, echo)
        input_moments = None
        if data is None:
            input_moments = (0.0 if input_mean is None else input_mean, 1.0 if input_var is None else input_var)
        options = dict(input_moments=input_moments, data=data, signal_variance=signal_variance,
                       distribution=distribution, seed=seed, strict=strict, include_frozen=include_frozen,
                       progress=progress.walk_callback(), bn_gamma=bn_gamma)
        model, report = _initialize(model, kept, options, dry_run=dry_run, calibrate=calibrate, progress=progress,
                                    verbose=verbose, training_batch_size=training_batch_size)
        if dry_run:
            progress.finish()
            _print_dry_run(echo, input_path, loaded, plan, kept, report, t0)
            return
        _restore_kept_and_compile(model, loaded, kept, snapshot, plan, echo)
        progress("save")
        written = _publish(model, report, output_path, export_dir, report_path, plot_path, overwrite)
    _print_summary(echo, verbose, input_path, loaded, plan, kept, report, written, t0, bn_gamma)


def _check_outputs(output_path, export_dir, report_path, plot_path, overwrite):
    """Refuse early: nothing is computed if an output cannot be written."""
    from autoinit_tf import formats

    formats.check_writable(output_path, overwrite=overwrite)
    if export_dir:
        formats.check_writable(export_dir, overwrite=overwrite, what="SavedModel directory")
    for extra, what in ((report_path, "report"), (plot_path, "plot")):
        if extra:
            formats.check_writable(extra, overwrite=overwrite, what=what)
    if plot_path:
        _check_matplotlib()


def _swap(model, swaps, echo):
    from autoinit_tf.rewrite import rewrite

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, plan = rewrite(model, swaps, return_plan=True)
    for w in caught:
        echo(f"warning: {w.message}", err=True)
    return model, plan


def _initialize(model, kept, options, *, dry_run, calibrate, progress, verbose, training_batch_size):
    """analyze (dry run) or wrap, then calibrate; kept layers frozen meanwhile. Returns (model, report)."""
    import autoinit_tf

    frozen_before = {id(layer): layer.trainable for _, layer in kept}
    for _, layer in kept:
        layer.trainable = False
    try:
        progress("walk")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dry_run:
                report = autoinit_tf.analyze(model, **options)
            else:
                model, report = autoinit_tf.wrap(model, return_report=True,
                                                 calibrate="auto" if calibrate == "auto" else None,
                                                 training_batch_size=training_batch_size, **options)
                if calibrate in ("probe", "data"):
                    progress("calibrate")
                    target = "probe" if calibrate == "probe" else options["data"]
                    report = autoinit_tf.calibrate(model, target, report=report, input_moments=options["input_moments"],
                                                   seed=options["seed"], signal_variance=options["signal_variance"],
                                                   training_batch_size=training_batch_size)
    finally:
        for _, layer in kept:
            layer.trainable = frozen_before[id(layer)]
    # With --calibrate the instability warning's remedy is already applied.
    echo_warnings(caught, verbose, skip=("UnstableSignalWarning",) if calibrate != "none" else ())
    return model, report


def _print_dry_run(echo, input_path, loaded, plan, kept, report, t0):
    echo(f"dry run: {input_path} ({loaded.format}{', Keras 2 fix-ups' if loaded.keras2 else ''})")
    for line in loaded.fixups:
        echo(f"  fix-up: {line}")
    if plan is not None:
        echo(str(plan))
    if kept:
        echo("kept (pretrained weights): " + ", ".join(p for p, _ in kept))
    echo(report.table(color=False))
    echo(f"nothing written (--dry-run); {time.perf_counter() - t0:.1f}s")


def _restore_kept_and_compile(model, loaded, kept, snapshot, plan, echo):
    # Kept layers get their stored weights back (also when --include-frozen re-initialized them).
    for path, layer in kept:
        layer.set_weights(snapshot[path])
    if loaded.compile_config and plan is None:
        try:
            model.compile_from_config(loaded.compile_config)
        except Exception as exc:  # noqa: BLE001 - the compiled state is a convenience
            echo(f"warning: the stored compile configuration could not be restored ({exc}).", err=True)


def _publish(model, report, output_path, export_dir, report_path, plot_path, overwrite):
    """Write every output, all or nothing (also on SIGINT / SIGTERM); returns the paths written."""
    from autoinit_tf import formats

    formats.save_keras(model, output_path, overwrite=overwrite)
    written = [output_path]
    try:
        if export_dir:
            formats.export_saved_model(model, export_dir, overwrite=overwrite)
            written.append(export_dir)
        if report_path:
            report.to_json(report_path)
            written.append(report_path)
        if plot_path:
            report.plot(plot_path)
            written.append(plot_path)
    except BaseException:
        for p in written:
            _remove(p)
        raise
    if _io().ABORT.signum is not None:  # interrupted, the exception swallowed: undo
        for p in written:
            _remove(p)
        _io().ABORT.check()
    return written


def _print_summary(echo, verbose, input_path, loaded, plan, kept, report, written, t0, bn_gamma=None):
    if verbose:
        for line in loaded.fixups:
            echo(f"fix-up: {line}")
        echo(report.table(color=None))
    reinit = sorted({p.rsplit("/", 1)[0] for p in report.assigned})
    fallbacks = sorted({f"{r.name} ({r.type})" for r in report.fallbacks})
    echo(f"converted {input_path} ({loaded.format}{', Keras 2 fix-ups applied' if loaded.fixups else ''})")
    echo(f"  layers re-initialized: {len(reinit)}")
    echo(f"  layers swapped:        {len(plan.entries) if plan is not None else 0}")
    echo(f"  layers kept:           {len(kept)}" + (f" ({', '.join(p for p, _ in kept)})" if kept else ""))
    echo(f"  fallback rules used:   {len(fallbacks)}" + (f" ({', '.join(fallbacks)})" if fallbacks else ""))
    if report.calibration:
        echo(f"  calibrated layers:     {len(report.calibration)} (on the {report.calibrated_on})")
    if getattr(report, "auto_calibrated", None):
        echo(f"  not exact analytically: {len(report.auto_calibrated)} layers, calibrated on a probe "
             "(--calibrate none keeps the pure analytic pass)")
        for name, why in list(report.auto_calibrated.items())[:5] if verbose else []:
            echo(f"    {name}: {why}")
    untouched = {p: why for p, why in (getattr(report, "untouched", None) or {}).items()
                 if not why.startswith("a bias")}
    if untouched:
        echo(f"  left as they were:     {len(untouched)} weight tensors (the report's 'untouched' says why)")
        for path, why in list(untouched.items())[:5] if verbose else []:
            echo(f"    {path}: {why}")
    if bn_gamma is not None:
        n_gamma = sum(p.endswith("/gamma") for p in report.assigned)
        echo(f"  BatchNorm gamma:       {bn_gamma:g}, beta 0 in {n_gamma} layers (Davis & Frank); train with "
             "autoinit_tf.bn_optimizer (gamma's learning rate / 100)")
    echo(f"  output:                {written[0]}")
    for extra in written[1:]:
        echo(f"  also wrote:            {extra}")
    echo(f"  time:                  {time.perf_counter() - t0:.1f}s")


def _select_kept(loaded, keep):
    """``([(path, layer)], {path: arrays})`` of the leaf layers whose stored weights are kept."""
    if not keep:
        return [], {}
    import keras

    from autoinit_tf import formats

    matched = formats.layers_matching(loaded.model, keep)
    if not matched:
        names = ", ".join(p for p, _ in formats.model_layers(loaded.model))
        raise formats.ConversionError(
            f"--keep-weights-of {' '.join(keep)} matched no layer. The model's layers: {names}."
        )
    stored = loaded.stored_weights()
    leaves, seen = [], set()
    for path, layer in matched:
        if isinstance(layer, keras.Model):
            sub = [(f"{path}/{p}", lyr) for p, lyr in formats.model_layers(layer)]
        else:
            sub = [(path, layer)]
        for p, lyr in sub:
            if isinstance(lyr, keras.Model) or not lyr.weights or id(lyr) in seen:
                continue
            seen.add(id(lyr))
            leaves.append((p, lyr))
    snapshot = {}
    for path, layer in leaves:
        if path not in stored:
            raise formats.ConversionError(
                f"--keep-weights-of: no stored weights were found for layer '{path}' in the input."
            )
        snapshot[path] = stored[path]
        layer.set_weights(stored[path])
    return leaves, snapshot


def _remove(path):
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def _check_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from autoinit_tf.formats import ConversionError

        raise ConversionError("--plot needs matplotlib: pip install 'autoinit-tf[plot]'.") from None
