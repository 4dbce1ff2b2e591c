"""`autoinit-tf report MODEL`: the predicted per-layer signal of a stored model beside the signal measured
with its current (stored) weights, on a Gaussian probe or on ``--data``."""

from __future__ import annotations

import sys
import warnings

import click

from .convert import check_finite_options, common_model_options, echo_warnings, fail, load_data, resolve_verbosity, stage_progress


@click.command("report")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@common_model_options
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A .npy/.npz batch of real inputs to measure on (default: a Gaussian probe).")
@click.option("--input-mean", type=float, default=None, help="Mean of the probe/predicted inputs (default 0).")
@click.option("--input-var", type=float, default=None, help="Variance of the probe/predicted inputs (default 1).")
@click.option("--seed", type=int, default=None, help="Seed of the analytic pass and the probe.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Examples measured.")
@click.option("--inference", is_flag=True, help="Measure in inference mode (BatchNormalization moving stats).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG plot of predicted and measured variance/mean per layer (needs matplotlib).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace existing --plot/--json files.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print the table.")
@click.option("-v", "--verbose", count=True, help="Tracebacks on errors.")
def command(model_path, input_format, custom_objects, allow_lambda, data_path, input_mean, input_var, seed,
            batch_size, inference, plot_path, json_path, overwrite, quiet, verbose):
    """Predicted vs measured per-layer signal of a stored model (with its stored weights)."""
    verbose = resolve_verbosity(verbose)
    if data_path is not None and (input_mean is not None or input_var is not None):
        raise click.UsageError("Pass either --data or --input-mean/--input-var, not both.")
    check_finite_options(input_mean=input_mean, input_var=input_var)
    if batch_size <= 0:
        raise click.BadParameter("must be positive.", param_hint="--batch-size")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _report(model_path, input_format, custom_objects, allow_lambda, data_path, input_mean, input_var,
                        seed, batch_size, inference, plot_path, json_path, overwrite, quiet)
            finally:
                echo_warnings(caught, verbose)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        fail(exc, verbose)


def _report(model_path, input_format, custom_objects, allow_lambda, data_path, input_mean, input_var, seed,
            batch_size, inference, plot_path, json_path, overwrite, quiet):
    from autoinit_tf import formats

    for path, what in ((plot_path, "plot"), (json_path, "JSON report")):
        if path:
            formats.check_writable(path, overwrite=overwrite, what=what)
    try:
        from autoinit_tf import compare
    except ImportError as exc:  # pragma: no cover - depends on the measurement module being present
        raise formats.ConversionError(
            f"autoinit-tf report needs autoinit_tf.measure.compare, which is not available ({exc})."
        ) from exc
    with stage_progress(["load", "walk", "measure"], enabled=not quiet) as progress:
        progress("load")
        objs = formats.load_custom_objects(custom_objects)
        loaded = formats.load(model_path, input_format=input_format, custom_objects=objs, allow_lambda=allow_lambda)
        if loaded.has_weights:
            loaded.apply_stored_weights()
        model = loaded.model
        x = load_data(data_path, model) if data_path else None
        moments = None
        if x is None and (input_mean is not None or input_var is not None):
            moments = (input_mean or 0.0, 1.0 if input_var is None else input_var)
        progress("walk")
        report = compare(model, x, training=not inference, batch_size=batch_size, seed=seed, input_moments=moments)
        progress("measure")
    if not quiet:
        source = "stored weights" if loaded.has_weights else "default initialization (the input holds no weights)"
        click.echo(f"{model_path} ({loaded.format}): predicted (AutoInit) vs measured with the {source}, on "
                   f"{'--data' if x is not None else 'a Gaussian probe'}")
        click.echo(report.table(color=None if sys.stdout.isatty() else False))
        errs = report.log_errors(weighted_only=False)
        if errs:
            worst = max(errs, key=lambda e: e[1])
            click.echo(f"largest |log(predicted var / measured var)|: {worst[1]:.3f} at {worst[0]}")
    if json_path:
        report.to_json(json_path)
        if not quiet:
            click.echo(f"wrote {json_path}")
    if plot_path:
        if not hasattr(report, "plot"):
            raise formats.ConversionError("--plot needs SignalReport.plot (the measurement module), not available.")
        report.plot(plot_path)
        if not quiet:
            click.echo(f"wrote {plot_path}")
