"""The small-data protocol of Brigato et al. (IEEE Access 2022) with keras-tuner: default init vs AutoInit
under the same hyperparameter-optimization budget.

For each dataset (Fashion-MNIST from Debian's ``dataset-fashion-mnist``, scikit-learn's digits), images per
class n and split i: n images per class are drawn from the training pool (seed i) and divided 4:1 into train
and val. keras-tuner's Hyperband (the closest it has to ASHA; reduction factor ``--factor``) searches the
published ranges: learning rate log-uniform [1e-4, 0.1], weight decay log-uniform [1e-5, 0.1], batch size
{10, 25, 50}; SGD with momentum 0.9 and cross-entropy. The best configuration is retrained on train + val and
evaluated by balanced accuracy (mean per-class recall) on the full test set (digits: every image not drawn).
The same search runs once with Keras' default initialization and once through `AutoInitHyperModel`.

Reported per (dataset, n, method), over splits: balanced test accuracy of the retrained best model, the
spread of the trials' validation accuracies (median and interquartile range) and the share of trials that
failed (non-finite loss, or validation accuracy below 1.5x chance).

    python benchmarks/small_data.py --datasets fashion digits --per-class 10 50 100 --splits 0 1 2 \
        --max-epochs 30 --out small_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist  # noqa: E402



def load_dataset(name):
    """((x_pool, y_pool), (x_test, y_test) or None): digits has no test file (the test set is the rest)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x.reshape(-1, 8, 8, 1) / 16.0 - 0.3) / 0.4
        return (x.astype("float32"), y.astype("int32")), None

    return fashion_mnist.load("train"), fashion_mnist.load("test")


def draw_split(pool, test, n, split):
    x, y = pool
    rng = np.random.default_rng(1000 + split)
    classes = np.unique(y)
    picked = [rng.choice(np.flatnonzero(y == c), n, replace=False) for c in classes]
    n_val = max(1, n // 5)
    val = np.concatenate([p[:n_val] for p in picked])
    train = np.concatenate([p[n_val:] for p in picked])
    if test is None:  # digits: every image not drawn
        rest = np.setdiff1d(np.arange(len(x)), np.concatenate(picked))
        test = (x[rest], y[rest])
    return (x[train], y[train]), (x[val], y[val]), test


def balanced_accuracy(y_true, y_pred):
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def build_fn(input_shape, num_classes):
    def build(hp):
        import keras

        lr = hp.Float("lr", 1e-4, 0.1, sampling="log")
        wd = hp.Float("weight_decay", 1e-5, 0.1, sampling="log")
        hp.Choice("batch_size", [10, 25, 50])
        inp = keras.Input(input_shape)
        h = inp
        widths = (32, 64) if input_shape[0] >= 16 else (32,)
        for w in widths:
            h = keras.layers.Conv2D(w, 3, padding="same", activation="relu")(h)
            h = keras.layers.Conv2D(w, 3, padding="same", activation="relu")(h)
            h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(128, activation="relu")(h)
        model = keras.Model(inp, keras.layers.Dense(num_classes)(h))
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9, weight_decay=wd),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model

    return build


