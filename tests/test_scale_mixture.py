"""The per-example scale of a feature map (`rules.shared_part`: `Moments.scale`, `Given`) against Monte Carlo
samples of the generative models its formulas state, and against a model's own activations."""

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf.moments import Moments
from autoinit_tf.rules import shared_part
from autoinit_tf.rules.activation import PIECEWISE_POLYNOMIAL, numpy_function
from autoinit_tf.rules.spatial_correlation import energy_sampling_variance


def _lognormal(rng, lam, n):
    """Scale factors S with Var(log S) = lam and E[S] = 1."""
    return np.exp(np.sqrt(lam) * rng.standard_normal(n) - lam / 2.0)


@pytest.mark.parametrize("name", ["hard_swish", "swish", "relu"])
def test_activation_of_a_scale_mixture(name):
    """x = m + u + sqrt(W S) v per example (u ~ N(0, S_c) an offset, S log-normal common to the channels),
    f applied per entry: the channel means and variances, the shared part (variance over examples of an
    example's own channel mean) and the output's log-scale Var_e(log sum_c Var_p f) against 20000 sampled
    examples of 256 positions."""
    rng = np.random.default_rng(0)
    fn = getattr(keras.activations, name)
    f = numpy_function(fn)
    m = np.array([0.0, 0.5, -0.4])
    shared = np.array([0.05, 0.1, 0.02])
    within = np.array([1.0, 0.7, 1.3])
    lam = 0.5
    m_in = Moments.from_channels(m, shared + within)
    m_in.shared = shared
    m_in.scale = lam
    pieces = PIECEWISE_POLYNOMIAL.get(name)
    base = autoinit_tf.rules.activation.function_moments(fn, Moments.from_channels(m, shared + within))
    out = shared_part.through_activation(f, (0.0,) if name == "relu" else (), m_in, base, pieces=pieces)

    e, p = 20000, 256
    s = _lognormal(rng, lam, e)
    u = rng.normal(0.0, np.sqrt(shared), size=(e, 3))
    x = m + u[:, None, :] + np.sqrt(within * s[:, None, None]) * rng.standard_normal((e, p, 3))
    y = f(x)
    np.testing.assert_allclose(out.ch_mean, y.mean(axis=(0, 1)), atol=0.01)
    np.testing.assert_allclose(out.ch_var, y.var(axis=(0, 1)), rtol=0.03)
    pos_var = y.var(axis=1)
    measured_shared = y.mean(axis=1).var(axis=0) - pos_var.mean(axis=0) / p  # less the positions' average
    np.testing.assert_allclose(out.shared, measured_shared, rtol=0.08, atol=2e-4)
    energy = pos_var.sum(axis=1)
    assert out.scale == pytest.approx(np.log(energy).var(), rel=0.08)
    # Without the scale (lam = 0) the shared part is the offsets' alone: the scale's part is most of it here.
    plain = Moments.from_channels(m, shared + within)
    plain.shared = shared
    alone = shared_part.through_activation(f, (0.0,) if name == "relu" else (), plain, base.per_channel(),
                                           pieces=pieces)
    assert np.all(alone.shared < out.shared)


@pytest.mark.parametrize("gains", ["batch_norm", "depthwise"])
def test_channel_weights_move_the_log_scale(gains):
    """After an activation, channels follow the latent scale differently (swish of a channel centred at -2 is
    near x / 2 + x^2 / 4, of one at +3 near linear): a map that reweights the channels (BatchNormalization's
    gamma / sqrt(var + eps), a depthwise kernel's energy per channel) changes the log-scale of the sum
    Var_e(log sum_c a_c^2 Var_p f). Predicted (`shared_part.carry_given`'s per-channel profile) against 20000
    sampled examples of 256 positions; one scale common to the channels would keep the activation's."""
    rng = np.random.default_rng(6)
    f = numpy_function(keras.activations.swish)
    m = np.array([-2.0, -1.0, 0.0, 3.0])
    shared = np.array([0.02, 0.05, 0.05, 0.02])
    within = np.array([0.3, 1.0, 1.0, 2.0])
    lam = 0.6
    m_in = Moments.from_channels(m, shared + within)
    m_in.shared = shared
    m_in.scale = lam
    base = autoinit_tf.rules.activation.function_moments(keras.activations.swish, Moments.from_channels(m, shared + within))
    act = shared_part.through_activation(f, (), m_in, base)

    e, p = 20000, 256
    scale = _lognormal(rng, lam, e)
    u = rng.normal(0.0, np.sqrt(shared), size=(e, 4))
    y = f(m + u[:, None, :] + np.sqrt(within * scale[:, None, None]) * rng.standard_normal((e, p, 4)))
    pos_var = y.var(axis=1)
    assert act.scale == pytest.approx(np.log(pos_var.sum(axis=1)).var(), rel=0.08)
    if gains == "batch_norm":
        gamma = np.array([3.0, 1.0, 1.0, 0.3])
        a2 = gamma**2 / (y.reshape(-1, 4).var(axis=0) + 1e-3)
        out = shared_part.through_batch_norm(Moments.from_channels(np.zeros(4), np.ones(4)), act, gamma, 1e-3)
    else:  # one tap per channel: the kernel's square is the channel's gain, depth multiplier 2
        w3 = np.array([[2.0, 0.5, 1.0, 0.2], [1.0, 0.7, 0.1, 0.4]]).T[None]  # (taps, C, dm)
        a2 = (w3[0] ** 2).reshape(-1)
        pos_var = np.repeat(pos_var, 2, axis=1)
        ch_var = np.repeat(act.ch_var, 2) * a2
        out = shared_part.through_depthwise(Moments.from_channels(np.zeros(8), ch_var), act, w3)
    measured = np.log((pos_var * a2).sum(axis=1)).var()
    assert out.scale == pytest.approx(measured, rel=0.08)
    assert abs(act.scale - measured) > 0.15 * measured  # the reweighting is what moved it (tolerance 0.08)


