"""`autoinit-tf recipes`: the swap recipes (for `convert --swap`) with their arguments."""

from __future__ import annotations

import json

import click


@click.command("recipes")
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def command(as_json):
    """List the swap recipes usable with `autoinit-tf convert --swap`, with their arguments."""
    try:
        from autoinit_tf.rewrite import list_recipes
    except ImportError as exc:  # pragma: no cover - the rewrite package missing from this build
        click.echo(f"Error: swap recipes are not available in this build ({exc}).", err=True)
        raise SystemExit(1) from exc
    recipes = list_recipes()
    if as_json:
        click.echo(json.dumps(recipes, indent=2, default=repr))
        return
    for r in recipes:
        args = ", ".join(f"{k}={v!r}" for k, v in r["args"].items())
        click.echo(r["name"] + (f"({args})" if args else ""))
        doc = " ".join(str(r.get("doc") or "").split())
        if doc:
            click.echo(f"    {doc}")
    click.echo("\nUse as: autoinit-tf convert MODEL --swap 'NAME' or --swap 'NAME(arg=value, ...)' (repeatable). "
               "Activation swaps may be written a->b, e.g. --swap 'relu->elu'.")
