"""Propagation rules, one module per family, registered by layer/op class.

Importing this package registers every built-in rule.
"""

from autoinit_tf.rules.registry import (  # noqa: F401
    RuleContext,
    UnsupportedLayerError,
    find_rule,
    register_rule,
    registered_rules,
    unregister_rule,
)
