"""autoinit-tf: exact, fast AutoInit for Keras 3."""

__version__ = "0.1.0"

from autoinit_tf.moments import Moments  # noqa: F401
from autoinit_tf.rules import RuleContext, UnsupportedLayerError, register_rule  # noqa: F401
