"""Training-step time of a small CNN with each paper layer vs its built-in counterpart.

Batch 128 of 32x32x3, `jit_compile=True`, SGD, one `train_on_batch` per step. Each pair is timed
side by side (interleaved rounds, median step time) in one run. Not part of CI.

    python benchmarks/layers_speed.py [--steps 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import keras
import numpy as np

from autoinit_tf import layers as L

BATCH, SHAPE, CLASSES = 128, (32, 32, 3), 10


def cnn(norm_act, widths=(32, 64), pool=None, residual=None, extra_inputs=()):
    """conv -> norm_act -> conv -> norm_act (-> residual block) -> pool -> dense."""
    inp = keras.Input(SHAPE)
    ins = [inp] + [keras.Input(s) for s in extra_inputs]
    h = inp
    for i, w in enumerate(widths):
        h = keras.layers.Conv2D(w, 3, strides=2 if i else 1, padding="same")(h)
        h = norm_act(h, ins)
    if residual is not None:
        b = keras.layers.Conv2D(h.shape[-1], 3, padding="same", activation="relu")(h)
        h = residual([h, b])
    h = (pool or keras.layers.GlobalAveragePooling2D())(h)
    out = keras.layers.Dense(CLASSES)(h)
    model = keras.Model(ins if len(ins) > 1 else inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    return model


def bn_relu(h, ins):
    return keras.layers.ReLU()(keras.layers.BatchNormalization()(h))


def gn_pn(h, ins):
    return L.ProxyNormalization()(keras.layers.GroupNormalization(8, center=False, scale=False)(h))


def relu_only(h, ins):
    return keras.layers.ReLU()(h)


def iternorm_relu(h, ins):
    return keras.layers.ReLU()(L.IterNormWhitening()(h))


def dar_relu(h, ins):
    return keras.layers.ReLU()(L.DARBatchNormalization()([h, ins[1]]))


def gate(fn):
    def norm_act(h, ins):
        return L.LogitGate(fn)(h)

    return norm_act


def ail_widths():
    """Conv widths for k = 2 gates (each gate halves the channels) at about the ReLU net's
    parameter count: widths c * sqrt(2) (even), so 27 a + 9 (a / 2) b + 5 b ~ 27*32 + 9*32*64 + 640."""
    return 2 * round(32 / np.sqrt(2)), 2 * round(64 / np.sqrt(2))


def build_pairs():
    a1, a2 = ail_widths()
    pairs = [
        ("ProxyNormalization+GroupNorm vs BatchNormalization", lambda: cnn(bn_relu), lambda: cnn(gn_pn), ()),
        ("AND_AIL (matched params) vs ReLU", lambda: cnn(relu_only), lambda: cnn(gate("and_ail"), (a1, a2)), ()),
        ("OR_AIL (matched params) vs ReLU", lambda: cnn(relu_only), lambda: cnn(gate("or_ail"), (a1, a2)), ()),
        ("XNOR_AIL (matched params) vs ReLU", lambda: cnn(relu_only), lambda: cnn(gate("xnor_ail"), (a1, a2)), ()),
        ("LogAvgExpPooling2D (learnable t) vs GlobalAveragePooling2D", lambda: cnn(bn_relu), lambda: cnn(bn_relu, pool=L.LogAvgExpPooling2D(learnable=True)), ()),
        (
            "StochasticDepth (paper) vs plain residual sum",
            lambda: cnn(bn_relu, residual=keras.layers.Add()),
            lambda: cnn(bn_relu, residual=L.StochasticDepth(0.8)),
            (),
        ),
        ("IterNormWhitening vs BatchNormalization", lambda: cnn(bn_relu), lambda: cnn(iternorm_relu), ()),
        ("DARBatchNormalization vs BatchNormalization", lambda: cnn(bn_relu), lambda: cnn(dar_relu, extra_inputs=[(1,)]), ((1,),)),
    ]
    return pairs


def time_steps(model, data, steps):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(*data)
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH,) + SHAPE).astype("float32")
    y = rng.integers(0, CLASSES, BATCH)
    mask = (rng.random((BATCH, 1)) < 0.25).astype("float32")
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print(f"{'pair':62s} {'base ms':>9s} {'layer ms':>9s} {'ratio':>6s} {'params b/l':>15s}")
    for name, make_base, make_layer, extra in build_pairs():
        base, lay = make_base(), make_layer()
        db = (x, y)
        dl = ([x, mask], y) if extra else (x, y)
        for m, d in ((base, db), (lay, dl)):  # compile + warm-up
            for _ in range(3):
                m.train_on_batch(*d)
        tb, tl = [], []
        for _ in range(args.rounds):
            tb += time_steps(base, db, args.steps)
            tl += time_steps(lay, dl, args.steps)
        mb, ml = statistics.median(tb) * 1e3, statistics.median(tl) * 1e3
        print(f"{name:62s} {mb:9.1f} {ml:9.1f} {ml / mb:6.2f} {base.count_params():7d}/{lay.count_params():<7d}", flush=True)


if __name__ == "__main__":
    main()