def test_padding_keeps_the_channels_energy_profiles():
    """Zero padding scales every example's channel energies by the same factor (the share of real positions),
    so each channel's profile over the latent's nodes is what it was, and a BatchNormalization after it (and
    after a depthwise conv behind it: EfficientNet's strided blocks pad first) reweights the channels as it
    would without the padding; dropping the profiles at the padding kept the activation's scale there
    (EfficientNetB0's block 6a BatchNorm: 0.745 predicted for 0.675 measured, now 0.655 for 0.633)."""
    m = np.array([-2.0, -1.0, 0.0, 3.0])
    shared = np.array([0.02, 0.05, 0.05, 0.02])
    within = np.array([0.3, 1.0, 1.0, 2.0])
    m_in = Moments.from_channels(m, shared + within)
    m_in.shared, m_in.scale = shared, 0.6
    f = numpy_function(keras.activations.swish)
    base = autoinit_tf.rules.activation.function_moments(keras.activations.swish, Moments.from_channels(m, shared + within))
    act = shared_part.through_activation(f, (), m_in, base)
    share = 36.0 / 49.0  # a 6x6 map padded to 7x7
    padded = Moments.from_channels(act.ch_mean * share, (act.ch_var + act.ch_mean**2) * share - (act.ch_mean * share) ** 2)
    padded = shared_part.carry_per_example(padded, act)
    assert padded.scale == act.scale
    np.testing.assert_array_equal(padded.given.within, act.given.within)
    gamma = np.array([3.0, 1.0, 1.0, 0.3])
    direct = shared_part.through_batch_norm(Moments.from_channels(np.zeros(4), np.ones(4)), act, gamma, 1e-3)
    after = shared_part.through_batch_norm(Moments.from_channels(np.zeros(4), np.ones(4)), padded, gamma, 1e-3)
    # (not exactly: the padded channels' variances hold their means' share of the zeros, which moves BatchNorm's
    # gains a little; 2% here)
    assert after.scale == pytest.approx(direct.scale, rel=0.05)
    assert abs(after.scale - act.scale) > 0.1 * act.scale


def test_gate_on_one_latent_against_sampling():
    """y = g x with x (a feature map) and g (one value per example and channel) both given the node q of
    one latent: sample q, then x's offsets, positions and the gate from their `Given`, and compare y's
    channel moments, shared part and log-scale with `shared_part.gate`."""
    rng = np.random.default_rng(1)
    lam = 0.4
    w, s = shared_part.scale_nodes(lam)
    q, c = w.size, 4
    x_mean = 0.3 + 0.2 * np.outer(s, np.ones(c)) + 0.05 * rng.standard_normal((q, c))
    x_spread = 0.02 * np.outer(s, np.ones(c))
    x_within = np.outer(s, [1.0, 0.5, 0.8, 1.2])
    g_mean = 0.5 + 0.1 * np.tanh(np.outer(np.log(s), [1.0, -0.5, 0.3, 0.8]))
    g_spread = np.full((q, c), 0.01)
    gx = shared_part.Given(lam, w, s, x_mean, x_spread, x_within)
    gg = shared_part.Given(lam, w, s, g_mean, g_spread, np.zeros((q, c)))
    x = Moments.from_channels(*gx.channel_moments())
    x.given, x.scale = gx, lam
    g = Moments.from_channels(*gg.channel_moments())
    g.given = gg
    out = shared_part.gate(x, g, Moments.from_channels(np.zeros(c), np.ones(c)))

    e, p = 200000, 64
    node = rng.choice(q, size=e, p=w)
    offset = x_mean[node] + rng.normal(0.0, np.sqrt(x_spread[node]))
    gate = rng.normal(g_mean[node], np.sqrt(g_spread[node]))
    pos_sd = np.sqrt(x_within[node])
    # an example's channel mean and within-positions variance of y, exactly (no positions sampled)
    y_mean = gate * offset
    y_within = gate ** 2 * pos_sd ** 2
    ch_mean = y_mean.mean(axis=0)
    ch_var = (y_within + y_mean ** 2).mean(axis=0) - ch_mean ** 2
    np.testing.assert_allclose(out.ch_mean, ch_mean, rtol=0.01, atol=1e-3)
    np.testing.assert_allclose(out.ch_var, ch_var, rtol=0.02)
    np.testing.assert_allclose(out.shared, y_mean.var(axis=0), rtol=0.03)
    # the log-scale: sampled over positions as well (the independent part of the gate is in it)
    sub = rng.choice(e, 20000, replace=False)
    ys = gate[sub, None, :] * (offset[sub, None, :] + pos_sd[sub, None, :] * rng.standard_normal((20000, p, c)))
    energy = ys.var(axis=1).sum(axis=1)
    measured = np.log(energy).var() - 2.0 / (p * c)  # less the positions' own sampling of the energy
    assert out.scale == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("lams", [(0.3, 0.1), (0.5, 0.0), (0.2, 0.2)])
