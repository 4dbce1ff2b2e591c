"""autoinit-tf: exact, fast AutoInit for Keras 3.

    import autoinit_tf
    autoinit_tf.wrap(model)              # same model object, every weight tensor re-scaled in place
    report = autoinit_tf.analyze(model)  # dry run: predicted (mean, var) at every node
"""

__version__ = "0.1.0"

from autoinit_tf.autoinit import FallbackRuleWarning, analyze, compare, wrap  # noqa: F401
from autoinit_tf.compat import AutoInit  # noqa: F401
from autoinit_tf.moments import Moments  # noqa: F401
from autoinit_tf.report import NodeRow, SignalReport  # noqa: F401
from autoinit_tf.rules import (ProbeFailedError, RuleContext, UnsupportedLayerError, register_rule,  # noqa: F401
                               unregister_rule)
from autoinit_tf.rules.activation import register_activation_kinks  # noqa: F401
from autoinit_tf.rewrite import SwapRule, list_recipes, plan_swaps, rewrite  # noqa: F401,E402
from autoinit_tf.measure import CalibrationWarning, calibrate, measure  # noqa: F401
from autoinit_tf.stability import UnstableSignalWarning  # noqa: F401
from autoinit_tf.callbacks import SignalMonitor  # noqa: F401
from autoinit_tf import layers  # noqa: F401,E402
from autoinit_tf.gradinit import GradInitReport, gradinit  # noqa: F401,E402
from autoinit_tf.revisited_bn import bn_optimizer, revisited_bn_init, with_input_batch_norm  # noqa: F401,E402
from autoinit_tf import transfer  # noqa: F401,E402
from autoinit_tf import losses  # noqa: F401,E402
from autoinit_tf import noise  # noqa: F401,E402
from autoinit_tf import byol, optimizers  # noqa: F401,E402
from autoinit_tf import slimming  # noqa: F401,E402
from autoinit_tf.slimming import prune_channels  # noqa: F401,E402
from autoinit_tf import quantize  # noqa: F401,E402
