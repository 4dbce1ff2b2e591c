"""Direct per-example gradients from layer inputs and output gradients (TensorFlow backend).

One batched forward pass over all examples (``model.stateless_call``) runs while the Keras
backend ops ``matmul``, ``conv`` and ``take`` are intercepted: when such an op is applied to one
of the model's trainable variables (a Dense / Conv kernel, an Embedding table), its input ``X``
and output ``Z`` are recorded. One backward pass of ``sum_i loss_i`` then gives ``dZ`` for every
recorded op; because the examples of a batch do not interact (make_private refuses layers that
mix them), row ``n`` of ``dZ`` is example ``n``'s own output gradient, and each example's
parameter gradient follows in closed form:

* matmul ``Z = X K``:          ``G_n = sum_t X[n, t]^T dZ[n, t]``   (t: sequence positions, views)
* conv ``Z = conv(X, K)``:     the same with ``X`` replaced by the input patches (im2col,
  ``tf.image.extract_patches``): ``G_n = sum_t P[n, t]^T dZ[n, t]``
* take ``Z = E[ids]``:         ``G_n[v] = sum_{t: ids[n, t] = v} dZ[n, t]``
* bias of an exact ``Dense`` / ``Conv1D`` / ``Conv2D`` layer: ``g_n = sum_t dZ[n, t]``.

DP-SGD needs only per-example norms and the clipped sum. Norms are taken either from the
materialized ``G_n`` or, when cheaper, without it ("ghost norm", Li et al. 2022):
``||G_n||^2 = sum_{t,s} (X_t . X_s)(dZ_t . dZ_s)``. The clipped sum is one weighted product
``sum_n w_n G_n = sum_{n,t} X[n, t]^T (w_n dZ[n, t])`` (Bu et al.'s book-keeping), so no
``(B, *kernel)`` tensor is ever needed for training.

A variable counts as *covered* only when every read of it during the forward pass went through
an intercepted op (reads are counted in Keras' stateless scope) and, for a bias, its layer is an
exact Dense / Conv1D / Conv2D whose kernel was recorded once per call. Anything else (weight
tying through other ops, LayerNormalization / GroupNormalization scales, ops inside an RNN
while-loop, LoRA or quantized layers, channels_first or grouped or causal convolutions, ...) is
left to the ``tf.vectorized_map`` engine, variable by variable.
"""

from __future__ import annotations

import collections

import keras

from autoinit_tf import graph

MATMUL, CONV, TAKE = "matmul", "conv", "take"


def _pair(v, n):
    if isinstance(v, int):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    return v * n if len(v) == 1 else v


class Recorder:
    """Context manager: record (X, Z) of intercepted ops on the model's trainable variables."""

    def __init__(self, variables):
        self.variables = list(variables)
        self.index = {id(v): i for i, v in enumerate(self.variables)}
        self.records = []  # (kind, var_index, x, z, config)
        self.reads = collections.Counter()

    # -------------------------------------------------------------- patching
    def __enter__(self):
        import tensorflow as tf
        from keras.src.backend.common import stateless_scope
        from keras.src.backend.tensorflow import nn as tf_nn
        from keras.src.backend.tensorflow import numpy as tf_np

        self._graph = tf.compat.v1.get_default_graph()
        self._patches = [
            (tf_np, "matmul", tf_np.matmul),
            (tf_nn, "conv", tf_nn.conv),
            (tf_np, "take", tf_np.take),
            (stateless_scope.StatelessScope, "get_current_value", stateless_scope.StatelessScope.get_current_value),
        ]
        recorder = self
        orig_get = stateless_scope.StatelessScope.get_current_value

        def get_current_value(scope, variable):
            if id(variable) in recorder.index:
                recorder.reads[id(variable)] += 1
            return orig_get(scope, variable)

        tf_np.matmul = self._matmul(tf_np.matmul)
        tf_nn.conv = self._conv(tf_nn.conv)
        tf_np.take = self._take(tf_np.take)
        stateless_scope.StatelessScope.get_current_value = get_current_value
        return self

    def __exit__(self, *exc):
        for owner, name, original in self._patches:
            setattr(owner, name, original)
        return False

    def _var(self, v):
        """Index of ``v`` when it is one of our variables and we are in the top-level graph."""
        import tensorflow as tf

        i = self.index.get(id(v))
        if i is None or tf.compat.v1.get_default_graph() is not self._graph:
            return None
        return i

    def _matmul(self, original):
        def matmul(x1, x2):
            import tensorflow as tf

            i = self._var(x2)
            if i is None or isinstance(x1, tf.SparseTensor):
                return original(x1, x2)
            k = x2.value
            x = tf.convert_to_tensor(x1)
            if len(k.shape) != 2 or x.shape.rank is None or x.shape.rank < 2 or not x.dtype.is_floating:
                return original(x, k)  # read but not recorded: the variable stays uncovered
            z = original(x, k)
            self.records.append((MATMUL, i, x, z, None))
            return z

        return matmul

    def _conv(self, original):
        def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
            import tensorflow as tf

            i = self._var(kernel)
            if i is None:
                return original(inputs, kernel, strides, padding, data_format, dilation_rate)
            k = kernel.value
            x = tf.convert_to_tensor(inputs)
            rank = x.shape.rank
            fmt = data_format or keras.config.image_data_format()
            z = original(x, k, strides, padding, data_format, dilation_rate)
            if (
                rank not in (3, 4)
                or fmt != "channels_last"
                or str(padding).lower() not in ("valid", "same")
                or x.shape[-1] is None
                or int(x.shape[-1]) != int(k.shape[-2])
                or len(k.shape) != rank
            ):
                return z
            n = rank - 2
            cfg = {
                "kernel": tuple(int(s) for s in k.shape[:n]),
                "strides": _pair(strides, n),
                "dilation": _pair(dilation_rate, n),
                "padding": str(padding).upper(),
            }
            self.records.append((CONV, i, x, z, cfg))
            return z

        return conv

    def _take(self, original):
        def take(x, indices, axis=None):
            import tensorflow as tf

            i = self._var(x)
            if i is None:
                return original(x, indices, axis)
            table = x.value
            if axis != 0 or isinstance(indices, tf.SparseTensor) or len(table.shape) != 2:
                return original(table, indices, axis)
            ids = tf.convert_to_tensor(indices)
            if not ids.dtype.is_integer or ids.shape.rank is None or ids.shape.rank < 1:
                return original(table, ids, axis)
            z = original(table, ids, axis)
            ids = tf.where(ids < 0, ids + tf.cast(tf.shape(table)[0], ids.dtype), ids)
            self.records.append((TAKE, i, ids, z, {"vocab": int(table.shape[0])}))
            return z

        return take


