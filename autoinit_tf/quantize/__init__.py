"""Quantization building blocks (MQBench conventions): fake quantization with straight-through gradients,
LSQ, power-of-two scales, and the hardware presets. The graph-level `prepare` / integer `convert` of the
quantization-aware-training issue are not built yet."""

from autoinit_tf.quantize.fake_quant import (fake_quantize, lsq_init_scale, lsq_quantize, pow2_scale, quant_range,
                                             round_ste)
from autoinit_tf.quantize.presets import PRESETS, QuantPreset

__all__ = ["fake_quantize", "lsq_quantize", "lsq_init_scale", "pow2_scale", "quant_range", "round_ste", "PRESETS",
           "QuantPreset"]
