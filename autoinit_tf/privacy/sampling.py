"""Poisson sampling for DP-SGD, padded to a fixed shape so the train step compiles once.

Each step, every example joins the batch independently with probability
``q = batch_size / dataset_size`` (so batch sizes vary, an example can appear
in several steps of an epoch or in none). This is the sampling that the
privacy accountants assume. Every batch carries a boolean mask and the
sampling rate. Two layouts (``padding``):

* ``"auto"`` (default): padded up to the next multiple of ``k``, the largest power of two
  <= the batch-size standard deviation ``sqrt(L (1 - q))`` (8 at L = 256, 32 at L = 2048):
  about a dozen distinct shapes over a run (kernels cached per shape are reused) and on
  average ``k / 2`` wasted rows (about ``1 / (2 sqrt(L))`` of the work). The dataset's leading
  dimension is unknown, so Keras traces the train step once for any size; the batch is
  exactly the Poisson batch (never truncated). Right for the default ``"direct"`` engine,
  which runs without XLA.
* ``"none"``: the batch has its real size (no wasted row, but a new shape at almost every
  step).
* ``"max"``: padded with zero rows up to a fixed ``max_batch_size`` (exceeded with
  probability <= 1e-9 per step), one static shape. For XLA-compiled steps
  (``per_example_method="vectorized_map"`` with ``jit_compile=True``), which would
  otherwise compile once per distinct batch size. Padded rows cost a full forward and
  backward pass (``max_batch_size / batch_size`` times the expected work).
* an integer ``k``: padded up to the next multiple of ``k`` (a few static shapes).

The DP train step gives padded rows exactly zero weight (no gradient, no loss, no
metric contribution).
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np

from autoinit_tf.privacy.accounting import check_sampling_rate, steps_per_epoch as _steps_per_epoch

logger = logging.getLogger(__name__)

#: Key of the mask in the third (sample-weight) slot of every Poisson batch.
MASK_KEY = "dp_poisson_mask"
#: Key of the sampling rate in the third slot of every Poisson batch.
RATE_KEY = "dp_sampling_rate"
#: Key of the truncation flag (``padding="max"`` cut the batch to ``max_batch_size``).
TRUNCATED_KEY = "dp_truncated"


def default_max_batch_size(dataset_size: int, sampling_rate: float, overflow_probability: float = 1e-9) -> int:
    """Smallest padded size that a Binomial(N, q) batch exceeds with probability <= ``overflow_probability``."""
    from scipy import stats

    n, q = int(dataset_size), float(sampling_rate)
    if q >= 1.0:
        return n
    bound = int(stats.binom.isf(overflow_probability, n, q)) + 1
    return int(min(n, max(bound, 1)))


def auto_padding_multiple(batch_size: int, dataset_size: int) -> int:
    """``padding="auto"``: the largest power of two <= the batch-size std ``sqrt(L (1 - q))`` (>= 1)."""
    q = batch_size / dataset_size
    std = math.sqrt(batch_size * (1.0 - q))
    return 1 if std < 2 else 2 ** int(math.floor(math.log2(std)))


class PoissonSampler:
    """Draws Poisson-sampled index sets (numpy only; no TensorFlow needed).

    Args:
        dataset_size: number of examples N.
        batch_size: expected batch size L; the sampling rate is ``q = L / N``.
        seed: seed of the numpy generator (``None``: fresh OS entropy).
        max_batch_size: padded size; default: exceeded with probability <= 1e-9 per step.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed=None, max_batch_size: int | None = None):
        dataset_size, batch_size = int(dataset_size), int(batch_size)
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}.")
        if batch_size > dataset_size:
            raise ValueError(
                f"batch_size ({batch_size}) is larger than the data set ({dataset_size} examples)."
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.sampling_rate = check_sampling_rate(batch_size / dataset_size)
        if max_batch_size is None:
            max_batch_size = default_max_batch_size(dataset_size, self.sampling_rate)
        if not (batch_size <= int(max_batch_size) <= dataset_size):
            raise ValueError(
                f"max_batch_size must be between batch_size ({batch_size}) and the data set size "
                f"({dataset_size}), got {max_batch_size}."
            )
        self.max_batch_size = int(max_batch_size)
        self.rng = np.random.default_rng(seed)
        self.overflows = 0
        self.last_truncated = False

    def sample(self, truncate: bool = True) -> np.ndarray:
        """Indices of one Poisson batch (sorted; with ``truncate``, length <= max_batch_size)."""
        chosen = np.flatnonzero(self.rng.random(self.dataset_size) < self.sampling_rate)
        if truncate and len(chosen) > self.max_batch_size:
            # Probability <= the overflow probability the padded size was chosen for. The batch
            # carries the flag, and the privacy statement then claims no guarantee.
            self.overflows += 1
            logger.warning(
                "Poisson batch of %d examples exceeds max_batch_size=%d; keeping a uniform random "
                "subset: the accountant does not cover this step, and the privacy statement will "
                "say so (raise max_batch_size, or use padding='auto').",
                len(chosen), self.max_batch_size,
            )
            chosen = np.sort(self.rng.choice(chosen, self.max_batch_size, replace=False))
            self.last_truncated = True
        else:
            self.last_truncated = False
        return chosen

    def padded_indices(self):
        """``(indices, mask, truncated)`` of fixed length max_batch_size; padded slots point at row 0
        and are masked; ``truncated`` says the Poisson batch was cut to max_batch_size."""
        chosen = self.sample()
        idx = np.zeros(self.max_batch_size, dtype=np.int64)
        idx[: len(chosen)] = chosen
        mask = np.zeros(self.max_batch_size, dtype=bool)
        mask[: len(chosen)] = True
        return idx, mask, np.bool_(self.last_truncated)


def poisson_batches(
    x,
    y,
    batch_size: int,
    seed=None,
    steps_per_epoch: int | None = None,
    max_batch_size: int | None = None,
    padding="auto",
):
    """A ``tf.data.Dataset`` of Poisson-sampled, masked batches for ``model.fit``.

    Every element is ``(x_batch, y_batch, {"dp_poisson_mask": mask, "dp_sampling_rate": q,
    "dp_truncated": flag})``.
    The real rows come first (mask True), then zero rows (mask False) up to the padded size:
    with ``padding="auto"`` (default) the next multiple of a small power of two (see the
    module docstring), with an integer ``k`` the next multiple of ``k``, with ``"none"`` no
    padding (the real Poisson size), with ``"max"`` the fixed ``max_batch_size`` (one static
    shape, for XLA-compiled steps). Except with ``"max"`` the leading dimension is unknown to
    the dataset and the batch is never truncated. The DP train step installed by
    :func:`autoinit_tf.privacy.make_private` reads the mask (padded rows contribute
    exactly nothing) and the rate (checked against the one it was configured for).

    Args:
        x, y: arrays (or nested tuples/dicts of arrays) with the same first dimension N.
        batch_size: expected batch size L (sampling rate q = L / N); it is also the
            denominator of the noisy mean gradient.
        seed: numpy seed for the sampler; successive epochs continue the same stream.
        steps_per_epoch: batches per pass; default ``ceil(N / L)``.
        max_batch_size: padded size for ``padding="max"``; default exceeded with probability
            <= 1e-9 per step (a larger batch is cut to it, with a warning, and the batch's
            ``dp_truncated`` flag makes the privacy statement claim no guarantee). Not used otherwise.
        padding: ``"auto"``, ``"none"``, ``"max"`` or a positive integer ``k`` (see above).
    """
    import tensorflow as tf

    if padding not in ("auto", "none", "max") and not (
        isinstance(padding, (int, np.integer)) and not isinstance(padding, bool) and padding > 0
    ):
        raise ValueError(f'padding must be "auto", "none", "max" or a positive integer, got {padding!r}.')

    if y is None:
        raise ValueError("poisson_batches needs targets y (the DP train step is supervised).")
    x_flat = [np.asarray(a) for a in keras.tree.flatten(x)]
    y_flat = [np.asarray(a) for a in keras.tree.flatten(y)]
    sizes = {len(a) for a in x_flat + y_flat}
    if len(sizes) != 1:
        raise ValueError(f"x and y must have the same number of examples, got sizes {sorted(sizes)}.")
    n = sizes.pop()
    sampler = PoissonSampler(n, batch_size, seed=seed, max_batch_size=max_batch_size)
    steps = _steps_per_epoch(n, batch_size) if steps_per_epoch is None else int(steps_per_epoch)
    if steps <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}.")
    m = sampler.max_batch_size
    q = np.float64(sampler.sampling_rate)

    lead = m if padding == "max" else None
    if padding == "auto":
        padding = auto_padding_multiple(batch_size, n)

    # Only the indices come from Python (a few KB per step); the rows are gathered by a
    # tf.data map (C++), so the per-step Python work stays small next to the train step.
    def indices():
        for _ in range(steps):
            if padding == "max":
                yield sampler.padded_indices()
                continue
            chosen = sampler.sample(truncate=False)
            k = len(chosen)
            # An empty Poisson batch (possible, rarely) becomes one masked zero row.
            rows = max(k, 1) if padding == "none" else max(int(padding), -(-k // int(padding)) * int(padding))
            idx = np.zeros(rows, dtype=np.int64)
            idx[:k] = chosen
            mask = np.zeros(rows, dtype=bool)
            mask[:k] = True
            yield idx, mask, np.bool_(False)

    x_const = [tf.constant(a) for a in x_flat]
    y_const = [tf.constant(a) for a in y_flat]
    rate = tf.constant(q, tf.float64)

    def fetch(idx, mask, truncated):
        def take(a):
            rows = tf.gather(a, idx)
            keep = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([tf.rank(rows) - 1], tf.int32)], 0))
            return tf.where(keep, rows, tf.zeros_like(rows))  # padded rows are zeros

        xb = keras.tree.pack_sequence_as(x, [take(a) for a in x_const])
        yb = keras.tree.pack_sequence_as(y, [take(a) for a in y_const])
        return xb, yb, {MASK_KEY: mask, RATE_KEY: rate, TRUNCATED_KEY: truncated}

    signature = (tf.TensorSpec((lead,), tf.int64), tf.TensorSpec((lead,), tf.bool), tf.TensorSpec((), tf.bool))
    ds = tf.data.Dataset.from_generator(indices, output_signature=signature)
    ds = ds.map(fetch).apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)
    ds.dp_sampler = sampler  # plain attribute, for inspection; not part of the pipeline
    return ds
