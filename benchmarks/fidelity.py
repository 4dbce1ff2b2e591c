"""Signal fidelity: predicted vs measured variance per node, on a zoo of architectures.

For each model and each initialization (default Keras init, analytic `wrap`, `wrap(calibrate="probe")`):
  * median / max over nodes of |log(predicted var / measured var)| (predictions: `analyze(seed=0)`, the
    analytic pass with the same seed `wrap` uses, so for "analytic" they describe the very weights drawn);
  * the measured variance of the final pre-softmax layer;
  * for the calibrated model: the realized pre-activation variance of every weighted layer on a FRESH
    probe (other seed) relative to the target (worst |ratio - 1|).
Measurements use `autoinit_tf.measure` on a Gaussian probe (0, 1), training mode.

    python benchmarks/fidelity.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import autoinit_tf  # noqa: E402

L = keras.layers


def mlp(act, depth, width):
    def build():
        inp = keras.Input((width,))
        h = inp
        for _ in range(depth):
            h = L.Dense(width, activation=act)(h)
        return keras.Model(inp, L.Dense(10)(h), name=f"mlp_{act}_{depth}")
    return build


def plain_cnn(pool, depth=8):
    def build():
        inp = keras.Input((32, 32, 3))
        h = inp
        for i in range(depth):
            h = L.Conv2D(32, 3, padding="same", activation="relu")(h)
            if i % 3 == 2:
                h = (L.MaxPooling2D() if pool == "max" else L.AveragePooling2D(2))(h)
        h = L.Flatten()(h)
        return keras.Model(inp, L.Dense(10)(h), name=f"cnn_{pool}pool")
    return build


def resnet(bn, blocks=4):
    def build():
        inp = keras.Input((32, 32, 3))
        h = L.Conv2D(32, 3, padding="same")(inp)
        for _ in range(blocks):
            b = L.Conv2D(32, 3, padding="same")(h)
            if bn:
                b = L.BatchNormalization()(b)
            b = L.Activation("relu")(b)
            b = L.Conv2D(32, 3, padding="same")(b)
            if bn:
                b = L.BatchNormalization()(b)
            h = L.Activation("relu")(L.Add()([h, b]))
        h = L.GlobalAveragePooling2D()(h)
        return keras.Model(inp, L.Dense(10)(h), name="resnet_bn" if bn else "resnet_nobn")
    return build


def densenet():
    inp = keras.Input((32, 32, 3))
    h = L.Conv2D(24, 3, padding="same")(inp)
    for stage in range(2):
        for _ in range(4):
            b = L.BatchNormalization()(h)
            b = L.Activation("relu")(b)
            b = L.Conv2D(12, 3, padding="same")(b)
            h = L.Concatenate()([h, b])
        if stage == 0:
            h = L.Conv2D(32, 1)(L.Activation("relu")(L.BatchNormalization()(h)))
            h = L.AveragePooling2D(2)(h)
    h = L.GlobalAveragePooling2D()(L.Activation("relu")(L.BatchNormalization()(h)))
    return keras.Model(inp, L.Dense(10)(h), name="densenet")


def mobilenet():
    inp = keras.Input((32, 32, 3))
    h = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inp)
    for f, s in [(64, 1), (64, 2), (128, 1), (128, 2)]:
        h = L.DepthwiseConv2D(3, strides=s, padding="same")(h)
        h = L.Activation("relu")(L.BatchNormalization()(h))
        h = L.Conv2D(f, 1)(h)
        h = L.Activation("relu")(L.BatchNormalization()(h))
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(10)(h), name="mobilenet_style")


def transformer():
    inp = keras.Input((16, 32))
    h = L.Dense(64)(inp)
    for _ in range(2):
        a = L.MultiHeadAttention(num_heads=4, key_dim=16)(h, h)
        h = L.LayerNormalization()(L.Add()([h, a]))
        f = L.Dense(128, activation="gelu")(h)
        f = L.Dense(64)(f)
        h = L.LayerNormalization()(L.Add()([h, f]))
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(inp, L.Dense(10)(h), name="transformer_encoder")


def rnn(cls):
    def build():
        inp = keras.Input((20, 16))
        h = cls(64, return_sequences=True)(inp)
        h = cls(64)(h)
        return keras.Model(inp, L.Dense(10)(h), name=cls.__name__.lower())
    return build


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classifier_activation=None)


ZOO = {
    "mlp_relu_30": (mlp("relu", 30, 256), 256),
    "mlp_gelu_30": (mlp("gelu", 30, 256), 256),
    "mlp_tanh_100": (mlp("tanh", 100, 64), 256),
    "mlp_selu_30": (mlp("selu", 30, 256), 256),
    "cnn_maxpool": (plain_cnn("max"), 64),
    "cnn_avgpool": (plain_cnn("avg"), 64),
    "resnet_bn": (resnet(True), 64),
    "resnet_nobn": (resnet(False), 64),
    "densenet": (densenet, 64),
    "mobilenet_style": (mobilenet, 64),
    "transformer_encoder": (transformer, 64),
    "lstm": (rnn(L.LSTM), 128),
    "gru": (rnn(L.GRU), 128),
    "resnet50_64px": (resnet50, 8),
}


def log_errors(pred_rows, measured):
    by = {r.name: r.outputs[0].var for r in measured.rows if r.outputs}
    errs = []
    for r in pred_rows:
        p, m = r.outputs[0].var if r.outputs else None, by.get(r.name)
        if p and m and p > 0 and m > 0 and math.isfinite(p) and math.isfinite(m):
            errs.append(abs(math.log(p / m)))
    return np.array(errs)


def final_var(measured):
    r = measured.rows[-1]
    return (r.preactivation or r.outputs[0]).var


def run_one(name, build, batch):
    out = {}
    keras.utils.set_random_seed(0)
    model = build()
    pred = autoinit_tf.analyze(model, seed=0)
    for mode in ("default", "analytic", "calibrated"):
        t0 = time.perf_counter()
        if mode == "analytic":
            autoinit_tf.wrap(model, seed=0)
        elif mode == "calibrated":
            keras.utils.set_random_seed(0)
            model = build()
            pred = autoinit_tf.analyze(model, seed=0)  # fresh layer names: predict for this instance
            _, rep = autoinit_tf.wrap(model, seed=0, calibrate="probe", return_report=True)
        t_wrap = time.perf_counter() - t0
        meas = autoinit_tf.measure(model, batch_size=batch, seed=1)
        e = log_errors(pred.rows, meas)
        if e.size == 0:
            e = np.array([float("nan")])
        row = {"median": float(np.median(e)), "max": float(e.max()), "final": final_var(meas), "t": t_wrap}
        if mode == "calibrated":
            by = {r.name: r for r in meas.rows}
            ratios = [(by[n].preactivation or by[n].outputs[0]).var for n in rep.calibration]
            row["worst"] = float(max(abs(np.array(ratios) - 1.0))) if ratios else float("nan")
            row["n_cal"] = len(ratios)
            row["n_weighted"] = sum(r.weighted for r in rep.rows)
        out[mode] = row
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    names = args.only or list(ZOO)
    print(f"keras {keras.__version__} backend {keras.backend.backend()}  autoinit-tf {autoinit_tf.__version__}")
    head = (f"{'model':<20} {'default med/max':>16} {'analytic med/max':>17} {'calib med/max':>14} "
            f"{'final var d/a/c':>22} {'calib worst |r-1| (n)':>22} {'wrap s':>7}")
    print(head)
    print("-" * len(head))
    for n in names:
        build, batch = ZOO[n]
        t = time.perf_counter()
        r = run_one(n, build, batch)
        d, a, c = r["default"], r["analytic"], r["calibrated"]
        print(f"{n:<20} {d['median']:>7.3f}/{d['max']:<8.3f} {a['median']:>7.3f}/{a['max']:<9.3f} "
              f"{c['median']:>6.3f}/{c['max']:<7.3f} {d['final']:>7.3g}/{a['final']:<6.3g}/{c['final']:<7.3g} "
              f"{c['worst']:>13.4f} ({c['n_cal']}/{c['n_weighted']}) {a['t']:>6.2f}  [{time.perf_counter() - t:.0f}s]",
              flush=True)
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
