"""DP-SGD train step and privacy state for the JAX backend.

Per-example gradients are ``jax.vmap(jax.value_and_grad(loss of one example))`` over
``model.stateless_call`` (each example as a batch of one), compiled by the JAX trainer's
``jax.jit`` together with the rest of the step. ``microbatch_size`` bounds memory: the batch
is split into chunks of that many examples and a ``jax.lax.scan`` keeps only the running sum
of clipped gradients. The step itself follows Keras' "customizing what happens in fit with
JAX" contract: ``train_step(state, data) -> (logs, state)``, pure.

The clipping rule, the noise (``N(0, sigma^2 C^2)`` per coordinate on the sum, once per
batch), the denominator (expected batch size for Poisson batches, the actual size otherwise),
regularizers outside clipping and the accounting are those of the TensorFlow step
(:mod:`autoinit_tf.privacy.tf_step`). Counters and the parameter average (EMA) are kept in
Python, updated after every compiled step by a thin wrapper around it.
"""

from __future__ import annotations


import keras
import numpy as np

from autoinit_tf.privacy.ledger import StepLedger
from autoinit_tf.privacy.state import PrivacyState, parse_sample_weight, resolve_loss_fn
from autoinit_tf.privacy.sampling import MASK_KEY
from autoinit_tf.privacy.validators import is_seed_state


def _flatten(x):
    return keras.tree.flatten(x)


