"""Importing this module registers every built-in propagation rule."""

from autoinit_tf.rules import (  # noqa: F401
    activation,
    attention,
    linear,
    merge,
    normalization,
    ops,
    pooling,
    recurrent,
    regularization,
    reshape,
)

try:  # the paper layers' rules, when that package is present
    from autoinit_tf.rules import paper_layers  # noqa: F401
except ImportError:  # pragma: no cover
    pass
