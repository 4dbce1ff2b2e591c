"""BYOL's two asymmetric augmentation pipelines, built from Keras preprocessing layers and `keras.ops`.

View 1 / view 2 (Grill et al. 2020, appendix B): random resized crop (area 0.08-1, aspect ratio 3/4-4/3) and
horizontal flip; colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with probability 0.8;
grayscale with probability 0.2; Gaussian blur (sigma in [0.1, 2], kernel about 10% of the image) with
probability 1.0 / 0.1; solarization with probability 0 / 0.2. Images with one channel skip saturation, hue and
grayscale. Keras' colour-jitter factors are Keras' (brightness additive over the value range), not
torchvision's; the probabilities and ranges are the paper's.
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = ["RandomResizedCrop", "RandomApply", "byol_augmentation", "VIEW_PRESETS"]

VIEW_PRESETS = {
    1: dict(jitter=0.8, grayscale=0.2, blur=1.0, solarize=0.0),
    2: dict(jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2),
}


@keras.saving.register_keras_serializable(package="autoinit_tf")
class RandomResizedCrop(keras.layers.Layer):
    """A random crop of area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resized back to the
    input size (bilinear), one crop per example; identity outside training."""

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=None, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = ops.shape(images)
        batch = shape[0]
        height, width = float(images.shape[1]), float(images.shape[2])
        area = keras.random.uniform((batch,), *self.scale, seed=self.generator)
        log_ratio = keras.random.uniform((batch,), math.log(self.ratio[0]), math.log(self.ratio[1]),
                                         seed=self.generator)
        aspect = ops.exp(log_ratio)
        # crop size as fractions of the image, clipped to the image (the few impossible draws shrink)
        frac_w = ops.minimum(ops.sqrt(area * aspect), 1.0)
        frac_h = ops.minimum(ops.sqrt(area / aspect), 1.0)
        x0 = keras.random.uniform((batch,), seed=self.generator) * (1.0 - frac_w) * width
        y0 = keras.random.uniform((batch,), seed=self.generator) * (1.0 - frac_h) * height
        zeros = ops.zeros_like(frac_w)
        # output pixel (x, y) reads input (frac_w x + x0, frac_h y + y0)
        transform = ops.stack([frac_w, zeros, x0, zeros, frac_h, y0, zeros, zeros], axis=1)
        out = ops.image.affine_transform(ops.cast(images, "float32"), transform, interpolation="bilinear",
                                         fill_mode="nearest")
        return ops.cast(out, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "ratio": self.ratio, "seed": self.seed}


@keras.saving.register_keras_serializable(package="autoinit_tf")
class RandomApply(keras.layers.Layer):
    """``layer(x)`` for each example with probability `rate`, else ``x`` (one draw per example)."""

    def __init__(self, layer, rate=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.layer, self.rate, self.seed = layer, float(rate), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training or self.rate <= 0.0:
            return images
        if self.rate >= 1.0:
            return self.layer(images, training=True)
        keep = keras.random.uniform((ops.shape(images)[0],), seed=self.generator) < self.rate
        keep = ops.reshape(keep, (-1,) + (1,) * (len(images.shape) - 1))
        return ops.where(keep, ops.cast(self.layer(images, training=True), images.dtype), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer), "rate": self.rate,
                "seed": self.seed}


def byol_augmentation(view, image_shape, value_range=(0.0, 1.0), seed=None, crop_scale=(0.08, 1.0)):
    """The augmentation pipeline of BYOL view 1 or 2 (module docstring) as a `keras.Sequential`."""
    if view not in VIEW_PRESETS:
        raise ValueError(f"view must be 1 or 2, got {view!r}.")
    preset = VIEW_PRESETS[view]
    height, width, channels = image_shape
    seed = None if seed is None else int(seed) * 10 + view
    stage = [RandomResizedCrop(scale=crop_scale, seed=seed), keras.layers.RandomFlip("horizontal", seed=seed)]
    color = channels == 3
    jitter = keras.layers.RandomColorJitter(value_range=value_range, brightness_factor=0.4, contrast_factor=0.4,
                                            saturation_factor=0.2 if color else None,
                                            hue_factor=0.1 if color else None, seed=seed)
    stage.append(RandomApply(jitter, preset["jitter"], seed=seed))
    if color and preset["grayscale"]:
        stage.append(keras.layers.RandomGrayscale(factor=preset["grayscale"], seed=seed))
    kernel = max(3, int(round(0.1 * min(height, width))) | 1)  # odd, about 10% of the image
    if preset["blur"]:
        stage.append(keras.layers.RandomGaussianBlur(factor=preset["blur"], kernel_size=kernel, sigma=(0.1, 2.0),
                                                     value_range=value_range, seed=seed))
    if preset["solarize"]:
        solarize = keras.layers.Solarization(threshold_factor=(0.5, 0.5), value_range=value_range, seed=seed)
        stage.append(RandomApply(solarize, preset["solarize"], seed=seed))
    return keras.Sequential(stage, name=f"byol_view{view}")