def test_added_log_scales_average_their_loadings(lams):
    """A residual sum of two inputs whose energies follow one latent xi with loadings sqrt(lam_i): the
    variance of the log of the summed energy (quadrature in xi) against 400000 sampled xi."""
    rng = np.random.default_rng(2)
    energies = (1.0, 2.0)
    ms = []
    for lam, energy in zip(lams, energies):
        m = Moments.from_channels(np.zeros(2), np.full(2, energy))
        m.scale = lam if lam > 0 else None
        ms.append(m)
    out = shared_part.added(ms, Moments.from_channels(np.zeros(2), np.full(2, sum(energies))))
    xi = rng.standard_normal(400000)
    total = sum(e * np.exp(np.sqrt(lam) * xi - lam / 2) for lam, e in zip(lams, energies))
    assert out.scale == pytest.approx(np.log(total).var(), rel=0.02)


def test_energy_sampling_variance_of_a_linear_map():
    """Given its input, an example's energy after a random 1x1 convolution varies with the example's own
    entries: Var(log(|x W|^2 / |x|^2)) = 2 / (C_out P) for P independent positions, and more where the
    positions are correlated (a 2x2 average pool of independent entries: each entry shares its window)."""
    rng = np.random.default_rng(3)
    e, h, cin, cout = 4000, 4, 32, 16
    x = rng.standard_normal((e, h, h, cin))
    w = rng.standard_normal((cin, cout)) / np.sqrt(cin)
    y = x @ w
    ratio = (y ** 2).mean(axis=(1, 2, 3)) / (x ** 2).mean(axis=(1, 2, 3))
    m = Moments.from_channels(np.zeros(cout), np.ones(cout))
    pred = energy_sampling_variance(m, (None, h, h, cout))
    assert pred == pytest.approx(2.0 / (cout * h * h))
    assert np.log(ratio).var() == pytest.approx(pred, rel=0.1)
    # correlated positions: neighbours share half of their entries (corr 0.5 at offsets (0, +-1))
    from autoinit_tf.rules.spatial_correlation import RADIUS, SIDE
    corr = np.zeros((cout, SIDE, SIDE))
    corr[:, RADIUS, RADIUS] = 1.0
    corr[:, RADIUS, RADIUS - 1] = corr[:, RADIUS, RADIUS + 1] = 0.5
    m.corr = corr
    z = rng.standard_normal((e, h, h + 1, cout))
    yc = (z[:, :, 1:] + z[:, :, :-1]) / np.sqrt(2.0)  # correlation 0.5 between horizontal neighbours
    measured = np.log((yc ** 2).mean(axis=(1, 2, 3))).var()
    got = energy_sampling_variance(m, (None, h, h, cout))
    assert got > pred
    assert got == pytest.approx(measured, rel=0.1)


