"""A new head on a pretrained backbone, initialized by AutoInit from the features the backbone really produces.

`fine_tune_model` builds ``inputs -> backbone -> pooling -> [dropout] -> head`` and, given data, calls
``wrap(model, only=<the new layers>, data=data)``: the backbone's weights and BatchNormalization statistics
stay bit-identical; the new layers are fitted on a replay of the real model on that data, so the head's
pre-activation variance is the target for the backbone's actual features.

BatchNormalization inside the backbone (``bn=``):
* ``"freeze"`` (default, the usual choice for small target sets): every BN layer is non-trainable, so it
  normalizes with its pretrained moving statistics in training and inference alike and never updates them,
  even when the rest of the backbone is fine-tuned (``freeze=False``).
* ``"train"``: BN layers follow ``freeze``; with ``freeze=False`` they use batch statistics while training and
  re-estimate their moving statistics (Kornblith et al.'s fine-tuning protocol).
"""

from __future__ import annotations

import keras

from autoinit_tf import graph
from autoinit_tf.autoinit import wrap

__all__ = ["fine_tune_model", "BN_POLICIES"]

BN_POLICIES = ("freeze", "train")


def _pool(features, pooling):
    ndim = len(features.shape)
    if ndim <= 2 or pooling is None:
        return features if ndim <= 2 else keras.layers.Flatten(name="flatten_features")(features)
    layers = {("avg", 3): keras.layers.GlobalAveragePooling1D, ("avg", 4): keras.layers.GlobalAveragePooling2D,
              ("avg", 5): keras.layers.GlobalAveragePooling3D, ("max", 3): keras.layers.GlobalMaxPooling1D,
              ("max", 4): keras.layers.GlobalMaxPooling2D, ("max", 5): keras.layers.GlobalMaxPooling3D}
    if (pooling, ndim) not in layers:
        raise ValueError(f"pooling must be 'avg', 'max' or None (flatten), got {pooling!r} for features of rank {ndim}.")
    return layers[(pooling, ndim)](name="pool_features")(features)


def fine_tune_model(backbone, num_classes, *, head=None, freeze=True, bn="freeze", pooling="avg", dropout=0.0,
                    data=None, seed=None, name=None):
    """A classifier ``backbone -> pooling -> [Dropout] -> head``, the new layers initialized with AutoInit.

    Args:
        backbone: a built Keras model (pretrained weights are kept bit-identical).
        num_classes: outputs of the default head ``Dense(num_classes)`` (logits).
        head: a layer (or list of layers applied in order) to use instead of the default head.
        freeze: True: the backbone is not trained (linear-probe-like fine-tuning of the head); False: it is.
        bn: ``"freeze"`` or ``"train"``: what the backbone's BatchNormalization layers do (module docstring).
        pooling: ``"avg"``, ``"max"`` or None (flatten) for backbone outputs with spatial axes.
        dropout: rate of a Dropout before the head (0: none).
        data: a sample of real inputs; the new layers are initialized on the backbone's features for it
            (``wrap(only=...)``). None: the new layers keep Keras' initialization (no warning).
        seed: AutoInit's seed.

    Returns:
        The new model (the backbone object is shared, not copied).
    """
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}.")
    if not getattr(backbone, "built", False) or not getattr(backbone, "inputs", None):
        raise ValueError("fine_tune_model needs a built functional backbone (with inputs).")
    backbone.trainable = not freeze
    if bn == "freeze":
        for layer in graph.layer_tree(backbone, include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=f"{t.name.split(':')[0]}")
              for t in backbone.inputs]
    features = backbone(inputs[0] if len(inputs) == 1 else inputs)
    if isinstance(features, (list, tuple, dict)):
        raise ValueError("fine_tune_model needs a backbone with one output (the features).")
    h = _pool(features, pooling)
    if dropout:
        h = keras.layers.Dropout(dropout, name="head_dropout")(h)
    heads = [keras.layers.Dense(num_classes, name="head")] if head is None else (
        list(head) if isinstance(head, (list, tuple)) else [head])
    for layer in heads:
        h = layer(h)
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, h, name=name or f"{backbone.name}_fine_tune")
    if data is not None:
        wrap(model, only=[layer.name for layer in heads], data=data, seed=seed)
    return model
