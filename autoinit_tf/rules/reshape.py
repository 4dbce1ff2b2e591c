"""Shape rules: value-copying layers pass the moments through; zero padding mixes in zeros.

With a kept fraction k of real entries (ZeroPadding: k = input size / output size):
mean k mu, E[y^2] = k E[x^2]. Bilinear upsampling averages neighbours, which lowers the variance;
it is linear, so its output moments come from the layer itself on a short deterministic probe.
"""

from __future__ import annotations

import keras
import numpy as np

from autoinit_tf.moments import Moments
from autoinit_tf.rules.registry import register_rule

L = keras.layers


def _identity(ctx):
    n = len(ctx.node.outputs)
    return ctx.inputs[0] if n == 1 else [ctx.inputs[0]] * n


_PASS = [L.Identity, L.Reshape, L.Flatten, L.Permute, L.RepeatVector, L.Cropping1D, L.Cropping2D, L.Cropping3D,
         L.UpSampling1D, L.UpSampling3D, L.Masking, L.InputLayer]
for _cls in _PASS:
    register_rule(_cls, _identity)


@register_rule(L.UpSampling2D)
def upsampling2d_rule(ctx):
    if ctx.layer.interpolation == "nearest":
        return ctx.input
    return ctx.probe()


def _zero_padding_rule(ctx):
    n_in = ctx.input_shapes[0][1:]
    n_out = ctx.output_shapes[0][1:]
    if any(d is None for d in n_in) or any(d is None for d in n_out):
        return ctx.input
    k = float(np.prod(n_in)) / float(np.prod(n_out))
    m = ctx.input
    return Moments.from_second(k * m.mean, k * m.second, k * m.between)


for _cls in (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D):
    register_rule(_cls, _zero_padding_rule)