def test_log_scale_after_a_gate_in_a_model():
    """A conv + ReLU map times a per-example gate sigmoid(3 z) (`test_rules_monte_carlo._gated_model`): the
    log-scale of the product and after the conv and BatchNormalization that follow, predicted against 20000
    examples (0.124 and 0.129 predicted, 0.113 and 0.139 measured; after the swish 0.161 for 0.200)."""
    from test_rules_monte_carlo import _gated_model

    model = _gated_model()
    rep = autoinit_tf.wrap(model, input_moments=[(0.5, 1.0), (0.0, 1.0)], seed=0, calibrate=None,
                           return_report=True)[1]
    rows = {r.type: r for r in rep.rows}
    names = {"Multiply": None, "BatchNormalization": None}
    for layer in model.layers:
        if type(layer).__name__ in names:
            names[type(layer).__name__] = layer.output
    sub = keras.Model(model.inputs, list(names.values()))
    rng = np.random.default_rng(4)
    outs = [sub([rng.normal(0.5, 1.0, size=(4000, 6, 6, 12)).astype("float32"),
                 rng.normal(0.0, 1.0, size=(4000, 1, 1, 12)).astype("float32")], training=True) for _ in range(5)]
    for i, kind in enumerate(names):
        y = np.concatenate([np.asarray(o[i]) for o in outs]).reshape(20000, -1, 12)
        energy = ((y - y.mean(axis=(0, 1))) ** 2).mean(axis=(1, 2))
        assert rows[kind].outputs[0].scale == pytest.approx(np.log(energy).var(), rel=0.25), kind


def test_latent_shift_of_channel_means_through_conv_and_batch_norm():
    """Examples whose channel means depend on a latent node (a map's `Given`): a 3x3 convolution with zero
    padding on a 4x4 map moves each node's channel means by the kernel summed over the taps that read real
    positions, averaged over the output positions, and BatchNormalization by gamma / sqrt(var + eps): the
    carried means against the sampled examples' own channel means per node."""
    from autoinit_tf.rules.linear import _conv_taps

    rng = np.random.default_rng(5)
    lam = 0.3
    w, s = shared_part.scale_nodes(lam)
    q, c, k, n = w.size, 3, 2, 4
    dev = 0.4 * np.outer(np.log(s), [1.0, -0.5, 0.7])
    dev -= w @ dev
    ch_mean = np.array([0.2, -0.1, 0.4])
    m_in = Moments.from_channels(ch_mean, np.full(c, 1.0))
    m_in.scale = lam
    zeros = np.zeros((q, c))
    m_in.given = shared_part.Given(lam, w, s, ch_mean + dev, zeros, zeros, per_example=False)
    layer = keras.layers.Conv2D(k, 3, padding="same")
    layer.build((None, n, n, c))
    kernel = rng.standard_normal((3, 3, c, k))
    taps = _conv_taps(layer, (None, n, n, c), 2)
    pre = Moments.from_channels(np.zeros(k), np.ones(k))
    out = shared_part.through_linear(pre, m_in, kernel.reshape(-1, c, k), taps)
    e = 20000
    node = rng.choice(q, size=e, p=w)
    x = (ch_mean + dev[node])[:, None, None, :] + rng.standard_normal((e, n, n, c))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum("ehwc,ck->ehwk", padded[:, i:i + n, j:j + n], kernel[i, j]) for i in range(3) for j in range(3))
    per_example = y.mean(axis=(1, 2))
    for node_q in range(q):
        pick = node == node_q
        if pick.sum() < 500:
            continue
        got = out.given.deviation[node_q]
        want = per_example[pick].mean(axis=0) - per_example.mean(axis=0)
        np.testing.assert_allclose(got, want, atol=0.06)
    gamma = np.array([2.0, 0.5])
    y_in = Moments.from_channels(per_example.mean(axis=0), y.reshape(-1, k).var(axis=0))
    y_in.given = out.given
    bn = shared_part.through_batch_norm(Moments.from_channels(np.zeros(k), np.ones(k)), y_in, gamma, 1e-3)
    np.testing.assert_allclose(bn.given.deviation, out.given.deviation * gamma / np.sqrt(y_in.ch_var + 1e-3),
                               atol=1e-12)


def test_sum_after_a_per_example_mask():
    """Drop-connect (inverted dropout with one mask per example, keep k) before a residual sum: the branch's
    energy is 0 or E / k per example, which makes the sum's log-energy spread even without a gate; with a
    log-scale on the stream as well, both mix (against 400000 sampled examples)."""
    rng = np.random.default_rng(6)
    for keep, lam in ((0.8, 0.0), (0.9, 0.3)):
        stream = Moments.from_channels(np.zeros(2), np.full(2, 1.0))
        stream.scale = lam if lam > 0 else None
        branch = Moments.from_channels(np.zeros(2), np.full(2, 1.0 / keep))  # E[M^2] E_b = E_b / k, E_b = 1
        branch.keep = keep
        branch.scale = lam if lam > 0 else None
        out = shared_part.added([stream, branch], Moments.from_channels(np.zeros(2), np.full(2, 1.0 + 1.0 / keep)))
        xi = rng.standard_normal(400000)
        s = np.exp(np.sqrt(lam) * xi - lam / 2)
        mask = rng.random(400000) < keep
        total = s + mask * s / keep ** 2  # the branch's M^2 E_b, M = 1 / k when kept, E_b = 1
        assert out.scale == pytest.approx(np.log(total).var(), rel=0.03)
