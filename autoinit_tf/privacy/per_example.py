"""Vectorized per-example gradients and clipping (TensorFlow backend).

Per-example gradients come from ``tf.vectorized_map`` over a gradient of
``model.stateless_call`` on one example (a batch of one, or of its K augmented
views), compiled with XLA. ``microbatch_size`` bounds memory: the batch is
processed in chunks of that many examples inside a ``tf.while_loop`` and only
the running sum of clipped gradients is kept.

Backend-specific code: this module is the TensorFlow implementation; see
:func:`require_tensorflow` for the policy on other backends.
"""

from __future__ import annotations

import contextlib

import keras

from autoinit_tf.privacy.validators import all_layers, is_seed_state

def require_tensorflow():
    """This engine is TensorFlow code: raise a clear error on any other Keras backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise NotImplementedError(
            "PerExampleGradients is the TensorFlow engine; the current Keras backend is "
            f"{backend!r}. On JAX, make_private uses autoinit_tf.privacy.jax_step (jax.vmap)."
        )
    return backend


class unrolled_recurrent_layers:
    """Context manager: every Keras RNN layer of ``model`` runs unrolled while active.

    ``tf.vectorized_map`` cannot convert the gradient of the ``tf.while_loop`` a rolled RNN
    builds (its TensorArray is a variant tensor: "dtype variant is not compatible with int64"),
    and the direct engine cannot see the kernel reads inside the loop. Unrolled, the same
    cell runs once per time step in the outer graph: same values, per-example gradients in
    closed form (the direct engine) or vectorized. Needs a fixed sequence length.
    """

    def __init__(self, model):
        self._layers = [
            layer for layer in all_layers(model) if isinstance(layer, keras.layers.RNN) and not layer.unroll
        ]

    def __enter__(self):
        for layer in self._layers:
            layer.unroll = True
        return self

    def __exit__(self, *exc):
        for layer in self._layers:
            layer.unroll = False
        return False


def global_norms(per_example_grads):
    """Per-example global L2 norm over all tensors: shape (B,)."""
    import tensorflow as tf

    squares = [
        tf.reduce_sum(tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]), axis=1)
        for g in per_example_grads
    ]
    return tf.sqrt(tf.add_n(squares))


def clip_factors(norms, l2_norm_clip):
    """``min(1, C / ||g_i||)`` per example (1 for a zero gradient)."""
    import tensorflow as tf

    c = tf.cast(l2_norm_clip, norms.dtype)
    return tf.minimum(tf.ones_like(norms), c / tf.maximum(norms, tf.cast(1e-30, norms.dtype)))


def clip_per_example(per_example_grads, l2_norm_clip):
    """Clip each example's gradient (all tensors together) to global L2 norm <= ``l2_norm_clip``."""
    import tensorflow as tf

    factors = clip_factors(global_norms(per_example_grads), l2_norm_clip)
    out = []
    for g in per_example_grads:
        f = tf.reshape(tf.cast(factors, g.dtype), [-1] + [1] * (len(g.shape) - 1))
        out.append(g * f)
    return out


