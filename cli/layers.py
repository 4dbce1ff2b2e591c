"""`autoinit-tf layers`: the supported-layer table, generated from the rule registry."""

from __future__ import annotations

import click

from autoinit_tf.rules import builtin_rules
from autoinit_tf.rules.builtin import register_builtin_rules


def supported_layers():
    """Rows (class, kind, family, rule name) for every built-in rule, sorted by kind, family and name.

    Rules registered at run time by user code (``register_rule``) live in their own table and are left
    out: this is the table of what autoinit-tf itself supports.
    """
    register_builtin_rules()
    rows = []
    for cls, rule in builtin_rules().items():
        if not getattr(rule, "__module__", "").startswith("autoinit_tf."):
            continue
        family = rule.__module__.rsplit(".", 1)[-1]
        module = cls.__module__
        kind = "op" if ".ops." in module else "layer"
        rows.append((cls.__name__, kind, family, getattr(rule, "__name__", "rule")))
    rows.sort(key=lambda r: (r[1], r[2], r[0]))
    return rows


@click.command("layers")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def command(markdown):
    """List every layer and op with a propagation rule."""
    rows = supported_layers()
    head = ("class", "kind", "family", "rule")
    if markdown:
        click.echo("| " + " | ".join(head) + " |")
        click.echo("|" + "---|" * len(head))
        for r in rows:
            click.echo("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    click.echo(f"\n{len(rows)} classes with exact or simulated rules; any other layer gets the empirical "
               "fallback rule with a warning (strict=True makes it an error).")
