"""GradInit (Zhu et al., NeurIPS 2021): one learned scale per weight tensor; see `driver.gradinit`."""

from autoinit_tf.gradinit.driver import DEFAULTS, GradInitReport, gradinit, half_batches

__all__ = ["gradinit", "GradInitReport", "half_batches", "DEFAULTS"]
