"""Poisson sampler: inclusion rate, repeats across steps, padding and masks."""

import numpy as np
import pytest

from autoinit_tf import privacy
from autoinit_tf.privacy.sampling import MASK_KEY, RATE_KEY, default_max_batch_size


def test_inclusion_rate_and_batch_sizes():
    n, b, steps = 2000, 50, 80  # two "epochs"
    sampler = privacy.PoissonSampler(n, b, seed=0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        idx = sampler.sample()
        assert len(np.unique(idx)) == len(idx)  # at most once within a step
        counts[idx] += 1
        sizes.append(len(idx))
    q = b / n
    rate = counts.sum() / (n * steps)
    assert rate == pytest.approx(q, abs=4 * np.sqrt(q * (1 - q) / (n * steps)))
    # batch sizes vary like Binomial(n, q)
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.2)
    assert len(set(sizes)) > 10
    # across steps an example can appear 0 times or several times (Binomial(steps, q) counts)
    assert (counts == 0).any() and (counts >= 2).any()
    assert counts.var() == pytest.approx(steps * q * (1 - q), rel=0.15)


def test_seeded_and_epochs_continue_the_stream():
    x = np.arange(100, dtype="float32").reshape(100, 1)
    y = np.arange(100)
    ds = privacy.poisson_batches(x, y, batch_size=10, seed=1)
    first = [m[MASK_KEY].numpy().copy() for _, _, m in ds]
    second = [m[MASK_KEY].numpy().copy() for _, _, m in ds]
    assert len(first) == len(second) == 10
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    ds2 = privacy.poisson_batches(x, y, batch_size=10, seed=1)
    again = [m[MASK_KEY].numpy().copy() for _, _, m in ds2]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_padded_batches_fixed_shape_and_mask():
    n = 300
    x = np.random.default_rng(0).normal(size=(n, 4, 4, 1)).astype("float32") + 5.0
    y = np.arange(n)
    ds = privacy.poisson_batches(x, y, batch_size=30, seed=0, padding="max")
    m = default_max_batch_size(n, 0.1)
    assert 30 < m < n
    for xb, yb, extra in ds:
        mask = extra[MASK_KEY].numpy()
        assert xb.shape == (m, 4, 4, 1) and yb.shape == (m,) and mask.shape == (m,)
        assert float(extra[RATE_KEY]) == pytest.approx(0.1)
        k = mask.sum()
        assert mask[:k].all() and not mask[k:].any()
        assert np.all(xb.numpy()[~mask] == 0) and np.all(yb.numpy()[~mask] == 0)
        np.testing.assert_array_equal(xb.numpy()[mask], x[yb.numpy()[mask]])  # real rows are real examples


def test_overflow_keeps_padded_size(caplog):
    sampler = privacy.PoissonSampler(1000, 100, seed=0, max_batch_size=100)
    sizes = [len(sampler.sample()) for _ in range(50)]
    assert max(sizes) == 100 and sampler.overflows > 0
    assert "exceeds max_batch_size" in caplog.text


@pytest.mark.parametrize(
    "args,match",
    [
        ((100, 200), "larger than the data set"),
        ((100, 0), "batch_size"),
        ((0, 10), "dataset_size"),
    ],
)
def test_bad_sampler_parameters(args, match):
    with pytest.raises(ValueError, match=match):
        privacy.PoissonSampler(*args)


def test_bad_dataset_inputs():
    with pytest.raises(ValueError, match="same number"):
        privacy.poisson_batches(np.zeros((10, 2)), np.zeros(9), batch_size=2)
    with pytest.raises(ValueError, match="targets"):
        privacy.poisson_batches(np.zeros((10, 2)), None, batch_size=2)


@pytest.mark.parametrize("padding", ["auto", "none", 16])
def test_variable_size_batches_are_whole_poisson_batches(padding):
    n, b = 400, 40
    x = np.random.default_rng(0).normal(size=(n, 3)).astype("float32") + 5.0
    y = np.arange(n)
    ds = privacy.poisson_batches(x, y, batch_size=b, seed=3, padding=padding)
    assert ds.element_spec[0].shape.as_list() == [None, 3]  # one trace for every size
    k = {"auto": privacy.sampling.auto_padding_multiple(b, n), "none": 1, 16: 16}[padding]
    ref = privacy.PoissonSampler(n, b, seed=3)  # the same stream of Poisson draws
    sizes = []
    for xb, yb, extra in ds:
        mask = extra[MASK_KEY].numpy()
        real = ref.sample(truncate=False)
        r = int(mask.sum())
        assert r == len(real) and mask[:r].all() and not mask[r:].any()
        assert len(mask) % k == 0 and len(mask) - r < k
        np.testing.assert_array_equal(yb.numpy()[:r], real)
        np.testing.assert_array_equal(xb.numpy()[:r], x[real])
        assert np.all(xb.numpy()[r:] == 0) and np.all(yb.numpy()[r:] == 0)
        sizes.append(r)
    assert len(set(sizes)) > 3


def test_auto_padding_multiple_and_bad_padding():
    assert privacy.sampling.auto_padding_multiple(256, 60_000) == 8
    assert privacy.sampling.auto_padding_multiple(2048, 60_000) == 32
    assert privacy.sampling.auto_padding_multiple(1, 100) == 1
    with pytest.raises(ValueError, match="padding"):
        privacy.poisson_batches(np.zeros((10, 2)), np.zeros(10), batch_size=2, padding="fixed")
    with pytest.raises(ValueError, match="padding"):
        privacy.poisson_batches(np.zeros((10, 2)), np.zeros(10), batch_size=2, padding=0)
