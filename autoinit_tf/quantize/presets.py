"""MQBench's hardware settings (Li et al. 2021, table 2 and the library docs): what the simulated graph must do
so that QAT accuracy is the deployed accuracy.

graph level 1: only the inputs and weights of conv/dense layers are quantized; 2: also the inputs of
element-wise adds and pooling (TensorRT); 3: the whole network in int8.
"""

from __future__ import annotations

import dataclasses

__all__ = ["QuantPreset", "PRESETS"]


@dataclasses.dataclass(frozen=True)
class QuantPreset:
    name: str
    scale: str  # "fp32" or "pow2"
    weight_granularity: str  # "per-tensor" or "per-channel"
    weight_symmetric: bool
    activation_symmetric: bool
    graph_level: int
    fold_bn: bool
    narrow_range: bool = False  # TensorRT's symmetric [-127, 127]
    adaptive_signedness: bool = False  # unsigned activations after ReLU (academic only)
    note: str = ""


PRESETS = {
    "academic": QuantPreset("academic", "fp32", "per-tensor", True, True, 1, False, adaptive_signedness=True,
                            note="first/last layers usually kept in float"),
    "tensorrt": QuantPreset("tensorrt", "fp32", "per-channel", True, True, 2, True, narrow_range=True),
    "acl": QuantPreset("acl", "fp32", "per-channel", True, False, 1, True),
    "tvm": QuantPreset("tvm", "pow2", "per-tensor", True, True, 3, True),
    "snpe": QuantPreset("snpe", "fp32", "per-tensor", False, False, 3, True),
    "fbgemm": QuantPreset("fbgemm", "fp32", "per-channel", False, False, 3, True),
}
