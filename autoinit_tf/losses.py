"""Losses from the project's papers. `PowerGradCrossEntropy`: softmax gradient tampering / PowerGrad
Transform (Das et al., arXiv 2111.12495).

The value is the ordinary softmax cross-entropy; only the gradient with respect to the logits changes:

    dL_n / dz_n = p'_n - q_n,     p' = p^alpha / sum_j p_j^alpha = softmax(alpha * log_softmax(z))

(q the target, label smoothing included), scaled by the reduction exactly as cross-entropy's gradient is
(1/N for the mean over a batch of N, sample weights included). Written as a surrogate

    l_n = stop_gradient(CE_n) + T_n - stop_gradient(T_n),    T_n = sum_i z_ni * stop_gradient(p'_ni - q_ni)

so the gradient is exact whatever the reduction, batch size, mixed precision or loss scaling (a loss scale s
multiplies the loss and this gradient alike), on every backend. p' is computed in float32.
alpha = 1 gives cross-entropy's own gradient; alpha -> 0 pushes p' toward the uniform distribution.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["PowerGradCrossEntropy"]


@keras.saving.register_keras_serializable(package="autoinit_tf")
class PowerGradCrossEntropy(keras.losses.Loss):
    """Cross-entropy whose logit gradient is (p' - q) with p' = softmax(alpha * log_softmax(z)).

    Args:
        alpha: the power, 0 < alpha <= 1 (the paper: 0.25 for ResNet-18, 0.05 or 0.3 for ResNet-50).
        from_logits: must be True: the transform acts on the logits (end the model with a linear layer).
        label_smoothing: q = (1 - ls) onehot + ls / K.
        sparse: True for integer labels, False for one-hot; None (default) decides from the labels' shape.
        reduction, name, dtype: as every Keras loss.
    """

    def __init__(self, alpha=0.25, from_logits=True, label_smoothing=0.0, sparse=None, axis=-1,
                 reduction="sum_over_batch_size", name="powergrad_cross_entropy", dtype=None):
        if not from_logits:
            raise ValueError("PowerGradCrossEntropy acts on the logits: use from_logits=True and a model that "
                             "ends in a linear layer (no softmax).")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}.")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = float(alpha)
        self.from_logits = True
        self.label_smoothing = float(label_smoothing)
        self.sparse = sparse
        self.axis = axis

    def _targets(self, y_true, logits):
        k = logits.shape[self.axis]
        sparse = self.sparse
        if sparse is None:
            sparse = len(y_true.shape) < len(logits.shape) or (y_true.shape[-1] == 1 and k != 1)
        if sparse:
            labels = ops.cast(ops.reshape(y_true, ops.shape(logits)[:-1]), "int32")
            q = ops.one_hot(labels, k, dtype="float32")
        else:
            q = ops.cast(y_true, "float32")
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / k
        return q

    def call(self, y_true, y_pred):
        z = ops.cast(y_pred, "float32")
        q = self._targets(y_true, z)
        log_p = ops.log_softmax(z, axis=self.axis)
        ce = -ops.sum(q * log_p, axis=self.axis)
        p_prime = ops.softmax(self.alpha * log_p, axis=self.axis)
        t = ops.sum(z * ops.stop_gradient(p_prime - q), axis=self.axis)
        return ops.stop_gradient(ce) + t - ops.stop_gradient(t)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, from_logits=True, label_smoothing=self.label_smoothing, sparse=self.sparse,
                      axis=self.axis)
        return config