def run(dataset, n, split, method, args, workdir):
    import keras
    import keras_tuner as kt

    from autoinit_tf.tuner import AutoInitHyperModel

    pool, test = load_dataset(dataset)
    (x, y), (xv, yv), (xt, yt) = draw_split(pool, test, n, split)
    num_classes = int(pool[1].max()) + 1
    base = build_fn(tuple(x.shape[1:]), num_classes)

    class BatchFromHP(kt.HyperModel):
        def build(self, hp):
            return base(hp)

        def fit(self, hp, model, *fit_args, **kwargs):
            kwargs["batch_size"] = hp.get("batch_size")
            return model.fit(*fit_args, **kwargs)

    inner = BatchFromHP()
    hm = inner if method == "default" else AutoInitHyperModel(inner, init="autoinit",
                                                             wrap_kwargs={"seed": split, "data": x})
    tuner = kt.Hyperband(hm, objective="val_accuracy", max_epochs=args.max_epochs, factor=args.factor,
                         hyperband_iterations=1, seed=split, directory=workdir,
                         project_name=f"{dataset}_{n}_{split}_{method}", overwrite=True,
                         max_consecutive_failed_trials=10**6)
    t0 = time.perf_counter()
    tuner.search(x, y, validation_data=(xv, yv), verbose=0)
    search_s = time.perf_counter() - t0
    chance = 1.0 / num_classes
    trials = []
    for trial in tuner.oracle.trials.values():
        metric = trial.metrics.get_best_value("val_accuracy") if trial.metrics.exists("val_accuracy") else None
        losses = trial.metrics.get_history("loss") if trial.metrics.exists("loss") else []
        finite = all(np.isfinite(o.value[0] if hasattr(o, "value") else o) for o in losses) if losses else False
        acc = float(metric) if metric is not None and np.isfinite(metric) else float("nan")
        trials.append({"val_acc": acc, "failed": (not finite) or not (acc >= 1.5 * chance),
                       "status": str(trial.status)})
    best_hp = tuner.get_best_hyperparameters(1)[0]
    keras.utils.set_random_seed(split)
    model = hm.build(best_hp)
    best_epochs = int(best_hp.values.get("tuner/epochs", args.max_epochs))
    xa, ya = np.concatenate([x, xv]), np.concatenate([y, yv])
    model.fit(xa, ya, batch_size=best_hp.get("batch_size"), epochs=best_epochs, verbose=0)
    pred = np.argmax(model.predict(xt, batch_size=512, verbose=0), axis=1)
    return {"dataset": dataset, "per_class": n, "split": split, "method": method,
            "balanced_test_acc": balanced_accuracy(yt, pred), "best": {k: best_hp.values[k] for k in
                                                                     ("lr", "weight_decay", "batch_size")},
            "trials": trials, "search_s": search_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["fashion", "digits"], choices=["fashion", "digits"])
    p.add_argument("--per-class", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["default", "autoinit"], choices=["default", "autoinit"])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--factor", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    workdir = tempfile.mkdtemp(prefix="autoinit_small_data_")
    rows = []
    try:
        for dataset in args.datasets:
            for n in args.per_class:
                for split in args.splits:
                    for method in args.methods:
                        row = run(dataset, n, split, method, args, workdir)
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "trials"}
                                         | {"trials": len(row["trials"]),
                                            "failed": sum(t["failed"] for t in row["trials"])}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nBalanced test accuracy (%) of the retrained best configuration, mean ± std over splits {args.splits}; "
          f"Hyperband max_epochs {args.max_epochs}, factor {args.factor}\n")
    print("| dataset | images per class | method | balanced test acc | trial val acc median [IQR] | failed trials |")
    print("|---|---|---|---|---|---|")
    for dataset in args.datasets:
        for n in args.per_class:
            for method in args.methods:
                rs = [r for r in rows if r["dataset"] == dataset and r["per_class"] == n and r["method"] == method]
                accs = [r["balanced_test_acc"] for r in rs]
                vals = np.array([t["val_acc"] for r in rs for t in r["trials"]])
                vals = np.where(np.isfinite(vals), vals, 0.0)
                failed = sum(t["failed"] for r in rs for t in r["trials"])
                total = sum(len(r["trials"]) for r in rs)
                q1, med, q3 = np.percentile(vals, [25, 50, 75]) if len(vals) else (np.nan,) * 3
                print(f"| {dataset} | {n} | {method} | {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} | "
                      f"{100 * med:.1f} [{100 * q1:.1f}, {100 * q3:.1f}] | {failed}/{total} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "keras": keras.__version__,
                       "backend": keras.backend.backend(), "machine": platform.platform()}, f, indent=1)


if __name__ == "__main__":
    main()