class JaxPerExampleGradients:
    """Per-example gradients and clipped sums of ``loss_fn(y, model(x))`` (JAX backend).

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar`` (mean over a batch; applied to one example).
        microbatch_size: examples vectorized at once (``None``: the whole batch).
    """

    def __init__(self, model, loss_fn, microbatch_size=None):
        if keras.backend.backend() != "jax":
            raise NotImplementedError(
                f"JaxPerExampleGradients needs the JAX backend, the current one is {keras.backend.backend()!r}."
            )
        if microbatch_size is not None and (int(microbatch_size) != microbatch_size or microbatch_size < 1):
            raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.seed_state_index = [i for i, v in enumerate(model.non_trainable_variables) if is_seed_state(v)]

    # ------------------------------------------------------------------ one example
    def _example_loss(self, trainable, non_trainable, x_i, y_i, index):
        import jax.numpy as jnp

        nt = list(non_trainable)
        for k in self.seed_state_index:
            # a distinct RNG stream per example (dropout masks must differ between examples)
            offset = jnp.stack([index, jnp.zeros_like(index)]).astype(nt[k].dtype)
            nt[k] = nt[k] + offset
        xb = keras.tree.map_structure(lambda a: a[None], x_i)
        yb = keras.tree.map_structure(lambda a: a[None], y_i)
        y_pred, new_nt = self.model.stateless_call(trainable, nt, xb, training=True)
        # The compiled loss keeps its own trackers: leave their updates in a throw-away scope.
        with keras.StatelessScope():
            loss = self.loss_fn(yb, y_pred)
        first = keras.tree.map_structure(lambda a: a[0], y_pred)
        return jnp.asarray(loss, jnp.float32), (first, [new_nt[k] for k in self.seed_state_index])

    def per_example(self, trainable, non_trainable, x, y, index=None):
        """``([g_i stacked (B, *var.shape)], losses (B,), predictions, seed states after the call)``."""
        import jax
        import jax.numpy as jnp

        b = _flatten(x)[0].shape[0]
        if index is None:
            index = jnp.arange(b, dtype=jnp.uint32)
        fn = jax.vmap(jax.value_and_grad(self._example_loss, has_aux=True), in_axes=(None, None, 0, 0, 0))
        (losses, (y_pred, seeds)), grads = fn(list(trainable), list(non_trainable), x, y, index)
        return list(grads), losses, y_pred, [s[0] for s in seeds]

    # ------------------------------------------------------------------ clipping
    def _chunk(self, trainable, non_trainable, x, y, maskf, index, l2_norm_clip):
        import jax.numpy as jnp

        grads, losses, y_pred, seeds = self.per_example(trainable, non_trainable, x, y, index)
        b = maskf.shape[0]
        squares = [jnp.sum(jnp.reshape(jnp.square(g.astype(jnp.float32)), (b, -1)), axis=1) for g in grads]
        norms = jnp.sqrt(sum(squares))
        keep = maskf > 0
        factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, 1e-30))
        weights = jnp.where(keep, factors * maskf, 0.0)
        sums = []
        for g in grads:
            kept = jnp.where(jnp.reshape(keep, (b,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))
            sums.append(jnp.tensordot(weights.astype(g.dtype), kept, axes=1))
        return sums, losses, y_pred, norms, seeds

    def clipped_sum(self, trainable, non_trainable, x, y, maskf, l2_norm_clip):
        """``(sum_i mask_i clip(g_i), per-example losses, predictions, per-example norms, new seed states)``."""
        import jax
        import jax.numpy as jnp

        b = _flatten(x)[0].shape[0]
        m = self.microbatch_size
        index = jnp.arange(b, dtype=jnp.uint32)
        if m is None or b <= m:
            return self._chunk(trainable, non_trainable, x, y, maskf, index, l2_norm_clip)
        n_chunks = -(-b // m)
        pad = n_chunks * m - b

        def to_chunks(a):
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
            return jnp.reshape(a, (n_chunks, m) + a.shape[1:])

        xs = keras.tree.map_structure(to_chunks, x)
        ys = keras.tree.map_structure(to_chunks, y)

        def body(acc, chunk):
            xc, yc, mc, ic = chunk
            sums, losses, y_pred, norms, seeds = self._chunk(trainable, non_trainable, xc, yc, mc, ic, l2_norm_clip)
            return [a + s for a, s in zip(acc, sums)], (losses, y_pred, norms, seeds)

        init = [jnp.zeros(t.shape, t.dtype) for t in trainable]
        sums, (losses, y_pred, norms, seeds) = jax.lax.scan(
            body, init, (xs, ys, to_chunks(maskf), to_chunks(index))
        )

        def unchunk(a):
            return jnp.reshape(a, (n_chunks * m,) + a.shape[2:])[:b]

        y_pred = keras.tree.map_structure(unchunk, y_pred)
        return sums, unchunk(losses), y_pred, unchunk(norms), [s[0] for s in seeds]


class JaxPrivacyState(PrivacyState):
    """Counters in Python, updated after every compiled step; EMA as ``keras.Variable`` objects.

    The step counter is the DP random state: step k's noise key is ``fold_in(key(seed), k)``,
    handed to the compiled step as an argument, so it never repeats across compiles, fits or
    optimizers (the optimizer's own iteration counter restarts with a fresh optimizer).
    """

    def __init__(self, model, config, engine, seed: int):
        super().__init__(config, engine, seed)
        self._ledger = StepLedger()
        self._ema_update = None
        if config.ema_momentum is not None:
            self.ema = [
                # a copy: the model's own buffers are donated to the compiled step
                keras.Variable(np.array(v.numpy()), trainable=False, name="dp_ema_" + v.name.replace("/", "_"))
                for v in model.trainable_variables
            ]

    def ledger(self) -> StepLedger:
        return self._ledger.copy()

    def record_step(self, data, trainable_values):
        """Count one executed step of ``data``; update the EMA from the new trainable values."""
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        mask, rate, truncated = parse_sample_weight(sample_weight)
        if mask is None:
            self._ledger.record_plain(int(_flatten(x)[0].shape[0]))
        else:
            q = self.config.sampling_rate if rate is None else self.accounted_rate(np.asarray(rate))
            self._ledger.record_poisson(q, truncated=bool(truncated is not None and np.asarray(truncated)))
        if self.ema is not None:
            import jax
            import jax.numpy as jnp

            if self._ema_update is None:

                def update(ema, values, mu):
                    return [mu.astype(e.dtype) * e + (1 - mu).astype(e.dtype) * v for e, v in zip(ema, values)]

                self._ema_update = jax.jit(update)
            t = float(self._ledger.steps)
            mu = jnp.float32(self.ema_decay(t))
            new = self._ema_update([e.value for e in self.ema], list(trainable_values), mu)
            for e, v in zip(self.ema, new):
                e.assign(v)


def install(model, config, loss_fn, seed):
    """Attach the JAX state, ``train_step`` and ``make_train_function`` to ``model``."""
    engine = JaxPerExampleGradients(model, loss_fn, microbatch_size=config.microbatch_size)
    state = JaxPrivacyState(model, config, engine, seed)
    object.__setattr__(model, "_dp_privacy_state", state)
    object.__setattr__(model, "train_step", dp_train_step.__get__(model))
    object.__setattr__(model, "make_train_function", make_train_function.__get__(model))
    object.__setattr__(model, "_symbolic_build", _symbolic_build.__get__(model))
    return state


def _symbolic_build(self, iterator=None, data_batch=None):
    """Keras' ``_symbolic_build`` with the DP mask/rate (third slot of a Poisson batch) dropped:
    on JAX it would otherwise be taken for a ``sample_weight`` when the compiled loss and
    metrics are built."""
    unbuilt = (
        not all(layer.built for layer in self._flatten_layers())
        or (self._compile_metrics is not None and not self._compile_metrics.built)
        or (self._compile_loss is not None and not self._compile_loss.built)
    )
    if unbuilt and data_batch is None and iterator is not None:
        for _, _, data_or_iterator in iterator:
            if isinstance(data_or_iterator, (list, tuple)):
                data_batch = data_or_iterator[0]
            else:
                data_batch = next(data_or_iterator)
            break
    if data_batch is not None:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
        if isinstance(sample_weight, dict) and MASK_KEY in sample_weight:
            data_batch = (x, y)
    return type(self)._symbolic_build(self, data_batch=data_batch)


def make_train_function(self, force=False):
    """Keras' JAX ``make_train_function`` with a Python wrapper that counts every executed step."""
    if self.train_function is not None and not force:
        return self.train_function
    import jax

    step = self.train_step
    if not self.run_eagerly and self.jit_compile:
        step = jax.jit(step, donate_argnums=0)
    state = self._dp_privacy_state

    def counted_step(jax_state, data):
        # the DP step counter, as an array: one compiled function serves every step
        counter = np.uint32(state.steps_taken % (2**32))
        logs, jax_state = step(jax_state, data, counter)
        state.record_step(data, jax_state[0])
        return logs, jax_state

    self.train_function = self._make_function(counted_step)
    return self.train_function


def _noise_key(seed: int, counter):
    """Step ``counter``'s noise key: (seed, NOISE_STREAM, counter) folded into one key."""
    import jax

    key = jax.random.PRNGKey(seed % (2**32))
    key = jax.random.fold_in(key, (seed >> 32) % (2**31))
    key = jax.random.fold_in(key, NOISE_STREAM)
    return jax.random.fold_in(key, counter)


#: Stream number of the noise (as in the TensorFlow step).
NOISE_STREAM = 0


def dp_train_step(self, state, data, noise_counter):
    import jax
    import jax.numpy as jnp

    dp = self._dp_privacy_state
    cfg = dp.config
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    mask, _, _ = parse_sample_weight(sample_weight)
    b = _flatten(x)[0].shape[0]
    if mask is None:
        maskf = jnp.ones((b,), jnp.float32)
        denominator = float(b)
    else:
        maskf = jnp.asarray(mask).astype(jnp.float32)
        denominator = float(cfg.batch_size)

    grad_sum, losses, y_pred, _, seeds = dp.engine.clipped_sum(
        trainable, non_trainable, x, y, maskf, cfg.l2_norm_clip
    )

    # Gaussian noise N(0, (sigma C)^2) per coordinate on the sum; the key depends on the seed
    # and on the DP state's own step counter, so every step draws fresh noise.
    std = cfg.noise_multiplier * cfg.l2_norm_clip
    if std > 0:
        keys = jax.random.split(_noise_key(dp.seed, noise_counter), len(grad_sum))
        grads = [
            (g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)) / denominator
            for g, k in zip(grad_sum, keys)
        ]
    else:
        grads = [g / denominator for g in grad_sum]

    # Data-independent weight regularization: exact gradient, no clipping, no privacy cost.
    variables = self.trainable_variables
    regularized = [i for i, v in enumerate(variables) if getattr(v, "regularizer", None) is not None]
    reg_loss = jnp.float32(0.0)
    if regularized:

        def penalty(values):
            return sum(jnp.asarray(variables[i].regularizer(t), jnp.float32) for i, t in zip(regularized, values))

        reg_loss, reg_grads = jax.value_and_grad(penalty)([trainable[i] for i in regularized])
        for i, g in zip(regularized, reg_grads):
            grads[i] = grads[i] + g.astype(grads[i].dtype)

    trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)

    non_trainable = list(non_trainable)
    for k, new in zip(dp.engine.seed_state_index, seeds):
        non_trainable[k] = new

    # Logged loss/metrics use the private data directly (not covered by the guarantee);
    # padded rows have weight 0.
    n_real = jnp.sum(maskf)
    mean_loss = jnp.sum(losses * maskf) / jnp.maximum(n_real, 1.0) + reg_loss
    with keras.StatelessScope(state_mapping=list(zip(self.metrics_variables, metrics_vars))) as scope:
        self._loss_tracker.update_state(mean_loss, sample_weight=n_real)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=maskf)
    new_metrics = []
    for ref, value in zip(self.metrics_variables, metrics_vars):
        current = scope.get_current_value(ref)
        new_metrics.append(value if current is None else current)
    return logs, (trainable, non_trainable, optimizer_vars, new_metrics)


