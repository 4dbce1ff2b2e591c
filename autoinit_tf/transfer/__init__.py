"""Transfer protocols: Kornblith et al.'s linear probe, and fine-tuning with AutoInit on the new layers only."""

from autoinit_tf.transfer.fine_tune import BN_POLICIES, fine_tune_model
from autoinit_tf.transfer.linear_probe import DEFAULT_L2_GRID, LinearProbeReport, extract_features, linear_probe

__all__ = ["linear_probe", "LinearProbeReport", "extract_features", "fine_tune_model", "BN_POLICIES",
           "DEFAULT_L2_GRID"]
