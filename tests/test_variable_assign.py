"""`variable_assign.HostAssigner`: drawn arrays become the variables' values exactly, on every backend;
on TensorFlow an aligned array is handed over without a copy, and never to two variables."""

import keras
import numpy as np
import pytest

from autoinit_tf import distributions
from autoinit_tf.variable_assign import HostAssigner


def _drawn(shape, seed=0):
    return distributions.sample(shape, 0.5, "truncated_normal", np.random.default_rng(seed))


def test_sample_returns_aligned_arrays():
    for shape in [(3,), (7, 5), (1 << 21,)]:
        assert _drawn(shape).ctypes.data % distributions.ALIGNMENT == 0


def test_assigned_values_equal_the_array_bit_for_bit():
    v = keras.Variable(np.zeros((64, 32), np.float32))
    a = _drawn((64, 32))
    expected = a.copy()
    HostAssigner().assign(v, a)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected)


def test_one_buffer_is_never_shared_by_two_variables():
    """The same array assigned to two variables: training one must not move the other."""
    v, w = keras.Variable(np.zeros((16, 8), np.float32)), keras.Variable(np.zeros((16, 8), np.float32))
    a = _drawn((16, 8))
    expected = a.copy()
    host = HostAssigner()
    host.assign(v, a)
    host.assign(w, a)
    v.assign_add(np.ones((16, 8), np.float32))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected + 1.0)


def test_unaligned_and_strided_arrays_take_the_copying_path():
    v = keras.Variable(np.zeros((10,), np.float32))
    base = _drawn((41,))
    for a in (base[1:11], base[::4][:10]):
        expected = a.copy()
        HostAssigner().assign(v, a)
        base[:] += 1.0  # the caller's buffer stays its own: the variable does not follow it
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the zero-copy hand-over is TensorFlow's")
def test_tensorflow_takes_the_buffer_and_numpy_can_no_longer_write_it():
    v = keras.Variable(np.zeros((256, 128), np.float32))
    a = _drawn((256, 128))
    HostAssigner().assign(v, a)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    expected = np.array(a)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected)
    v.assign_add(np.ones((256, 128), np.float32))  # the variable trains on as usual
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected + 1.0)
