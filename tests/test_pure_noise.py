"""OPeN (pure-noise oversampling) and the bn->darbn swap: replacement frequencies per class against
delta * (1 - n_c / n_max) (binomial tests), uniform classes (chi-square), noise statistics against the data's,
deferred start, the PyDataset and tf.data forms, and the rewritten model: inference equal to BN inference,
training on noise batches (gradients through the noise branch), natural-only moving statistics, reload."""

import os

import numpy as np
import pytest

import keras

import autoinit_tf
from autoinit_tf.noise import OPeNSampler, PureNoiseSequence, pure_noise_dataset, replacement_probabilities, \
    setup_pure_noise
from autoinit_tf.rewrite.replay import SwapError

pytestmark = pytest.mark.core


def _long_tailed(n_per_class=(4000, 1000, 400, 100), shape=(4, 4, 2), seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype("int32")
    x = (rng.normal(size=(len(y),) + shape) * np.array([1.0, 2.0]) + np.array([0.5, -1.0])).astype("float32")
    return x, y


def test_replacement_frequencies_and_uniform_classes():
    stats = pytest.importorskip("scipy.stats")
    x, y = _long_tailed()
    p = replacement_probabilities(y)
    np.testing.assert_allclose(p, [0.0, (1 - 1000 / 4000) / 3, (1 - 400 / 4000) / 3, (1 - 100 / 4000) / 3])
    sampler = OPeNSampler(x, y, 64, seed=3)
    drawn = y[sampler.order]
    counts = np.bincount(drawn, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-4  # classes uniform
    for c in range(4):
        k, n = int(sampler.mask[drawn == c].sum()), int(counts[c])
        if p[c] == 0:
            assert k == 0
        else:
            assert stats.binomtest(k, n, p[c]).pvalue > 1e-4, (c, k, n, p[c])


def test_noise_images_have_the_data_statistics_and_keep_labels():
    x, y = _long_tailed()
    sampler = OPeNSampler(x, y, 2000, seed=1, delta=1.0)
    noise = []
    for i in range(len(sampler)):
        (images, mask), labels = sampler.batch(i)
        np.testing.assert_array_equal(labels, y[sampler.order[i * 2000:(i + 1) * 2000]])
        natural = mask[:, 0] == 0
        np.testing.assert_array_equal(images[natural], x[sampler.order[i * 2000:(i + 1) * 2000]][natural])
        noise.append(images[~natural])
    noise = np.concatenate(noise)
    assert len(noise) > 2000
    np.testing.assert_allclose(noise.mean(axis=(0, 1, 2)), x.mean(axis=(0, 1, 2)), atol=0.03)
    np.testing.assert_allclose(noise.std(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)), rtol=0.03)
    assert noise.min() >= x.min() and noise.max() <= x.max()


def test_deferred_start_and_epochs_advance_in_both_forms():
    x, y = _long_tailed((300, 60))
    seq = PureNoiseSequence(x, y, 32, start_epoch=1, seed=0)
    assert seq.sampler.mask.sum() == 0 and sorted(seq.sampler.order) == list(range(len(y)))
    seq.on_epoch_end()
    assert seq.sampler.epoch == 1 and seq.sampler.mask.sum() > 0
    tf = pytest.importorskip("tensorflow")
    ds = pure_noise_dataset(x, y, 32, start_epoch=1, seed=0, as_tf_data=True)
    ref = OPeNSampler(x, y, 32, start_epoch=1, seed=0)
    for epoch in range(2):
        ref.set_epoch(epoch)
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == len(ref)
        (img, mask), lab = batches[-1]
        (rimg, rmask), rlab = ref.batch(len(ref) - 1)
        np.testing.assert_array_equal(img, rimg)
        np.testing.assert_array_equal(mask, rmask)
        np.testing.assert_array_equal(lab, rlab)
    del tf


def _bn_resnet(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    r = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(h))
    h = keras.layers.BatchNormalization(name="bn2")(keras.layers.Conv2D(8, 3, padding="same", name="c2")(r))
    h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    return keras.Model(inp, keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(h)))


def test_bn_to_darbn_model_trains_on_noise_reloads_and_infers_as_bn(tmp_path):
    x, y = _long_tailed((400, 100, 60, 40))
    model = _bn_resnet()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)  # BN statistics that are not (0, 1)
    new, data = setup_pure_noise(model, x, y, batch_size=64, seed=0)
    assert [t.name for t in new.inputs][-1] == "noise_mask"
    assert sum(isinstance(layer, autoinit_tf.layers.DARBatchNormalization) for layer in new.layers) == 2
    ref = model.predict(x[:50], verbose=0)
    for mask in (np.zeros((50, 1), "float32"), np.ones((50, 1), "float32")):
        np.testing.assert_allclose(new.predict([x[:50], mask], verbose=0), ref, rtol=1e-5, atol=1e-6)
    # an all-noise batch trains the network (gradients through the noise branch) and leaves the moving
    # statistics alone; a natural batch updates them
    bn = new.get_layer(new.layers[3].name) if isinstance(new.layers[3], autoinit_tf.layers.DARBatchNormalization) \
        else [la for la in new.layers if isinstance(la, autoinit_tf.layers.DARBatchNormalization)][0]
    c1 = new.get_layer("c1")
    kernel, moving = np.array(c1.kernel.numpy()), np.array(bn.moving_mean.numpy())
    new.train_on_batch([x[:32], np.ones((32, 1), "float32")], y[:32])
    assert not np.allclose(c1.kernel.numpy(), kernel)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving)
    new.train_on_batch([x[:32], np.zeros((32, 1), "float32")], y[:32])
    assert not np.allclose(bn.moving_mean.numpy(), moving)
    history = new.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = os.path.join(tmp_path, "darbn.keras")
    new.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(again.predict([x[:50], np.zeros((50, 1))], verbose=0),
                               new.predict([x[:50], np.zeros((50, 1))], verbose=0), rtol=1e-5, atol=1e-6)


def test_bn_to_darbn_refuses_nested_batch_norm():
    inner = _bn_resnet()
    inp = keras.Input((4, 4, 2))
    outer = keras.Model(inp, inner(inp))
    with pytest.raises(SwapError, match="nested model"):
        autoinit_tf.rewrite(outer, ["bn->darbn"])
