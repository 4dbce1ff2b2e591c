"""Random architecture search on Fashion-MNIST: default Keras init vs `AutoInitHyperModel`.

The same list of random architectures (MLPs: depth 2-40 weighted layers, widths, >= 8 activations,
with/without BatchNormalization, with/without residual connections) is searched twice with
keras-tuner's GridSearch over an ``arch`` hyperparameter: once with the plain hypermodel (Keras'
default init) and once through `autoinit_tf.tuner.AutoInitHyperModel`. Reported per method: median and
best validation accuracy, the fraction of failed trials (NaN loss, accuracy at chance level, or a trial
keras-tuner marks FAILED) and the AutoInit wrap time as a fraction of trial time.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``), a fixed
training subset and a validation subset taken from the official training file (no test data used).

    python benchmarks/nas.py --archs 40 --epochs 2 --train 4000 --val 2000 --out nas.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ACTIVATIONS = ["relu", "elu", "selu", "gelu", "tanh", "sigmoid", "softplus", "silu", "mish", "softsign",
               "leaky_relu"]
WIDTHS = [32, 64, 128]
DATA_DIR = "/usr/share/datasets/fashion-mnist"
CHANCE = 0.1
FAIL_ACC = 0.2  # "at chance level": val accuracy below this (10 classes, chance 0.1)


def load_data(n_train, n_val, seed=0):
    def read(name, offset):
        path = os.path.join(DATA_DIR, name)
        if not os.path.exists(path):
            sys.exit(f"{path} not found: apt-get install -y dataset-fashion-mnist")
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    x = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype("float32") / 255.0
    y = read("train-labels-idx1-ubyte.gz", 8).astype("int32")
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    return (x[tr], y[tr]), (x[va], y[va])


def sample_archs(n, seed=0, min_depth=2, max_depth=40):
    rng = np.random.default_rng(seed)
    archs = []
    for i in range(n):
        # log-uniform depth so shallow and deep nets are both well represented
        depth = int(round(math.exp(rng.uniform(math.log(min_depth), math.log(max_depth + 0.49)))))
        archs.append({
            "id": i,
            "depth": max(min_depth, min(max_depth, depth)),
            "width": int(rng.choice(WIDTHS)),
            "activation": ACTIVATIONS[i % len(ACTIVATIONS)] if i < len(ACTIVATIONS) else str(rng.choice(ACTIVATIONS)),
            "batchnorm": bool(rng.integers(2)),
            "residual": bool(rng.integers(2)),
        })
    return archs


def build_model(spec, lr, optimizer):
    import keras
    from keras import layers

    inp = keras.Input((784,))
    h = layers.Dense(spec["width"], activation=spec["activation"], name="stem")(inp)
    for k in range(spec["depth"] - 2):
        z = layers.Dense(spec["width"], name=f"dense_{k}")(h)
        if spec["batchnorm"]:
            z = layers.BatchNormalization(name=f"bn_{k}")(z)
        z = layers.Activation(spec["activation"], name=f"act_{k}")(z)
        h = layers.Add(name=f"add_{k}")([h, z]) if spec["residual"] else z
    out = layers.Dense(10, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name=f"arch{spec['id']}")
    opt = (keras.optimizers.SGD(lr, momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam(lr))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def make_hypermodel(kt, archs, args, log):
    import keras

    class ArchHyperModel(kt.HyperModel):
        def build(self, hp):
            i = hp.Int("arch", 0, len(archs) - 1)
            keras.utils.set_random_seed(1000 + i)
            return build_model(archs[i], args.lr, args.optimizer)

        def fit(self, hp, model, *fit_args, **kwargs):
            t0 = time.perf_counter()
            hist = model.fit(*fit_args, **kwargs)
            entry = {"arch": hp.values["arch"], "fit_s": time.perf_counter() - t0,
                     "loss": [float(v) for v in hist.history["loss"]],
                     "val_accuracy": [float(v) for v in hist.history["val_accuracy"]]}
            timings = getattr(getattr(self, "outer", None), "timings", None)
            if timings:
                entry.update(build_s=timings[-1]["build_s"], wrap_s=timings[-1]["wrap_s"])
            log.append(entry)
            print("TRIAL " + json.dumps(entry), flush=True)  # progress, one line per trial
            return hist

    return ArchHyperModel()


def run_method(method, archs, data, args, workdir):
    import keras_tuner as kt

    from autoinit_tf.tuner import AutoInitHyperModel

    (x, y), (xv, yv) = data
    log = []
    base = make_hypermodel(kt, archs, args, log)
    if method == "default":
        hm = base
    else:
        hm = AutoInitHyperModel(base, init=method, wrap_kwargs={
            "input_moments": (float(x.mean()), float(x.var())), "seed": 0})
        base.outer = hm
    tuner = kt.GridSearch(hm, objective="val_accuracy", max_trials=len(archs), directory=workdir,
                          project_name=method.replace("+", "_"), overwrite=True,
                          max_consecutive_failed_trials=len(archs) + 1)
    t0 = time.perf_counter()
    tuner.search(x, y, validation_data=(xv, yv), epochs=args.epochs, batch_size=args.batch_size, verbose=0)
    total = time.perf_counter() - t0
    by_arch = {}
    for entry in log:
        by_arch[entry["arch"]] = entry
    timings = getattr(hm, "timings", [])
    # the first timing comes from keras-tuner's space discovery at construction; trial builds follow
    trials = []
    for t in tuner.oracle.trials.values():
        arch = t.hyperparameters.values.get("arch")
        e = by_arch.get(arch, {})
        accs = e.get("val_accuracy", [])
        losses = e.get("loss", [])
        best_acc = max((a for a in accs if np.isfinite(a)), default=float("nan"))
        nan = any(not np.isfinite(v) for v in losses)
        failed = t.status != "COMPLETED" or nan or not (best_acc >= FAIL_ACC)
        trials.append({"arch": arch, "status": t.status, "val_acc": best_acc, "nan": nan, "failed": failed,
                       "fit_s": e.get("fit_s")})
    wrap_s = sum(tm["wrap_s"] for tm in timings[1:]) if timings else 0.0
    build_s = sum(tm["build_s"] for tm in timings[1:]) if timings else float("nan")
    fit_s = sum(t["fit_s"] or 0.0 for t in trials)
    return {"method": method, "trials": trials, "total_s": total, "wrap_s": wrap_s, "build_s": build_s,
            "fit_s": fit_s}


def summarize(res):
    accs = np.array([t["val_acc"] if np.isfinite(t["val_acc"]) else 0.0 for t in res["trials"]])
    n = len(res["trials"])
    return {
        "method": res["method"],
        "trials": n,
        "median_val_acc": float(np.median(accs)) if n else float("nan"),
        "best_val_acc": float(accs.max()) if n else float("nan"),
        "failed_fraction": sum(t["failed"] for t in res["trials"]) / max(n, 1),
        "nan_trials": sum(t["nan"] for t in res["trials"]),
        "kt_failed": sum(t["status"] != "COMPLETED" for t in res["trials"]),
        "wrap_overhead_fraction": res["wrap_s"] / res["total_s"] if res["total_s"] else float("nan"),
        "mean_trial_s": res["total_s"] / max(n, 1),
        "total_s": res["total_s"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=40)
    p.add_argument("--min-depth", type=int, default=2)
    p.add_argument("--max-depth", type=int, default=40)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--methods", default="default,autoinit",
                   help="comma list from default, autoinit, autoinit+probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write per-trial results as JSON here")
    args = p.parse_args(argv)

    import keras
    import keras_tuner

    archs = sample_archs(args.archs, args.seed, args.min_depth, args.max_depth)
    data = load_data(args.train, args.val, args.seed)
    workdir = tempfile.mkdtemp(prefix="autoinit_nas_")
    results = []
    try:
        for method in args.methods.split(","):
            res = run_method(method.strip(), archs, data, args, workdir)
            results.append(res)
            print(json.dumps(summarize(res)), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "python": platform.python_version(), "keras": keras.__version__, "backend": keras.backend.backend(),
        "keras_tuner": keras_tuner.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "args": vars(args),
        "archs": archs,
    }
    try:
        import tensorflow as tf

        meta["tensorflow"] = tf.__version__
    except ImportError:
        pass
    summaries = [summarize(r) for r in results]
    print("\n| method | trials | median val acc | best val acc | failed fraction | NaN trials | "
          "wrap overhead | mean trial s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['method']} | {s['trials']} | {s['median_val_acc']:.4f} | {s['best_val_acc']:.4f} | "
              f"{s['failed_fraction']:.3f} | {s['nan_trials']} | {s['wrap_overhead_fraction']:.2%} | "
              f"{s['mean_trial_s']:.1f} |")
    # per-architecture comparison (same arch, both methods)
    if len(results) >= 2:
        a, b = results[0], results[1]
        acc_a = {t["arch"]: t["val_acc"] for t in a["trials"]}
        acc_b = {t["arch"]: t["val_acc"] for t in b["trials"]}
        common = sorted(set(acc_a) & set(acc_b))
        wins = sum(acc_b[k] > acc_a[k] + 1e-9 for k in common)
        losses = sum(acc_b[k] < acc_a[k] - 1e-9 for k in common)
        print(f"\n{b['method']} vs {a['method']} on the same {len(common)} architectures: "
              f"better on {wins}, worse on {losses}.")
        print("\n| arch | depth | width | act | BN | res | " + " | ".join(r["method"] for r in results) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(results))
        accs = [{t["arch"]: t["val_acc"] for t in r["trials"]} for r in results]
        for s in archs:
            cells = " | ".join(f"{m.get(s['id'], float('nan')):.3f}" for m in accs)
            print(f"| {s['id']} | {s['depth']} | {s['width']} | {s['activation']} | {int(s['batchnorm'])} | "
                  f"{int(s['residual'])} | {cells} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "summaries": summaries, "results": results}, f, indent=1, default=str)
    print("\n" + json.dumps({k: v for k, v in meta.items() if k != "archs"}, default=str))


if __name__ == "__main__":
    main()
