"""Batched stateless augmentations for augmentation multiplicity (TensorFlow, XLA-friendly)."""

from __future__ import annotations


def random_flip_and_crop(padding: int = 4, flip: bool = True):
    """``augment(x, seed)`` for NHWC images: reflect-pad by ``padding``, random crop back to the
    original size, random horizontal flip (the CIFAR recipe of De et al.); one independent draw per image.

    The flips and the crop offsets come from two streams folded out of ``seed``
    (``stateless_fold_in(seed, 0)`` and ``(seed, 1)``), so neither repeats the other, nor
    any stream that merely adds to ``seed``. The DP step hands ``augment`` a seed of its own
    stream, independent of the noise's."""
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}.")
    padding = int(padding)

    def augment(x, seed):
        import tensorflow as tf

        seed = tf.cast(seed, tf.int64)
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 0)
        crop_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        b = tf.shape(x)[0]
        h, w = x.shape[1], x.shape[2]
        out = x
        if flip:
            coin = tf.random.stateless_uniform([b], seed=flip_seed) < 0.5
            out = tf.where(tf.reshape(coin, [-1, 1, 1, 1]), tf.reverse(out, axis=[2]), out)
        if padding:
            padded = tf.pad(out, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
            offs = tf.random.stateless_uniform(
                [b, 2], seed=crop_seed, maxval=2 * padding + 1, dtype=tf.int32
            )
            rows = offs[:, :1] + tf.range(h)[None, :]
            cols = offs[:, 1:] + tf.range(w)[None, :]
            out = tf.gather(padded, rows, axis=1, batch_dims=1)
            out = tf.gather(out, cols, axis=2, batch_dims=1)
        return out

    return augment