# ------------------------------------------------------------------------------------------
# Coverage and grouping
def bias_of_kernel(model, variables):
    """``{kernel var index: bias var index}`` for exact Dense / Conv1D / Conv2D layers."""
    index = {id(v): i for i, v in enumerate(variables)}
    exact = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)
    out = {}
    for layer in graph.layer_tree(model, include_self=False):
        if type(layer) not in exact or getattr(layer, "lora_enabled", False):
            continue
        if getattr(layer, "quantization_mode", None) is not None:
            continue
        kernel = getattr(layer, "_kernel", None)
        if kernel is None:
            kernel = getattr(layer, "kernel", None)
        bias = getattr(layer, "bias", None)
        if kernel is None or bias is None or id(kernel) not in index or id(bias) not in index:
            continue
        out[index[id(kernel)]] = index[id(bias)]
    return out


class Group:
    """All recorded uses of one variable, positions flattened: x (B, T, K) or ids (B, T); dz (B, T, O)."""

    def __init__(self, kind, var, shape, x, dz, bias=None, vocab=None):
        self.kind, self.var, self.shape, self.x, self.dz, self.bias, self.vocab = kind, var, shape, x, dz, bias, vocab


def _rows(t, b):
    """(B*V, ...) -> (B, T, last) with T = V * prod(middle dims)."""
    import tensorflow as tf

    last = t.shape[-1]
    return tf.reshape(t, [b, -1, -1 if last is None else int(last)])


def _patches(x, cfg):
    import tensorflow as tf

    n = len(cfg["kernel"])
    if n == 1:
        x = tf.expand_dims(x, 1)
        k, s, d = (1,) + cfg["kernel"], (1,) + cfg["strides"], (1,) + cfg["dilation"]
    else:
        k, s, d = cfg["kernel"], cfg["strides"], cfg["dilation"]
    return tf.image.extract_patches(
        x, sizes=[1, *k, 1], strides=[1, *s, 1], rates=[1, *d, 1], padding=cfg["padding"]
    )


