"""`autoinit-tf prune`: network slimming's channel surgery on a stored model (same file safety as `convert`)."""

from __future__ import annotations

import math
import time

import click

from autoinit_tf_cli.convert import default_output, load_trained, refuse_input_paths, resolve_verbosity, run_guarded


@click.command("prune")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=True, file_okay=True))
@click.argument("output_path", metavar="OUTPUT", required=False)
@click.option("--ratio", type=float, default=None, help="Fraction of the prunable channels to remove (global).")
@click.option("--threshold", type=float, default=None, help="Remove channels whose BN |gamma| is below this.")
@click.option("--min-channels", type=int, default=1, show_default=True, help="Never keep fewer channels per layer.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", count=True, help="Per-layer channels and tracebacks.")
def command(input_path, output_path, ratio, threshold, min_channels, overwrite, quiet, verbose):
    """Remove the channels of least BatchNorm |gamma| (network slimming) and save a smaller .keras model.

    Train with sparsity first (autoinit_tf.slimming.add_bn_sparsity), prune, then fine-tune. INPUT is any
    format `convert` reads; OUTPUT defaults to NAME.slim.keras next to it. The input is never modified.
    """
    verbose = resolve_verbosity(verbose)
    if (ratio is None) == (threshold is None):
        raise click.UsageError("Give exactly one of --ratio or --threshold.")
    if ratio is not None and not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise click.BadParameter("must be in [0, 1).", param_hint="--ratio")
    if min_channels < 1:
        raise click.BadParameter("must be >= 1.", param_hint="--min-channels")
    if output_path is not None and not output_path.endswith(".keras"):
        raise click.BadParameter(f"'{output_path}' must end in .keras.", param_hint="OUTPUT")
    output_path = output_path or default_output(input_path, suffix="slim")
    refuse_input_paths(input_path, OUTPUT=output_path)
    run_guarded(lambda: _prune(input_path, output_path, ratio, threshold, min_channels, overwrite, quiet, verbose),
                verbose)


def _prune(input_path, output_path, ratio, threshold, min_channels, overwrite, quiet, verbose):
    from autoinit_tf import formats
    from autoinit_tf.slimming import prune_channels

    t0 = time.perf_counter()
    formats.check_writable(output_path, overwrite=overwrite)
    loaded = load_trained(input_path)
    new, report = prune_channels(loaded.model, ratio=ratio, threshold=threshold, min_channels=min_channels)
    if getattr(loaded.model, "compiled", False):
        try:
            new.compile_from_config(loaded.model.get_compile_config())
        except Exception:  # noqa: BLE001 - saved uncompiled; the user compiles for fine-tuning
            pass
    formats.save_keras(new, output_path, overwrite=overwrite)
    if quiet:
        return
    click.echo(f"pruned {input_path} ({loaded.format})")
    click.echo(f"  {report}")
    if verbose:
        for layer, (kept, total) in report.channels.items():
            click.echo(f"    {layer}: {kept}/{total} channels")
    click.echo(f"  output: {output_path}")
    click.echo(f"  time:   {time.perf_counter() - t0:.1f}s")
