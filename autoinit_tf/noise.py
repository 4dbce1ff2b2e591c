"""Oversampling with pure noise (OPeN) and DAR-BN (Zada, Benou & Irani, ICML 2022).

From `start_epoch` on, each epoch samples classes uniformly (class-balanced oversampling: every drawn example
is a uniformly chosen class, then a uniformly chosen example of it) and replaces each drawn example of class c
by a pure-noise image with probability

    p_c = delta * (1 - n_c / n_max)          (delta = 1/3; n_c the class's training count)

keeping its label c. A noise image is i.i.d. per pixel and channel ~ N(mu_ch, sigma_ch), the training data's
per-channel mean and standard deviation, clipped to the data's range. Each batch comes with a per-example
noise mask (1 = noise) that the model's DARBatchNormalization layers route on: ``rewrite(model,
["bn->darbn"])`` (or `setup_pure_noise`, which does both) adds the mask as a second model input. Before
`start_epoch` the epoch is an ordinary shuffled pass with an all-zero mask (deferred oversampling).

Batches are ``((images, noise_mask), labels)``, as a `keras.utils.PyDataset` (`PureNoiseSequence`) or a
``tf.data.Dataset`` (`pure_noise_dataset(..., as_tf_data=True)`).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from autoinit_tf.rewrite import rewrite

__all__ = ["NoiseStatistics", "noise_statistics", "replacement_probabilities", "OPeNSampler", "PureNoiseSequence",
           "pure_noise_dataset", "setup_pure_noise", "DEFAULT_DELTA"]

DEFAULT_DELTA = 1.0 / 3.0


@dataclasses.dataclass
class NoiseStatistics:
    """Per-channel mean and standard deviation of the training images, and their value range."""

    mean: np.ndarray
    std: np.ndarray
    low: float
    high: float


def noise_statistics(x) -> NoiseStatistics:
    """The statistics pure-noise images are drawn with, from the training images `x` (channels last)."""
    x = np.asarray(x)
    axes = tuple(range(x.ndim - 1))
    return NoiseStatistics(mean=x.mean(axis=axes, dtype=np.float64), std=x.std(axis=axes, dtype=np.float64),
                           low=float(x.min()), high=float(x.max()))


def replacement_probabilities(y, delta=DEFAULT_DELTA, num_classes=None) -> np.ndarray:
    """p_c = delta * (1 - n_c / n_max) for every class c (0 for classes without examples)."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}.")
    y = np.asarray(y).astype(int).ravel()
    counts = np.bincount(y, minlength=num_classes or 0).astype(np.float64)
    p = delta * (1.0 - counts / counts.max())
    return np.where(counts > 0, p, 0.0)


