"""TensorFlow-specific parts of model I/O (imported only when a TF-only format or op needs them).

* `TFOpLambda`: a Keras 3 stand-in for Keras 2's ``TFOpLambda`` layer (``tf.nn.relu(x)`` in a Keras 2
  functional model). Its ``function`` (``"nn.relu"``, ``"math.add"``, ...) is first mapped to the
  equivalent `keras.ops` function where one exists, otherwise resolved as an attribute path on the
  ``tensorflow`` module (TensorFlow backend only).
* `saved_model_variables`: the variables of a SavedModel directory by name, for ``--keep-weights-of``.
"""

from __future__ import annotations

import keras

__all__ = ["TFOpLambda", "KERAS_OPS", "resolve_tf_function", "saved_model_variables"]

# Keras 2 TFOpLambda function paths (relative to `tf`) with an exact Keras 3 ops equivalent.
KERAS_OPS = {
    "nn.relu": "relu",
    "nn.relu6": "relu6",
    "nn.elu": "elu",
    "nn.selu": "selu",
    "nn.gelu": "gelu",
    "nn.silu": "silu",
    "nn.swish": "silu",
    "nn.sigmoid": "sigmoid",
    "math.sigmoid": "sigmoid",
    "sigmoid": "sigmoid",
    "nn.tanh": "tanh",
    "math.tanh": "tanh",
    "tanh": "tanh",
    "nn.softplus": "softplus",
    "math.softplus": "softplus",
    "nn.softsign": "softsign",
    "nn.softmax": "softmax",
    "nn.log_softmax": "log_softmax",
    "nn.leaky_relu": "leaky_relu",
    "math.add": "add",
    "add": "add",
    "__operators__.add": "add",
    "math.subtract": "subtract",
    "math.multiply": "multiply",
    "multiply": "multiply",
    "math.truediv": "divide",
    "math.divide": "divide",
    "math.exp": "exp",
    "math.log": "log",
    "math.sqrt": "sqrt",
    "math.square": "square",
    "math.abs": "abs",
    "math.negative": "negative",
    "math.reduce_mean": "mean",
    "reduce_mean": "mean",
    "math.reduce_sum": "sum",
    "reduce_sum": "sum",
    "math.reduce_max": "max",
    "reshape": "reshape",
    "transpose": "transpose",
    "concat": "concatenate",
    "expand_dims": "expand_dims",
    "squeeze": "squeeze",
    "identity": None,  # handled specially
}

# Keyword renames from TF spellings to keras.ops spellings, per keras op.
_KWARG_RENAMES = {
    "mean": {"axis": "axis", "keepdims": "keepdims"},
    "sum": {"axis": "axis", "keepdims": "keepdims"},
    "max": {"axis": "axis", "keepdims": "keepdims"},
    "transpose": {"perm": "axes"},
    "leaky_relu": {"alpha": "negative_slope"},
}


def resolve_tf_function(path: str):
    """`tf.<path>` (``"nn.relu"``): the TensorFlow function, or a clear error."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"This model uses the TensorFlow op tf.{path} (a Keras 2 TFOpLambda layer) with no Keras 3 "
            f"equivalent known to autoinit-tf; it can only run on the TensorFlow backend (KERAS_BACKEND="
            f"{keras.backend.backend()})."
        )
    import tensorflow as tf

    obj = tf
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"TFOpLambda function 'tf.{path}' does not exist in TensorFlow {tf.__version__}.")
        obj = getattr(obj, part)
    return obj


@keras.saving.register_keras_serializable(package="autoinit_tf", name="TFOpLambda")
class TFOpLambda(keras.layers.Layer):
    """Calls ``tf.<function>`` (or its `keras.ops` equivalent) on the inputs, as Keras 2's TFOpLambda did."""

    def __init__(self, function, **kwargs):
        kwargs.pop("function", None)
        super().__init__(**kwargs)
        self.function = function
        op_name = KERAS_OPS.get(function, "missing")
        self._renames = {}
        self._fn_is_keras = op_name not in (None, "missing")
        if function == "identity":
            self._fn = lambda x, **kw: x
        elif op_name not in (None, "missing"):
            self._fn = getattr(keras.ops, op_name)
            self._renames = _KWARG_RENAMES.get(op_name, {})
        else:
            self._fn = resolve_tf_function(function)

    def call(self, *args, **kwargs):
        kwargs.pop("name", None)
        if "y" in kwargs and self._fn_is_keras:  # tf.math.multiply(x, y=...) -> keras.ops.multiply(x, ...)
            args = (*args, kwargs.pop("y"))
        kwargs = {self._renames.get(k, k): v for k, v in kwargs.items()}
        return self._fn(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("name", None)
        return keras.src.backend.compute_output_spec(self.call, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "function": self.function}


def saved_model_variables(path) -> dict:
    """``{"layer/var_name": numpy array}`` of every variable stored in a SavedModel directory.

    Variable names as TensorFlow gives them (``dense/kernel:0``) without the ``:0`` suffix. Uses
    `tf.train.load_checkpoint` on ``variables/`` when possible (fast, no graph restore), else
    `tf.saved_model.load`.
    """
    import os

    import tensorflow as tf

    out = {}
    loaded = tf.saved_model.load(os.fspath(path))
    for v in loaded.variables:
        name = v.name[:-2] if v.name.endswith(":0") else v.name
        out.setdefault(name, v.numpy())
    return out