def build_groups(recorder, dzs, variables, biases, b):
    """Group records by variable; return (groups, covered variable indices)."""
    import tensorflow as tf

    by_var = collections.defaultdict(list)
    for rec, dz in zip(recorder.records, dzs):
        by_var[rec[1]].append((rec, dz))
    groups, covered = [], set()
    for i, uses in by_var.items():
        var = variables[i]
        if recorder.reads[id(var)] != len(uses) or len({u[0][0] for u in uses}) != 1:
            continue  # read elsewhere too (or by different op kinds): leave it to vectorized_map
        kind = uses[0][0][0]
        xs, dzl = [], []
        for (kind_, _, x, z, cfg), dz in uses:
            dz = tf.zeros_like(z) if dz is None else tf.convert_to_tensor(dz)
            if kind == CONV:
                x = _patches(x, cfg)
            if kind == TAKE:
                xs.append(tf.reshape(x, [b, -1]))
            else:
                xs.append(_rows(x, b))
            dzl.append(_rows(dz, b))
        x = xs[0] if len(xs) == 1 else tf.concat(xs, 1)
        dz = dzl[0] if len(dzl) == 1 else tf.concat(dzl, 1)
        bias = biases.get(i)
        if bias is not None and recorder.reads[id(variables[bias])] != len(uses):
            bias = None
        vocab = uses[0][0][4]["vocab"] if kind == TAKE else None
        groups.append(Group(kind, i, tuple(int(s) for s in var.shape), x, dz, bias, vocab))
        covered.add(i)
        if bias is not None:
            covered.add(bias)
    return groups, covered


# ------------------------------------------------------------------------------------------
# Per-example quantities of one group
def per_example(group):
    """``{var index: (B, *shape) per-example gradient}`` (materialized)."""
    import tensorflow as tf

    dz = group.dz
    out = {}
    if group.kind == TAKE:
        b = tf.shape(dz)[0]
        o = dz.shape[-1]
        ids = tf.cast(group.x, tf.int32) + tf.range(b, dtype=tf.int32)[:, None] * group.vocab
        g = tf.math.unsorted_segment_sum(tf.reshape(dz, [-1, o]), tf.reshape(ids, [-1]), b * group.vocab)
        out[group.var] = tf.reshape(g, [b, group.vocab, o])
    else:
        g = tf.einsum("ntk,nto->nko", tf.cast(group.x, dz.dtype), dz)
        out[group.var] = tf.reshape(g, tf.concat([[tf.shape(dz)[0]], group.shape], 0))
    if group.bias is not None:
        out[group.bias] = tf.reduce_sum(dz, axis=1)
    return out


def squared_norms(group):
    """Per-example squared L2 norm (B,) of the group's gradient (kernel/table and bias)."""
    import tensorflow as tf

    dz = tf.cast(group.dz, tf.float32)
    t = dz.shape[1]
    o = int(dz.shape[-1])
    if group.kind == TAKE:
        vocab = group.vocab
        if t is not None and t * t <= vocab:
            ids = group.x
            same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float32)
            sq = tf.reduce_sum(same * tf.einsum("nto,nso->nts", dz, dz), axis=[1, 2])
        else:
            g = per_example(Group(TAKE, group.var, group.shape, group.x, dz, None, vocab))[group.var]
            sq = tf.reduce_sum(tf.square(g), axis=[1, 2])
    else:
        x = tf.cast(group.x, tf.float32)
        k = int(x.shape[-1])
        if t == 1:
            sq = tf.reduce_sum(tf.square(x), axis=[1, 2]) * tf.reduce_sum(tf.square(dz), axis=[1, 2])
        elif t is not None and t * (k + o) < k * o:
            gx = tf.einsum("ntk,nsk->nts", x, x)
            gz = tf.einsum("nto,nso->nts", dz, dz)
            sq = tf.reduce_sum(gx * gz, axis=[1, 2])
        else:
            sq = tf.reduce_sum(tf.square(tf.einsum("ntk,nto->nko", x, dz)), axis=[1, 2])
    if group.bias is not None:
        sq = sq + tf.reduce_sum(tf.square(tf.reduce_sum(dz, axis=1)), axis=1)
    return sq


def weighted_sum(group, weights, keep):
    """``{var index: sum_n w_n G_n}`` without materializing G_n; rows with keep == False are zeroed."""
    import tensorflow as tf

    dz = group.dz
    w = tf.reshape(tf.cast(weights, dz.dtype), [-1, 1, 1])
    keep3 = tf.reshape(keep, [-1, 1, 1])
    dzw = tf.where(keep3, dz * w, tf.zeros_like(dz))
    out = {}
    o = dz.shape[-1]
    if group.kind == TAKE:
        g = tf.math.unsorted_segment_sum(
            tf.reshape(dzw, [-1, o]), tf.reshape(tf.cast(group.x, tf.int32), [-1]), group.vocab
        )
        out[group.var] = g
    else:
        x = tf.cast(group.x, dz.dtype)
        x = tf.where(keep3, x, tf.zeros_like(x))
        k = x.shape[-1]
        g = tf.matmul(tf.reshape(x, [-1, k]), tf.reshape(dzw, [-1, o]), transpose_a=True)
        out[group.var] = tf.reshape(g, group.shape)
    if group.bias is not None:
        out[group.bias] = tf.reduce_sum(dzw, axis=[0, 1])
    return out
