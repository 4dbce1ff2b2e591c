"""Training-step time of a small CNN with each paper layer vs its built-in counterpart.

Batch 128 of 32x32x3, `jit_compile=True`, SGD, one `train_on_batch` per step. Each pair is timed
side by side (interleaved rounds, median step time) in one run. Not part of CI.

The AIL gates are compared with ReLU at matched parameter count: each k = 2 gate halves the
channels, so the AIL net's conv widths are chosen (`ail_widths`) to give exactly the ReLU net's
parameter count (46/88 vs 32/64: 20042 each). To split that ratio, the AIL rows are timed together
with a reference net that has the AIL net's conv/dense shapes but ReLU plus a plain channel halving
(the first C/2 channels) instead of the gate: "vs same-width" is the gate's own cost, the
"ReLU+halving" row the cost of the widths that parameter matching requires.

    python benchmarks/layers_speed.py [--steps 10] [--rounds 2] [--only AIL,DAR]
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


def relu_halved(h, ins):
    """Same-shape reference for the k = 2 gates: ReLU, then keep the first C/2 channels."""
    return keras.layers.ReLU()(h[..., : h.shape[-1] // 2])


def _params(widths, k=2, base=(32, 64)):
    """Parameter count of `cnn` when each activation divides the channels by k."""
    total, c_in = 0, SHAPE[-1]
    for w in widths:
        total += 9 * c_in * w + w
        c_in = w // k
    return total + c_in * CLASSES + CLASSES


def ail_widths(base=(32, 64)):
    """Conv widths (even) for k = 2 gates giving the ReLU net's parameter count as closely as
    possible, ties broken by the closest to the uniform scaling c * sqrt(2): (46, 88), exactly
    the 20042 parameters of the 32/64 ReLU net (the sqrt(2) rounding 46/90 gives 20468)."""
    target = _params(base, k=1)
    best = min(
        ((a, b) for a in range(2, 4 * base[0], 2) for b in range(2, 4 * base[1], 2)),
        key=lambda ab: (abs(_params(ab) - target), abs(ab[0] / base[0] - 2**0.5) + abs(ab[1] / base[1] - 2**0.5)),
    )
    return best


def build_pairs():
    a1, a2 = ail_widths()
    pairs = [
        ("ProxyNormalization+GroupNorm vs BatchNormalization", lambda: cnn(bn_relu), lambda: cnn(gn_pn), ()),
        ("AIL group", lambda: cnn(relu_only), lambda: cnn(relu_halved, (a1, a2)), "ail"),
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
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the pairs whose name contains one (e.g. AIL,DAR)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH,) + SHAPE).astype("float32")
    y = rng.integers(0, CLASSES, BATCH)
    mask = (rng.random((BATCH, 1)) < 0.25).astype("float32")
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print(f"{'pair':62s} {'base ms':>9s} {'layer ms':>9s} {'ratio':>6s} {'params b/l':>15s}")
    a1, a2 = ail_widths()
    for name, make_base, make_layer, extra in build_pairs():
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        if keys and not any(k in name.lower() or (extra == "ail" and k in "ail group and_ail or_ail xnor_ail relu") for k in keys):
            continue
        db = (x, y)
        dl = ([x, mask], y) if extra and extra != "ail" else (x, y)
        models = [("base", make_base(), db), ("layer", make_layer(), dl)]
        if extra == "ail":  # ReLU 32/64, ReLU+halving at the AIL widths, then the three gates
            models += [(fn, cnn(gate(fn), (a1, a2)), db) for fn in ("and_ail", "or_ail", "xnor_ail")]
        for _, m, d in models:  # compile + warm-up
            for _ in range(3):
                m.train_on_batch(*d)
        times = {label: [] for label, _, _ in models}
        for _ in range(args.rounds):  # interleaved
            for label, m, d in models:
                times[label] += time_steps(m, d, args.steps)
        med = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        par = {label: m.count_params() for label, m, _ in models}

        def row(title, label, ref="base", note=""):
            print(
                f"{title:62s} {med[ref]:9.1f} {med[label]:9.1f} {med[label] / med[ref]:6.2f} "
                f"{par[ref]:7d}/{par[label]:<7d}{note}",
                flush=True,
            )

        if extra != "ail":
            row(name, "layer")
            continue
        row(f"ReLU+halving at AIL widths {a1}/{a2} vs ReLU (width cost)", "layer")
        for fn in ("and_ail", "or_ail", "xnor_ail"):
            row(f"{fn.upper()} (matched params) vs ReLU", fn, note=f"  vs same-width {med[fn] / med['layer']:.2f}")


if __name__ == "__main__":
    main()
