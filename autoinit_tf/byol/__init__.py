"""BYOL (Grill et al. 2020): `BYOL` model, `TargetEMA`, augmentations and the collapse monitor."""

from autoinit_tf.byol.augment import RandomApply, RandomResizedCrop, byol_augmentation
from autoinit_tf.byol.model import (BYOL, TAU_PRESETS, CollapseMonitor, CollapseWarning, TargetEMA, byol_loss,
                                    mlp_head, tau_schedule)

__all__ = ["BYOL", "TargetEMA", "CollapseMonitor", "CollapseWarning", "tau_schedule", "byol_loss", "mlp_head",
           "TAU_PRESETS", "byol_augmentation", "RandomResizedCrop", "RandomApply"]
