"""Initializers side by side on Fashion-MNIST: Keras default, AutoInit, AutoInit + calibration, GradInit
(from the default and after AutoInit) and the revisited BatchNorm init (Davis & Frank) where there is BN.

Three models: a 20-layer plain ReLU CNN without normalization, a small ResNet with BatchNormalization, and a
small transformer-encoder classifier (7x7 patches). For each (model, method, seed): the initializer's own
time, the training loss after the first epoch, the best validation accuracy within ``--epochs`` epochs,
whether the run diverged (non-finite loss), and GradInit's time as a fraction of one training epoch of the
same model. Training: SGD (momentum 0.9) for the ResNet, Adam for the plain CNN and the transformer, the same
for every method of a model (GradInit simulates the same optimizer);
the Davis-Frank rows train with `autoinit_tf.bn_optimizer` (gamma's learning rate / 100, no decay on 1-D).

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``): a training subset of
the official training file, validation on a disjoint subset of it (no test data used).

    python benchmarks/init_methods.py --train 10000 --val 5000 --epochs 3 --seeds 0 1 2 --out init_methods.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist import load  # noqa: E402

MODELS = ("plain20", "resnet_bn", "transformer")
METHODS = ("default", "autoinit", "autoinit+calibration", "gradinit", "autoinit+gradinit", "davis-frank",
           "autoinit+davis-frank")
BN_ONLY = {"davis-frank", "autoinit+davis-frank"}


def load_data(n_train, n_val, seed=0):
    x, y = load("train")
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    return (x[tr], y[tr]), (x[va], y[va])


def plain20(keras, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)  # 14x14
    for k in range(18):
        h = keras.layers.Conv2D(16 if k < 9 else 32, 3, strides=2 if k == 9 else 1, padding="same",
                                activation="relu")(h)  # 7x7 after the 10th
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h), name="plain20")


def resnet_bn(keras, seed, momentum=0.9):
    """BatchNormalization momentum 0.9 (PyTorch's 0.1, as in the papers): with Keras' 0.99 a 3-epoch run
    keeps a fifth of the initial moving variance (1.0), which wrecks inference after gamma = 0.1."""
    keras.utils.set_random_seed(seed)
    bn = lambda: keras.layers.BatchNormalization(momentum=momentum)  # noqa: E731
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    h = keras.layers.ReLU()(bn()(h))
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        r = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(h)
        r = keras.layers.ReLU()(bn()(r))
        r = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(r)
        r = bn()(r)
        if stride != 1 or h.shape[-1] != width:
            h = bn()(keras.layers.Conv2D(width, 1, strides=stride, use_bias=False)(h))
        h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h), name="resnet_bn")


def transformer(keras, seed, dim=64, heads=4, blocks=2):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Reshape((16, 49))(keras.layers.Permute((1, 3, 2, 4))(
        keras.layers.Reshape((4, 7, 4, 7))(keras.layers.Reshape((28, 28))(inp))))
    h = keras.layers.Dense(dim)(h)
    try:
        import keras_hub

        h = keras.layers.Add()([h, keras_hub.layers.PositionEmbedding(16)(h)])
    except ImportError:  # no position embedding: the patches' order is still fixed by the Dense above
        pass
    for _ in range(blocks):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(heads, dim // heads)(a, a)
        h = keras.layers.Add()([h, a])
        m = keras.layers.LayerNormalization()(h)
        m = keras.layers.Dense(2 * dim, activation="gelu")(m)
        h = keras.layers.Add()([h, keras.layers.Dense(dim)(m)])
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(h))
    return keras.Model(inp, keras.layers.Dense(10)(h), name="transformer")


BUILDERS = {"plain20": plain20, "resnet_bn": resnet_bn, "transformer": transformer}


def optimizer_for(keras, name, args):
    """SGD (momentum 0.9) for the BN ResNet, as in Davis & Frank and GradInit's CIFAR runs; Adam for the others
    (the 20-layer plain CNN does not leave chance level with SGD at lr 0.005-0.05 within 2 epochs from any
    initialization tried, so SGD would only compare failures)."""
    if name == "resnet_bn":
        return keras.optimizers.SGD(args.sgd_lr, momentum=0.9), "sgd"
    return keras.optimizers.Adam(args.adam_lr), "adam"


class EpochTimer:
    def __init__(self):
        self.times = []

    def callback(self, keras):
        timer = self

        class _Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.times.append(time.perf_counter() - self.t)

        return _Timer()


def run_one(model_name, method, seed, data, args):
    import keras

    import autoinit_tf

    (x, y), (xv, yv) = data
    model = BUILDERS[model_name](keras, seed)
    opt, opt_kind = optimizer_for(keras, model_name, args)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    t0 = time.perf_counter()
    gradinit_report = None
    if method.startswith("autoinit"):
        if method == "autoinit+calibration":
            autoinit_tf.wrap(model, seed=seed, data=x[:1024], calibrate=x[:1024])
        elif method == "autoinit+davis-frank":
            autoinit_tf.wrap(model, seed=seed, data=x[:1024], bn_gamma=0.1)
        else:
            autoinit_tf.wrap(model, seed=seed, data=x[:1024])
    if method == "davis-frank":
        autoinit_tf.revisited_bn_init(model, 0.1)
    if method.endswith("gradinit"):
        gradinit_report = autoinit_tf.gradinit(model, (x, y), loss=loss, optimizer=opt_kind,
                                               steps=args.gradinit_steps, batch_size=args.batch_size, seed=seed,
                                               progress=False)
    init_s = time.perf_counter() - t0
    if method.endswith("davis-frank"):
        opt = autoinit_tf.bn_optimizer(opt, model)
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    timer = EpochTimer()
    hist = model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, validation_data=(xv, yv), verbose=0,
                     callbacks=[timer.callback(keras)])
    losses = hist.history["loss"]
    val = [a for a in hist.history["val_accuracy"] if np.isfinite(a)]
    diverged = not all(np.isfinite(losses))
    row = {
        "model": model_name, "method": method, "seed": seed, "init_s": init_s,
        "train_loss_epoch1": float(losses[0]), "best_val_acc": float(max(val)) if val else float("nan"),
        "final_train_loss": float(losses[-1]), "diverged": bool(diverged),
        "epoch_s": float(np.median(timer.times)),
    }
    if gradinit_report is not None:
        row.update(gradinit_s=gradinit_report.seconds, gradinit_epochs=gradinit_report.seconds / row["epoch_s"],
                   gradinit_constrained=gradinit_report.constraint_steps,
                   gradinit_lookahead=(gradinit_report.lookahead_before, gradinit_report.lookahead_after))
    return row


def summarize(rows):
    out = []
    keys = sorted({(r["model"], r["method"]) for r in rows}, key=lambda k: (MODELS.index(k[0]), METHODS.index(k[1])))
    for model_name, method in keys:
        rs = [r for r in rows if r["model"] == model_name and r["method"] == method]
        ok = [r for r in rs if not r["diverged"]]
        mean = lambda key, rr=ok: float(np.mean([r[key] for r in rr])) if rr else float("nan")  # noqa: E731
        std = lambda key, rr=ok: float(np.std([r[key] for r in rr])) if rr else float("nan")  # noqa: E731
        s = {"model": model_name, "method": method, "runs": len(rs), "diverged": len(rs) - len(ok),
             "init_s": mean("init_s", rs), "train_loss_epoch1": mean("train_loss_epoch1"),
             "train_loss_epoch1_std": std("train_loss_epoch1"), "best_val_acc": mean("best_val_acc"),
             "best_val_acc_std": std("best_val_acc"), "epoch_s": mean("epoch_s", rs)}
        if any("gradinit_epochs" in r for r in rs):
            s["gradinit_epochs"] = mean("gradinit_epochs", rs)
        out.append(s)
    return out


def print_table(summary, args):
    print(f"\nFashion-MNIST, {args.train} train / {args.val} val, {args.epochs} epochs, batch {args.batch_size}, "
          f"seeds {args.seeds}; SGD lr {args.sgd_lr} (momentum 0.9) for resnet_bn, Adam lr {args.adam_lr} for "
          f"plain20 and the transformer; GradInit {args.gradinit_steps} steps (defaults otherwise)\n")
    print("| model | method | train loss after epoch 1 | best val acc | diverged | init s | GradInit / epoch |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        gi = f"{s['gradinit_epochs']:.2f}" if "gradinit_epochs" in s else ""
        print(f"| {s['model']} | {s['method']} | {s['train_loss_epoch1']:.3f} ± {s['train_loss_epoch1_std']:.3f} | "
              f"{100 * s['best_val_acc']:.2f} ± {100 * s['best_val_acc_std']:.2f} | {s['diverged']}/{s['runs']} | "
              f"{s['init_s']:.2f} | {gi} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--val", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sgd-lr", type=float, default=0.05)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--gradinit-steps", type=int, default=40)
    p.add_argument("--out", default=None, help="write every run and the summary as JSON")
    args = p.parse_args(argv)

    import keras

    data = load_data(args.train, args.val)
    rows = []
    for model_name in args.models:
        for method in args.methods:
            if method in BN_ONLY and model_name != "resnet_bn":
                continue
            for seed in args.seeds:
                row = run_one(model_name, method, seed, data, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarize(rows)
    print_table(summary, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary, "keras": keras.__version__,
                       "backend": keras.backend.backend(), "machine": platform.platform(),
                       "cpus": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
