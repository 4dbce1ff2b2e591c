"""`autoinit-tf`: the click application. Each command lives in its own module of this package."""

from __future__ import annotations

import importlib
import logging
import os

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Command modules, each exposing a click command named like the module's COMMAND attribute.
_COMMAND_MODULES = ("demo", "layers", "convert", "report", "recipes", "prune", "quantize")


def _version():
    import autoinit_tf

    return autoinit_tf.__version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=None, package_name="autoinit-tf", message="autoinit-tf %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose):
    """Exact AutoInit for Keras 3: analyse, re-initialize and convert models."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a command module not present in this build
        if exc.name != f"{__package__}.{_name}":
            raise
        continue
    cli.add_command(_mod.command)


if __name__ == "__main__":  # pragma: no cover
    cli()
