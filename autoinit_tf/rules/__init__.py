"""Propagation rules, one module per family, and the one per-class registry.

Importing this package registers nothing: `register_builtin_rules` (``autoinit_tf.rules.builtin``)
installs the built-in rules, and every pass calls it first.
"""

from autoinit_tf.rules.context import RuleContext  # noqa: F401
from autoinit_tf.rules.fallback import ProbeFailedError  # noqa: F401
from autoinit_tf.rules.registry import (  # noqa: F401
    LayerSpec,
    UnsupportedLayerError,
    builtin_rules,
    find_rule,
    register_layer,
    register_rule,
    registered_rules,
    spec_for,
    unregister_layer,
    unregister_rule,
)
