"""Signal fidelity: predicted vs measured variance per node, on a zoo of architectures.

For each model and each initialization (default Keras init, analytic `wrap`, `wrap(calibrate="probe")`):
  * median / max over nodes of |log(predicted var / measured var)| (predictions: `analyze(seed=0)`, the
    analytic pass with the same seed `wrap` uses, so for "analytic" they describe the very weights drawn);
  * the measured variance of the final pre-softmax layer;
  * for the calibrated model: the realized pre-activation variance of every weighted layer on a FRESH
    probe (other seed; up to 2048 examples so that the probe's own sampling noise stays well under the
    5% target) relative to the target (worst |ratio - 1|).
Measurements use `autoinit_tf.measure` on a Gaussian probe (0, 1), training mode.

    python benchmarks/fidelity.py [--only NAME ...] [--quick]
    python benchmarks/fidelity.py --diagnose mlp_gelu_30 [--full-cov]

`--diagnose` (Dense MLPs of the zoo) splits the analytic error of the drawn network layer by layer, on
20,000 fresh Gaussian inputs pushed through its real weights and activation ("true" moments):
  * lin: the linear step alone, from the TRUE per-channel input moments: log(sum_i W_ij^2 var_i / true
    Var(z_j)), pooled like the benchmark (mean of per-channel variances + variance of channel means); it
    is the error of treating the input channels as uncorrelated (w_j^T Sigma w_j is exact);
  * act: the activation step alone, from the TRUE per-channel mean and variance of the pre-activation z:
    Gaussian-marginal quadrature (the engine's) vs the true output; the error of treating z as Gaussian;
  * the pre-activations' median excess kurtosis and skewness, and the effective rank
    (sum lambda)^2 / sum lambda^2 of the covariance of the layer input over the inputs;
  * analytic: the engine's accumulated log(predicted / true) at that layer;
  * with --full-cov: the Gaussian closure with the FULL channel covariance (Sigma_z = W^T Sigma_h W, and
    Cov(f(z_i), f(z_j)) by 24 x 24-node bivariate Gauss-Hermite over every pair), i.e. the best any Gaussian
    moment propagation can do, with its median/max log error.
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


def check_batch(model, batch, rep=None, most=2048, element_budget=1 << 22, activation_budget=1 << 25,
                check_rse=0.01):
    """Size of the fresh probe for the calibration check.

    ``most`` examples within an input-element budget, and more where the calibration found the signal
    heavy-tailed: enough that the check's own relative standard error stays at ``check_rse`` (from the
    calibration's per-layer RSE on its batch), as long as the widest activation holds at most
    ``activation_budget`` elements.
    """
    per_example = sum(int(np.prod([d for d in t.shape[1:] if d is not None])) for t in model.inputs)
    n = int(max(batch, min(most, element_budget // max(per_example, 1))))
    if rep is not None and rep.calibration_error and rep.calibration_batch:
        worst = max(rep.calibration_error.values())
        want = int(np.ceil(rep.calibration_batch * (worst / check_rse) ** 2))
        widest = max(int(np.prod([d for d in t.shape[1:] if d is not None])) for layer in model.layers
                     for t in keras.tree.flatten(layer.output))
        n = max(n, min(want, activation_budget // max(widest, 1)))
    return n


def run_one(name, build, batch):
    out = {}
    keras.utils.set_random_seed(0)
    model = build()
    pred = autoinit_tf.analyze(model, seed=0)
    for mode in ("default", "analytic", "calibrated"):
        t0 = time.perf_counter()
        if mode == "analytic":
            autoinit_tf.wrap(model, seed=0, calibrate=None)
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
            # The 5% check needs a fresh probe large enough that its own sampling noise (relative std of a
            # variance estimate ~ sqrt(2 / n)) stays well below 5%: up to 2048 examples, within an element budget.
            check = check_batch(model, batch, rep)
            by = {r.name: r for r in autoinit_tf.measure(model, batch_size=check, seed=2).rows}
            ratios = [(by[n].preactivation or by[n].outputs[0]).var for n in rep.calibration]
            row["worst"] = float(max(abs(np.array(ratios) - 1.0))) if ratios else float("nan")
            row["n_cal"] = len(ratios)
            row["check_batch"] = check
            row["cal_batch"] = rep.calibration_batch
            row["n_weighted"] = sum(r.weighted for r in rep.rows)
        out[mode] = row
    return out


def _pooled(mean, var):
    """Variance over all elements of channels with these means and variances."""
    return float(np.mean(var) + np.var(mean))


def _gaussian_full_cov(fn, mean, cov, nodes=24, chunk=1024):
    """Mean vector and covariance of fn(z), z ~ N(mean, cov): bivariate Gauss-Hermite over every pair.

    For standardised (u, v) with correlation r: u = a, v = r a + sqrt(1 - r^2) b, a, b i.i.d. N(0, 1).
    """
    from autoinit_tf.moments import channel_expectations

    s = np.sqrt(np.maximum(np.diag(cov), 1e-300))
    corr = np.clip(cov / np.outer(s, s), -1.0, 1.0)
    e1, e2 = channel_expectations(fn, mean, s * s)
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    ww = np.outer(w, w)
    iu = np.triu_indices(len(mean), 1)
    out = np.empty(len(iu[0]))
    for a in range(0, len(out), chunk):
        i, j = iu[0][a : a + chunk], iu[1][a : a + chunk]
        r = corr[i, j][:, None, None]
        fu = fn(mean[i][:, None, None] + s[i][:, None, None] * z[None, :, None] + 0.0 * z[None, None, :])
        v = r * z[None, :, None] + np.sqrt(np.maximum(1.0 - r * r, 0.0)) * z[None, None, :]
        fv = fn(mean[j][:, None, None] + s[j][:, None, None] * v)
        out[a : a + chunk] = np.einsum("pab,ab->p", fu * fv, ww)
    second = np.diag(e2)
    second[iu] = out
    second.T[iu] = out
    return e1, second - np.outer(e1, e1)


def diagnose(name, samples=20000, full_cov=False):
    """Per-layer split of the analytic error of a drawn Dense MLP (see the module docstring)."""
    from autoinit_tf.moments import channel_expectations
    from autoinit_tf.rules.activation import kinks_of, numpy_function

    build, _ = ZOO[name]
    keras.utils.set_random_seed(0)
    model = build()
    pred = {r.name: r.outputs[0] for r in autoinit_tf.analyze(model, seed=0).rows if r.outputs}
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if len(dense) != len(model.layers) - 1:
        raise SystemExit(f"--diagnose needs a plain Dense MLP; {name} is not one.")
    rng = np.random.default_rng(5)
    h = rng.standard_normal((samples, int(model.inputs[0].shape[-1])))
    mu, cov = np.zeros(h.shape[1]), np.eye(h.shape[1])
    print(f"{name}: {samples} Gaussian inputs through the drawn weights (seed 0)")
    head = f"{'layer':>5} {'lin':>8} {'act':>8} {'kurt':>6} {'skew':>6} {'eff.rank':>8} {'analytic':>9}"
    print(head + (f" {'full-cov':>9}" if full_cov else ""))
    errs, full_errs, act_sum, lin_sum, last_hidden = [], [], 0.0, 0.0, 0.0
    inputs, layers, trues = [], [], []
    for k, layer in enumerate(dense):
        w = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float64)
        b = np.zeros(w.shape[1]) if layer.bias is None else np.asarray(
            keras.ops.convert_to_numpy(layer.bias), dtype=np.float64)
        fn = numpy_function(layer.activation)
        ev = np.linalg.eigvalsh(np.cov(h.T))
        rank = float(ev.sum() ** 2 / np.sum(ev**2))
        hm, hv = h.mean(axis=0), h.var(axis=0)
        z = h @ w + b
        zm, zv = z.mean(axis=0), z.var(axis=0)
        lin = math.log(_pooled(zm, hv @ (w * w)) / _pooled(zm, zv))
        y = fn(z)
        true = _pooled(y.mean(axis=0), y.var(axis=0))
        e1, e2 = channel_expectations(fn, zm, zv, kinks_of(layer.activation))
        act = math.log(_pooled(e1, e2 - e1 * e1) / true)
        zc = (z - zm) / np.sqrt(zv)
        kurt = float(np.median(np.mean(zc**4, axis=0)) - 3.0)
        skew = float(np.median(np.mean(zc**3, axis=0)))
        analytic = math.log(pred[layer.name].var / true)
        errs.append(abs(analytic))
        if k < len(dense) - 1:  # hidden layers
            lin_sum += lin
            act_sum += act
            last_hidden = analytic
        line = f"{k:>5} {lin:>+8.4f} {act:>+8.4f} {kurt:>+6.2f} {skew:>+6.2f} {rank:>8.1f} {analytic:>+9.4f}"
        if full_cov:
            mz, sz = mu @ w + b, w.T @ cov @ w
            if activation_name(layer.activation) == "linear":
                mu, cov = mz, sz
            else:
                mu, cov = _gaussian_full_cov(fn, mz, sz)
            fe = math.log(_pooled(mu, np.diag(cov)) / true)
            full_errs.append(abs(fe))
            line += f" {fe:>+9.4f}"
        print(line, flush=True)
        inputs.append((hm, hv))
        layers.append((w, b, fn, kinks_of(layer.activation)))
        trues.append(true)
        h = y
    print(f"hidden layers: sum of one-step errors lin {lin_sum:+.3f}, act {act_sum:+.3f}; accumulated analytic "
          f"error at the last one {last_hidden:+.3f}")
    print(f"analytic |log(pred/true)| median {np.median(errs):.3f} max {np.max(errs):.3f}")
    last = len(dense) - 2
    for start in range(0, last + 1, 5):  # the per-channel pass restarted from the true moments at `start`
        m, v = inputs[start]
        for w, b, fn, kinks in layers[start : last + 1]:
            m, v = m @ w + b, v @ (w * w)
            e1, e2 = channel_expectations(fn, m, v, kinks)
            m, v = e1, e2 - e1 * e1
        print(f"per-channel pass restarted from the true moments at layer {start:>2}: log(pred/true) at layer "
              f"{last} {math.log(_pooled(m, v) / trues[last]):+.3f}")
    if full_cov:
        print(f"full-covariance Gaussian closure |log(pred/true)| median {np.median(full_errs):.3f} "
              f"max {np.max(full_errs):.3f}")


def activation_name(fn):
    from autoinit_tf.rules.activation import activation_name as name

    return name(fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--diagnose", metavar="NAME", help="per-layer error split of a Dense MLP of the zoo")
    ap.add_argument("--full-cov", action="store_true", help="with --diagnose: full-covariance Gaussian closure")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.diagnose:
        diagnose(args.diagnose, full_cov=args.full_cov)
        return
    names = args.only or list(ZOO)
    print(f"keras {keras.__version__} backend {keras.backend.backend()}  autoinit-tf {autoinit_tf.__version__}")
    head = (f"{'model':<20} {'default med/max':>16} {'analytic med/max':>17} {'calib med/max':>14} "
            f"{'final var d/a/c':>22} {'calib worst |r-1| (n) [cal n/check n]':>37} {'wrap s':>7}")
    print(head)
    print("-" * len(head))
    for n in names:
        build, batch = ZOO[n]
        t = time.perf_counter()
        r = run_one(n, build, batch)
        d, a, c = r["default"], r["analytic"], r["calibrated"]
        print(f"{n:<20} {d['median']:>7.3f}/{d['max']:<8.3f} {a['median']:>7.3f}/{a['max']:<9.3f} "
              f"{c['median']:>6.3f}/{c['max']:<7.3f} {d['final']:>7.3g}/{a['final']:<6.3g}/{c['final']:<7.3g} "
              f"{c['worst']:>13.4f} ({c['n_cal']}/{c['n_weighted']}) [{c['cal_batch']}/{c['check_batch']}] {a['t']:>6.2f}  [{time.perf_counter() - t:.0f}s]",
              flush=True)
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