# --------------------------------------------------------------------------------------------
# Vectorizable 2-D convolution kernel gradient.
#
# tf.vectorized_map has no vectorized rule for Conv2DBackpropFilter when the input differs per
# example (it falls back to a serial while_loop). While the per-example function is traced, Keras'
# TensorFlow ``conv`` is routed through a custom gradient whose kernel gradient is written as
# kh*kw strided slices of the padded input contracted with the output gradient (einsum), which
# vectorizes into batched matrix products. Forward values and input gradients are unchanged.
def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _kernel_grad_2d(x, dy, kernel_shape, strides, padding, dilation):
    import tensorflow as tf

    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    sh, sw = strides
    dh, dw = dilation
    h, w = x.shape[1], x.shape[2]
    ho, wo = dy.shape[1], dy.shape[2]
    if padding == "SAME":
        ph = max((ho - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((wo - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        x = tf.pad(x, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]])
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            patch = x[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw, :]
            cols.append(tf.einsum("bhwc,bhwo->co", patch, dy))
        rows.append(tf.stack(cols))
    return tf.stack(rows)


def _make_vectorizable_conv(original):
    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        import tensorflow as tf

        fmt = data_format or keras.config.image_data_format()
        if (
            len(inputs.shape) != 4
            or fmt != "channels_last"
            or inputs.shape[-1] != kernel.shape[-2]
            or None in tuple(inputs.shape[1:])
            or str(padding).upper() not in ("SAME", "VALID")
            or _pair(dilation_rate) != (1, 1)
        ):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        st, dil, pad = _pair(strides), _pair(dilation_rate), str(padding).upper()

        @tf.custom_gradient
        def fwd(x, k):
            y = tf.nn.conv2d(x, k, st, pad, dilations=dil)

            def grad(dy):
                dx = tf.nn.conv2d_transpose(dy, k, tf.shape(x), st, pad)
                dk = _kernel_grad_2d(x, dy, k.shape, st, pad, dil)
                return dx, tf.cast(dk, k.dtype)

            return y, grad

        return fwd(inputs, kernel)

    return conv


class _vectorizable_convs:
    """Context manager: route Keras' TensorFlow conv through the vectorizable-gradient version."""

    def __enter__(self):
        from keras.src.backend.tensorflow import nn as tf_nn

        self._module = tf_nn
        self._original = tf_nn.conv
        tf_nn.conv = _make_vectorizable_conv(self._original)
        return self

    def __exit__(self, *exc):
        self._module.conv = self._original
        return False


class PerExampleGradients:
    """Per-example gradients of ``loss_fn(y, model(x))`` for one Keras model (TensorFlow).

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar``, the mean loss over a batch
            (applied to the V views of one example, so V = 1 gives that example's loss).
        microbatch_size: examples vectorized at once (``None``: the whole batch).
        augmult: augmentation multiplicity K (views per example, loss averaged before clipping).
        augment: ``augment(x_batch, seed) -> x_batch``, applied to the K tiled copies of the
            batch; ``seed`` is a shape-(2,) int tensor for stateless random ops.
        jit_compile: XLA-compile the per-example computation of the ``"vectorized_map"`` method
            (the ``"direct"`` method always runs as a TF graph without XLA).
        method: ``"direct"`` (default): one batched forward and backward pass; per-example
            gradients of Dense / Conv1D / Conv2D kernels and biases and Embedding tables in closed
            form from each layer's input and output gradient (see :mod:`autoinit_tf.privacy.direct`),
            every other variable through ``tf.vectorized_map`` (listed in ``fallback_variables``
            once traced). ``"vectorized_map"``: every variable through ``tf.vectorized_map``.
        fast_conv: in the ``tf.vectorized_map`` engine, give 2-D convolutions (channels_last, no
            dilation) a kernel gradient written as strided slices + einsum, which vectorizes.
    """

    METHODS = ("direct", "vectorized_map")

    def __init__(
        self,
        model,
        loss_fn,
        microbatch_size=None,
        augmult=1,
        augment=None,
        jit_compile=True,
        fast_conv=False,
        method="direct",
    ):
        import tensorflow as tf

        require_tensorflow()
        if not model.built:
            raise ValueError(
                "The model must be built before DP training (give it an Input or call it on a batch)."
            )
        if microbatch_size is not None and (int(microbatch_size) != microbatch_size or microbatch_size < 1):
            raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}.")
        if int(augmult) != augmult or augmult < 1:
            raise ValueError(f"augmult must be an integer >= 1, got {augmult!r}.")
        if augmult > 1 and augment is None:
            raise ValueError(
                "augmult > 1 needs an augment(x, seed) function (e.g. privacy.random_flip_and_crop()); "
                "identical views would only cost time."
            )
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}.")
        self.method = method
        self.fallback_variables = None  # set when the direct engine is traced
        self._biases = None
        self.model = model
        self.loss_fn = loss_fn
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.augmult = int(augmult)
        self.augment = augment
        self.fast_conv = bool(fast_conv)
        self.seed_state_index = [i for i, v in enumerate(model.non_trainable_variables) if is_seed_state(v)]
        # The direct engine runs as a plain TF graph: its work is a few large batched matmuls and
        # convolutions, and XLA (TF 2.21, CPU) constant-folded its whole forward pass at compile
        # time (minutes for a 26k-parameter CNN at batch 256). XLA is kept for vectorized_map.
        jit = bool(jit_compile) and method != "direct"
        self._per_example = tf.function(self._per_example_impl, jit_compile=jit, autograph=False)
        self._clipped_sum = tf.function(self._clipped_sum_impl, jit_compile=jit, autograph=False)

    # ----------------------------------------------------------------- helpers
    def _views(self, x, seed):
        """x (B, ...) -> (B, V, ...): the K augmented views of every example (V = 1 without augmult)."""
        import tensorflow as tf

        if self.augmult == 1:
            return keras.tree.map_structure(lambda a: tf.expand_dims(a, 1), x)
        k = self.augmult

        def tile(a):
            b = tf.shape(a)[0]
            rep = tf.repeat(a, k, axis=0)  # (B*K, ...), example-major
            return rep, b

        flat = keras.tree.flatten(x)
        tiled = [tile(a)[0] for a in flat]
        augmented = self.augment(keras.tree.pack_sequence_as(x, tiled), seed)
        aug_flat = keras.tree.flatten(augmented)
        out = [tf.reshape(a, tf.concat([[-1, k], tf.shape(a)[1:]], 0)) for a in aug_flat]
        return keras.tree.pack_sequence_as(x, out)

    def _one_example(self, trainable, non_trainable, x_views, y_i, index, sources=None):
        import tensorflow as tf

        v = self.augmult
        y_views = keras.tree.map_structure(lambda a: tf.repeat(tf.expand_dims(a, 0), v, axis=0), y_i)
        nt = list(non_trainable)
        for k in self.seed_state_index:
            # a distinct RNG stream per example (dropout masks must differ between examples)
            offset = tf.stack([tf.cast(index, nt[k].dtype), tf.zeros([], nt[k].dtype)])
            nt[k] = nt[k] + offset
        patch = _vectorizable_convs() if self.fast_conv else contextlib.nullcontext()
        with patch:
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                y_pred, new_nt = self.model.stateless_call(trainable, nt, x_views, training=True)
                loss = self.loss_fn(y_views, y_pred)
            wanted = trainable if sources is None else [trainable[i] for i in sources]
            grads = tape.gradient(loss, wanted, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = [tf.convert_to_tensor(g) for g in grads]
        first_view = keras.tree.map_structure(lambda a: a[0], y_pred)
        seeds = [new_nt[k] for k in self.seed_state_index]
        return grads, tf.cast(loss, tf.float32), first_view, seeds

    def _vectorized(self, trainable, non_trainable, x_views, y, index, sources=None):
        import tensorflow as tf

        def fn(args):
            xi, yi, ii = args
            return self._one_example(trainable, non_trainable, xi, yi, ii, sources)

        return tf.vectorized_map(fn, (x_views, y, index))

    # ------------------------------------------------------------ direct engine
    def _direct(self, trainable, non_trainable, x_views, y, index):
        """One batched pass. Returns (groups, fallback grads {i: (B, ...)}, losses, first-view
        predictions, seed states); the fallback covers the variables the groups do not."""
        import tensorflow as tf

        from autoinit_tf.privacy import direct

        variables = list(self.model.trainable_variables)
        if self._biases is None:
            self._biases = direct.bias_of_kernel(self.model, variables)
        flat_x = keras.tree.flatten(x_views)
        b = flat_x[0].shape[0]
        if b is None:
            b = tf.shape(flat_x[0])[0]
        v = self.augmult
        x_rows = keras.tree.map_structure(lambda a: tf.reshape(a, tf.concat([[-1], tf.shape(a)[2:]], 0)), x_views)

        def per_example_loss(args):
            yp_i, y_i = args
            y_v = keras.tree.map_structure(lambda a: tf.repeat(tf.expand_dims(a, 0), v, axis=0), y_i)
            return tf.cast(self.loss_fn(y_v, yp_i), tf.float32)

        with direct.Recorder(variables) as rec:
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                y_pred, new_nt = self.model.stateless_call(trainable, list(non_trainable), x_rows, training=True)
                y_pred = keras.tree.map_structure(
                    lambda a: tf.reshape(a, tf.concat([[b, v], tf.shape(a)[1:]], 0)), y_pred
                )
                losses = tf.vectorized_map(per_example_loss, (y_pred, y))
                total = tf.reduce_sum(losses)
        zs = [r[3] for r in rec.records]
        dzs = tape.gradient(total, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO) if zs else []
        groups, covered = direct.build_groups(rec, dzs, variables, self._biases, b)
        unused = {i for i, var in enumerate(variables) if rec.reads[id(var)] == 0}
        fallback = [i for i in range(len(variables)) if i not in covered and i not in unused]
        if fallback and self.seed_state_index:
            # Random layers (dropout): a second, per-example forward pass would draw other
            # masks than the batched one; keep one consistent pass per example instead.
            self.fallback_variables = [var.path for var in variables]
            return None
        self.fallback_variables = [variables[i].path for i in fallback]
        fb = {}
        if fallback:
            grads, _, _, _ = self._vectorized(trainable, non_trainable, x_views, y, index, sources=fallback)
            fb = dict(zip(fallback, grads))
        for i in unused:
            fb[i] = tf.zeros(tf.concat([[b], tf.shape(trainable[i])], 0), trainable[i].dtype)
        first_view = keras.tree.map_structure(lambda a: a[:, 0], y_pred)
        seeds = [new_nt[k] for k in self.seed_state_index]
        return groups, fb, losses, first_view, seeds

    def _direct_per_example(self, trainable, non_trainable, x_views, y, index):
        from autoinit_tf.privacy import direct

        out = self._direct(trainable, non_trainable, x_views, y, index)
        if out is None:
            return None
        groups, fb, losses, y_pred, _ = out
        per = dict(fb)
        for g in groups:
            per.update(direct.per_example(g))
        return [per[i] for i in range(len(trainable))], losses, y_pred

    def _direct_clipped(self, trainable, non_trainable, x_views, y, index, maskf, l2_norm_clip):
        import tensorflow as tf

        from autoinit_tf.privacy import direct

        out = self._direct(trainable, non_trainable, x_views, y, index)
        if out is None:
            return None
        groups, fb, losses, y_pred, seeds = out
        squares = [direct.squared_norms(g) for g in groups]
        squares += [
            tf.reduce_sum(tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]), axis=1)
            for g in fb.values()
        ]
        norms = tf.sqrt(tf.add_n(squares))
        keep = maskf > 0
        weights = tf.where(keep, clip_factors(norms, l2_norm_clip) * maskf, tf.zeros_like(maskf))
        sums = {}
        for g in groups:
            sums.update(direct.weighted_sum(g, weights, keep))
        for i, g in fb.items():
            shape = [-1] + [1] * (len(g.shape) - 1)
            gw = g * tf.reshape(tf.cast(weights, g.dtype), shape)
            sums[i] = tf.reduce_sum(tf.where(tf.reshape(keep, shape), gw, tf.zeros_like(gw)), axis=0)
        return [sums[i] for i in range(len(trainable))], losses, y_pred, norms, seeds

    # ----------------------------------------------------------- public API
    def _per_example_impl(self, trainable, non_trainable, x, y, seed):
        with unrolled_recurrent_layers(self.model):
            return self._per_example_traced(trainable, non_trainable, x, y, seed)

    def _per_example_traced(self, trainable, non_trainable, x, y, seed):
        import tensorflow as tf

        b = tf.shape(keras.tree.flatten(x)[0])[0]
        x_views, index = self._views(x, seed), tf.range(b, dtype=tf.int64)
        if self.method == "direct":
            out = self._direct_per_example(trainable, non_trainable, x_views, y, index)
            if out is not None:
                return out
        grads, losses, y_pred, _ = self._vectorized(trainable, non_trainable, x_views, y, index)
        return grads, losses, y_pred

    def per_example_gradients(self, x, y, seed=(0, 0)):
        """Stacked per-example gradients ``[g (B, *var.shape)]`` at the model's current weights,
        plus per-example losses (B,) and predictions (first view)."""
        import tensorflow as tf

        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        return self._per_example(trainable, non_trainable, x, y, tf.constant(seed, tf.int64))

    def _clipped_sum_impl(self, trainable, non_trainable, x, y, mask, l2_norm_clip, seed):
        """Sum over examples of mask_i * clip(g_i), with per-example losses, predictions, norms."""
        with unrolled_recurrent_layers(self.model):
            return self._clipped_sum_traced(trainable, non_trainable, x, y, mask, l2_norm_clip, seed)

    def _clipped_sum_traced(self, trainable, non_trainable, x, y, mask, l2_norm_clip, seed):
        import tensorflow as tf

        x_views = self._views(x, seed)
        flat_x = keras.tree.flatten(x_views)
        b = tf.shape(flat_x[0])[0]
        m = self.microbatch_size
        maskf = tf.cast(mask, tf.float32)
        index = tf.range(b, dtype=tf.int64)

        def chunk_sum(xc, yc, mc, ic):
            if self.method == "direct":
                out = self._direct_clipped(trainable, non_trainable, xc, yc, ic, mc, l2_norm_clip)
                if out is not None:
                    return out
            grads, losses, y_pred, seeds = self._vectorized(trainable, non_trainable, xc, yc, ic)
            norms = global_norms(grads)
            factors = clip_factors(norms, l2_norm_clip) * mc
            sums = []
            for g in grads:
                f = tf.reshape(tf.cast(factors, g.dtype), [-1] + [1] * (len(g.shape) - 1))
                sums.append(tf.reduce_sum(g * f, axis=0))
            seeds = [s[0] for s in seeds]
            return sums, losses, y_pred, norms, seeds

        static_b = flat_x[0].shape[0]
        if m is None or (static_b is not None and static_b <= m):
            sums, losses, y_pred, norms, seeds = chunk_sum(x_views, y, maskf, index)
            return sums, losses, y_pred, norms, seeds

        # Micro-batches: pad to a multiple of m (padded rows masked out), loop over chunks.
        n_chunks = (b + m - 1) // m
        pad = n_chunks * m - b

        def to_chunks(a):
            paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(a) - 1, 2], tf.int32)], 0)
            a = tf.pad(a, paddings)
            return tf.reshape(a, tf.concat([[n_chunks, m], tf.shape(a)[1:]], 0))

        xc = keras.tree.map_structure(to_chunks, x_views)
        yc = keras.tree.map_structure(to_chunks, y)
        mc = to_chunks(maskf)
        ic = to_chunks(index)
        # Run the first chunk outside the loop to learn output structures.
        sums0, losses0, ypred0, norms0, seeds0 = chunk_sum(
            keras.tree.map_structure(lambda a: a[0], xc), keras.tree.map_structure(lambda a: a[0], yc), mc[0], ic[0]
        )
        loss_ta = tf.TensorArray(tf.float32, size=n_chunks, element_shape=losses0.shape).write(0, losses0)
        norm_ta = tf.TensorArray(norms0.dtype, size=n_chunks, element_shape=norms0.shape).write(0, norms0)
        ypred_flat0 = keras.tree.flatten(ypred0)
        ypred_tas = [
            tf.TensorArray(p.dtype, size=n_chunks, element_shape=p.shape).write(0, p) for p in ypred_flat0
        ]

        def body(i, sums, loss_ta, norm_ta, ypred_tas):
            s, losses, y_pred, norms, _ = chunk_sum(
                keras.tree.map_structure(lambda a: a[i], xc), keras.tree.map_structure(lambda a: a[i], yc), mc[i], ic[i]
            )
            sums = [a + b_ for a, b_ in zip(sums, s)]
            loss_ta = loss_ta.write(i, losses)
            norm_ta = norm_ta.write(i, norms)
            ypred_tas = [ta.write(i, p) for ta, p in zip(ypred_tas, keras.tree.flatten(y_pred))]
            return i + 1, sums, loss_ta, norm_ta, ypred_tas

        _, sums, loss_ta, norm_ta, ypred_tas = tf.while_loop(
            lambda i, *_: i < n_chunks, body, (tf.constant(1), sums0, loss_ta, norm_ta, ypred_tas)
        )

        def unchunk(t):
            t = t.stack()
            return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))[:b]

        y_pred = keras.tree.pack_sequence_as(ypred0, [unchunk(ta) for ta in ypred_tas])
        return sums, unchunk(loss_ta), y_pred, unchunk(norm_ta), seeds0

    def clipped_sum(self, trainable, non_trainable, x, y, mask, l2_norm_clip, seed):
        """``(sum_i mask_i clip(g_i), per-example losses, predictions, per-example norms, new seed states)``."""
        return self._clipped_sum(trainable, non_trainable, x, y, mask, l2_norm_clip, seed)
