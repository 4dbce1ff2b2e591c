"""The built-in rules, installed explicitly and in a written order by `register_builtin_rules`.

Each rule module collects its declarations in a `BuiltinTable` (``BUILTIN``) where the rules are
written; importing it registers nothing. `register_builtin_rules` installs the tables below in this
order (a later table may add fields to a class an earlier one declared). Every pass calls it first;
it is idempotent and cheap after the first call. User registrations (`register_rule`,
`register_layer`) live in their own table and win over these whatever the order.
"""

from __future__ import annotations

from autoinit_tf.rules import (
    activation,
    attention,
    keras_hub_layers,
    linear,
    merge,
    normalization,
    ops,
    paper_layers,
    pooling,
    recurrent,
    regularization,
    reshape,
)
from autoinit_tf.rules.registry import install_builtin

__all__ = ["BUILTIN_TABLES", "register_builtin_rules"]

#: The order of installation.
BUILTIN_TABLES = (
    linear.BUILTIN,
    normalization.BUILTIN,
    activation.BUILTIN,
    pooling.BUILTIN,
    merge.BUILTIN,
    regularization.BUILTIN,
    reshape.BUILTIN,
    attention.BUILTIN,
    recurrent.BUILTIN,
    ops.BUILTIN,
    paper_layers.BUILTIN,
)

_installed = False
_hub_installed = False


def register_builtin_rules() -> None:
    """Install autoinit-tf's own rules and layer facts into the registry (once), and keras-hub's table
    once keras-hub has been imported (`rules.keras_hub_layers`)."""
    global _installed, _hub_installed
    if not _installed:
        install_builtin(BUILTIN_TABLES)
        _installed = True
    if not _hub_installed and keras_hub_layers.available():
        keras_hub_layers.declare_all()
        install_builtin((keras_hub_layers.BUILTIN,))
        _hub_installed = True
