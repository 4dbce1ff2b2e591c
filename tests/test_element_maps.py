"""The NumPy convolution of element maps against the backend's own convolution."""

import keras
import numpy as np
import pytest

from autoinit_tf.rules.element_maps import correlate_maps

CASES = [
    ((17, 13, 5), (3, 3), (1, 1), "same", (1, 1)),
    ((17, 13, 5), (3, 3), (2, 2), "same", (1, 1)),
    ((16, 16, 4), (7, 7), (2, 2), "same", (1, 1)),
    ((16, 15, 4), (2, 3), (2, 1), "valid", (1, 1)),
    ((20, 20, 3), (3, 3), (1, 1), "same", (2, 2)),
    ((9, 9, 6), (1, 1), (1, 1), "same", (1, 1)),
    ((10, 10, 6), (1, 1), (2, 2), "valid", (1, 1)),
    ((11, 9, 6), (1, 1), (2, 2), "same", (1, 1)),  # odd sizes: the last strided position is read
    ((11, 9, 6), (1, 1), (3, 2), "valid", (1, 1)),
    ((19, 3), (1,), (2,), "same", (1,)),
    ((19, 3), (5,), (2,), "same", (1,)),
    ((19, 3), (3,), (1,), "valid", (2,)),
]


@pytest.mark.core
@pytest.mark.parametrize("shape,taps,strides,padding,dilation", CASES)
def test_correlate_maps_matches_the_backend_convolution(shape, taps, strides, padding, dilation, monkeypatch):
    from autoinit_tf.rules import element_maps

    monkeypatch.setattr(element_maps, "PATCH_BLOCK", 64)  # several blocks of output rows
    rng = np.random.default_rng(len(shape) * 7 + taps[0])
    x = rng.standard_normal(shape).astype("float32")
    w = rng.standard_normal(taps + (shape[-1], 7)).astype("float32")
    ref = np.asarray(keras.ops.convert_to_numpy(
        keras.ops.conv(x[None], w, strides=strides, padding=padding, dilation_rate=dilation)))[0]
    got = correlate_maps(x, w, strides=strides, padding=padding, dilation=dilation)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.core
def test_dense_maps_against_a_float64_reference():
    """Element maps through a position-wise Dense in float32 (blocks of the squared kernel: 2048 inputs give
    512 units per block, 1100 units three blocks) against mean @ W + b and var @ W^2 in float64."""
    from autoinit_tf.moments import Moments
    from autoinit_tf.rules.element_maps import dense_maps

    rng = np.random.default_rng(3)
    mean = rng.standard_normal((3, 4, 2048))
    var = rng.uniform(0.1, 2.0, (3, 4, 2048))
    w = (rng.standard_normal((2048, 1100)) / 45.0).astype("float32")
    b = rng.standard_normal(1100)
    out = dense_maps(Moments.from_elements(mean, var), (None, 3, 4, 2048), w, b)
    w64 = w.astype(np.float64)
    np.testing.assert_allclose(out.el_mean, mean @ w64 + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.el_var, var @ (w64 * w64), rtol=1e-5)
    assert out.el_mean.shape == (3, 4, 1100) and out.el_var.dtype == np.float64
