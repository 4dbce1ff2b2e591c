"""tf.distribute helpers for `wrap` / `calibrate` (TensorFlow backend only; no-ops elsewhere).

Facts these helpers rely on (see docs/distributed.md):

* Assigning a value to a `MirroredVariable` from *cross-replica* context (inside ``strategy.scope()`` or
  outside any scope) updates every local replica; assigning inside ``strategy.run`` (replica context)
  can silently leave replicas different. `check_assign_context` refuses the latter.
* With `MultiWorkerMirroredStrategy`, a cross-replica assignment is *local to each worker*. Every worker
  must therefore compute the same weights: with ``seed=None`` each worker would draw its own. 
  `consensus_seed` makes worker 0 choose the seed and broadcasts it (through the variable-creation
  broadcast MultiWorkerMirroredStrategy already does for initial values).

On the JAX backend, `keras.distribution` (DataParallel / ModelParallel) needs nothing: `assign` keeps each
variable's layout.
"""

from __future__ import annotations

import sys

__all__ = ["active_strategy", "check_assign_context", "consensus_seed", "num_workers"]


def _tf():
    """TensorFlow, only when the TF backend is in use and TF is already imported (never imports it)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    return sys.modules.get("tensorflow")


def active_strategy(model=None):
    """The tf.distribute strategy in effect (the current scope, else the model's), or None."""
    tf = _tf()
    if tf is None:
        return None
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    return getattr(model, "_distribute_strategy", None) if model is not None else None


def num_workers(strategy) -> int:
    if strategy is None:
        return 1
    extended = getattr(strategy, "extended", None)
    n = getattr(extended, "_num_workers", None)
    if n is None:
        resolver = getattr(strategy, "cluster_resolver", None)
        spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
        n = sum(len(v) for k, v in spec.items() if k in ("chief", "worker")) or 1
    return int(n)


def check_assign_context(what="autoinit_tf.wrap"):
    """Raise if called in a tf.distribute replica context (inside ``strategy.run``)."""
    tf = _tf()
    if tf is None:
        return
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        raise RuntimeError(
            f"{what} was called in a tf.distribute replica context (inside strategy.run or a per-replica "
            "function). Weights must be assigned from cross-replica context, where every replica receives "
            "the same value: call it inside `with strategy.scope():` (or outside any scope), before fit."
        )


def consensus_seed(seed, model=None):
    """`seed` unchanged, except ``None`` under a multi-worker strategy: a seed chosen by worker 0."""
    if seed is not None:
        return seed
    strategy = active_strategy(model)
    if strategy is None or num_workers(strategy) <= 1:
        return seed
    tf = _tf()
    import numpy as np

    proposal = int(np.random.default_rng().integers(0, 2**31 - 1))
    with strategy.scope():
        # MultiWorkerMirroredStrategy broadcasts initial values from worker 0 to all workers.
        var = tf.Variable(float(proposal), dtype=tf.float64, trainable=False,
                          name="autoinit_consensus_seed")
    return int(var.numpy())