def _engine_and_inputs(model, x, y, loss_fn, microbatch_size):
    """A one-off engine for ``model`` and its current weights, with ``x``/``y`` as JAX arrays."""
    import jax.numpy as jnp


    engine = JaxPerExampleGradients(model, resolve_loss_fn(model, loss_fn), microbatch_size=microbatch_size)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    x = keras.tree.map_structure(jnp.asarray, x)
    y = keras.tree.map_structure(jnp.asarray, y)
    return engine, trainable, non_trainable, x, y


def per_example_gradients(model, x, y, loss_fn=None, microbatch_size=None):
    """Stacked per-example gradients at the model's current weights (JAX backend)."""
    engine, trainable, non_trainable, x, y = _engine_and_inputs(model, x, y, loss_fn, microbatch_size)
    grads, _, _, _ = engine.per_example(trainable, non_trainable, x, y)
    return grads


def clipped_sum(model, x, y, l2_norm_clip, mask=None, loss_fn=None, microbatch_size=None):
    """``(sum_i mask_i clip(g_i), per-example norms)`` at the current weights (JAX backend)."""
    import jax.numpy as jnp

    engine, trainable, non_trainable, x, y = _engine_and_inputs(model, x, y, loss_fn, microbatch_size)
    b = _flatten(x)[0].shape[0]
    maskf = jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    sums, _, _, norms, _ = engine.clipped_sum(trainable, non_trainable, x, y, maskf, float(l2_norm_clip))
    return sums, norms
