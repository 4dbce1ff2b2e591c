"""Paper layers, written with keras.ops / keras.random only (TensorFlow, JAX and PyTorch)."""

from autoinit_tf.layers.dar_batch_normalization import DARBatchNormalization
from autoinit_tf.layers.iternorm_whitening import IterNormWhitening
from autoinit_tf.layers.log_avg_exp_pooling import (
    LogAvgExpPooling1D,
    LogAvgExpPooling2D,
    LogAvgExpPooling3D,
)
from autoinit_tf.layers.logit_gates import (
    AND_AIL,
    AND_IL,
    OR_AIL,
    OR_IL,
    XNOR_AIL,
    XNOR_IL,
    LogitGate,
    and_ail,
    and_il,
    and_nail,
    nail_constants,
    or_ail,
    or_il,
    or_nail,
    xnor_ail,
    xnor_il,
    xnor_nail,
)
from autoinit_tf.layers.proxy_normalization import ProxyNormalization
from autoinit_tf.layers.scaled_residual import ScaledResidual
from autoinit_tf.layers.stochastic_depth import StochasticDepth, linear_decay_survival
from autoinit_tf.layers.weight_standardization import (
    WSConv1D,
    WSConv2D,
    WSConv3D,
    WSDense,
    WeightStandardization,
    standardize_kernel,
)

__all__ = [
    "AND_AIL",
    "AND_IL",
    "DARBatchNormalization",
    "IterNormWhitening",
    "LogAvgExpPooling1D",
    "LogAvgExpPooling2D",
    "LogAvgExpPooling3D",
    "LogitGate",
    "OR_AIL",
    "OR_IL",
    "ProxyNormalization",
    "ScaledResidual",
    "StochasticDepth",
    "WSConv1D",
    "WSConv2D",
    "WSConv3D",
    "WSDense",
    "WeightStandardization",
    "XNOR_AIL",
    "XNOR_IL",
    "and_ail",
    "and_il",
    "and_nail",
    "linear_decay_survival",
    "nail_constants",
    "or_ail",
    "or_il",
    "or_nail",
    "standardize_kernel",
    "xnor_ail",
    "xnor_il",
    "xnor_nail",
]