class OPeNSampler:
    """The epochs of OPeN as index arrays and noise masks; `batch` materializes a batch (module docstring)."""

    def __init__(self, x, y, batch_size, *, delta=DEFAULT_DELTA, start_epoch=0, seed=None, stats=None):
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        labels = self.y.astype(int).ravel() if self.y.ndim == 1 or self.y.shape[-1] == 1 else self.y.argmax(-1)
        if len(labels) != len(self.x):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(labels)}.")
        self.labels = labels
        self.batch_size = int(batch_size)
        self.start_epoch = int(start_epoch)
        self.p = replacement_probabilities(labels, delta)
        self.stats = stats or noise_statistics(self.x)
        self.classes = np.flatnonzero(np.bincount(labels) > 0)
        self.members = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.seed = seed
        self.order, self.mask = None, None
        self.set_epoch(0)

    def set_epoch(self, epoch):
        """Draw epoch `epoch`'s examples and noise mask (deterministic given the seed and the epoch)."""
        self.epoch = int(epoch)
        rng = np.random.default_rng(None if self.seed is None else [int(self.seed), self.epoch])
        n = len(self.labels)
        if self.epoch < self.start_epoch:
            self.order, self.mask = rng.permutation(n), np.zeros(n, np.float32)
        else:
            classes = rng.choice(self.classes, size=n)
            order = np.empty(n, np.int64)
            for c in self.classes:
                where = np.flatnonzero(classes == c)
                order[where] = rng.choice(self.members[c], size=len(where))
            self.order = order
            self.mask = (rng.random(n) < self.p[self.labels[order]]).astype(np.float32)
        self._rng = rng

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def batch(self, i):
        index = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        mask = self.mask[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.x[index].astype(np.float32, copy=True)
        noisy = np.flatnonzero(mask)
        if len(noisy):
            rng = np.random.default_rng(None if self.seed is None else [int(self.seed), self.epoch, i])
            shape = (len(noisy),) + images.shape[1:]
            noise = rng.normal(size=shape) * self.stats.std + self.stats.mean
            images[noisy] = np.clip(noise, self.stats.low, self.stats.high)
        return (images, mask.reshape(-1, 1)), self.y[index]


class PureNoiseSequence(keras.utils.PyDataset):
    """OPeN batches ``((images, noise_mask), labels)`` for `model.fit`; the epoch advances at each epoch end."""

    def __init__(self, x, y, batch_size=128, *, delta=DEFAULT_DELTA, start_epoch=0, seed=None, stats=None,
                 with_mask=True, **kwargs):
        super().__init__(**kwargs)
        self.sampler = OPeNSampler(x, y, batch_size, delta=delta, start_epoch=start_epoch, seed=seed, stats=stats)
        # with_mask=False (and delta=0): plain deferred class-balanced oversampling for a model without DAR-BN
        if not with_mask and delta:
            raise ValueError("with_mask=False is only for delta=0 (no noise images): the mask is what routes them.")
        self.with_mask = bool(with_mask)

    def __len__(self):
        return len(self.sampler)

    def __getitem__(self, i):
        (images, mask), labels = self.sampler.batch(i)
        return ((images, mask), labels) if self.with_mask else (images, labels)

    def on_epoch_end(self):
        self.sampler.set_epoch(self.sampler.epoch + 1)


def pure_noise_dataset(x, y, batch_size=128, *, delta=DEFAULT_DELTA, start_epoch=0, seed=None, stats=None,
                       as_tf_data=False):
    """OPeN batches as a `PureNoiseSequence` (default) or a ``tf.data.Dataset`` (each iteration is one epoch)."""
    if not as_tf_data:
        return PureNoiseSequence(x, y, batch_size, delta=delta, start_epoch=start_epoch, seed=seed, stats=stats)
    import tensorflow as tf

    sampler = OPeNSampler(x, y, batch_size, delta=delta, start_epoch=start_epoch, seed=seed, stats=stats)
    epochs = {"next": 0}

    def generate():
        sampler.set_epoch(epochs["next"])
        epochs["next"] += 1
        for i in range(len(sampler)):
            yield sampler.batch(i)

    (img, mask), lab = sampler.batch(0)
    spec = ((tf.TensorSpec((None,) + img.shape[1:], tf.float32), tf.TensorSpec((None, 1), tf.float32)),
            tf.TensorSpec((None,) + lab.shape[1:], tf.as_dtype(lab.dtype)))
    return tf.data.Dataset.from_generator(generate, output_signature=spec)


def setup_pure_noise(model, x, y, batch_size=128, *, delta=DEFAULT_DELTA, start_epoch=0, seed=None,
                     as_tf_data=False):
    """One call: ``(model with every BatchNormalization turned into DARBatchNormalization routed by a new
    'noise_mask' input, OPeN batches for it)``. The model is rewritten (`rewrite(model, ["bn->darbn"])`: weights
    kept, compiled like the original when it was); the original is not modified."""
    new = rewrite(model, ["bn->darbn"])
    data = pure_noise_dataset(x, y, batch_size, delta=delta, start_epoch=start_epoch, seed=seed, as_tf_data=as_tf_data)
    return new, data
