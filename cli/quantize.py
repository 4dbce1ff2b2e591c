"""`autoinit-tf quantize`: a stored model to a TFLite / LiteRT int8 model with a hardware preset's grids
(post-training: prepare + calibrate + convert), or a trained QAT model (`--qat`) converted as it is. Same file
safety as `convert`: the input is never modified, the output is published atomically and never overwritten
unless asked."""

from __future__ import annotations

import time

import click

from autoinit_tf_cli.convert import (LibraryChoice, default_output, load_trained, refuse_input_paths, resolve_verbosity,
                                     run_guarded)


def _load_data(path):
    import numpy as np

    data = np.load(path, allow_pickle=False)
    if hasattr(data, "files"):
        key = "x" if "x" in data.files else data.files[0]
        return data[key]
    return data


@click.command("quantize")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=True, file_okay=True))
@click.argument("output_path", metavar="OUTPUT", required=False)
@click.option("--preset", type=LibraryChoice("autoinit_tf.quantize.presets:PRESETS"),
              default="tensorrt", show_default=True, help="Hardware setting (MQBench): granularity, symmetry, "
              "scale form, graph level, BN folding.")
@click.option("--bits", type=click.IntRange(2, 8), default=8, show_default=True)
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration inputs (.npy, or .npz with 'x'); the Gaussian probe otherwise (with a warning).")
@click.option("--batches", type=click.IntRange(1), default=8, show_default=True, help="Calibration batches.")
@click.option("--qat", is_flag=True, help="INPUT is a model from autoinit_tf.quantize.prepare (trained): convert "
              "it with its own grids.")
@click.option("--int8-io", is_flag=True, help="int8 model inputs and outputs (default: float, quantized inside).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", count=True, help="Tracebacks.")
def command(input_path, output_path, preset, bits, data_path, batches, qat, int8_io, overwrite, quiet, verbose):
    """Write an int8 TFLite model of INPUT (default OUTPUT: NAME.int8.tflite next to it).

    Post-training: the preset's fake quantization is inserted (min/max observers), calibrated on --data and
    converted. For quantization-aware training, use autoinit_tf.quantize.prepare in Python, fit, save the
    .keras file and pass it with --qat. Runs on the TensorFlow backend.
    """
    verbose = resolve_verbosity(verbose)
    if output_path is not None and not output_path.endswith(".tflite"):
        raise click.BadParameter(f"'{output_path}' must end in .tflite.", param_hint="OUTPUT")
    output_path = output_path or default_output(input_path, suffix="int8", ext=".tflite")
    refuse_input_paths(input_path, OUTPUT=output_path)
    run_guarded(lambda: _quantize(input_path, output_path, preset, bits, data_path, batches, qat, int8_io, overwrite,
                                  quiet), verbose)


def _quantize(input_path, output_path, preset, bits, data_path, batches, qat, int8_io, overwrite, quiet):
    import warnings

    import keras

    from autoinit_tf import formats, quantize

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"autoinit-tf quantize needs KERAS_BACKEND=tensorflow (this process uses "
                           f"{keras.backend.backend()!r}): TFLite's converter reads TensorFlow graphs.")
    t0 = time.perf_counter()
    formats.check_writable(output_path, overwrite=overwrite)
    data = _load_data(data_path) if data_path else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", quantize.QuantizationWarning)
        if qat:
            model = keras.models.load_model(input_path, compile=False)
            if not any(isinstance(layer, (quantize.FakeQuant, quantize.QuantizedLayer)) for layer in model.layers):
                raise ValueError(f"--qat: '{input_path}' has no fake-quantization layers; it is not a model from "
                                 "autoinit_tf.quantize.prepare. Drop --qat to quantize it post-training.")
            source = "QAT model"
        else:
            loaded = load_trained(input_path)
            model = quantize.prepare(loaded.model, preset, bits, "minmax", data=data, calibration_batches=batches)
            source = f"{loaded.format}, post-training, preset {preset}, {bits} bits"
        integer = quantize.convert(model, data=data, int8_io=int8_io, batches=batches)
    integer.save(output_path, overwrite=overwrite)
    if quiet:
        return
    for w in caught:
        if issubclass(w.category, quantize.QuantizationWarning):
            click.echo(f"warning: {w.message}", err=True)
    types = integer.tensor_types()
    click.echo(f"quantized {input_path} ({source})")
    click.echo(f"  int8 tensors: {types.get('int8', 0)} of {sum(types.values())}; size {integer.size_bytes} bytes")
    click.echo(f"  output: {output_path}")
    click.echo(f"  time:   {time.perf_counter() - t0:.1f}s")
