"""All-CNN-C style network on Fashion-MNIST: pooling and activation swaps, default init vs AutoInit.

Compares (Springenberg et al. 2015; Clevert et al. 2016; Lowe et al. 2022):
  * max-pooling (the "C" base model) vs ``maxpool->strided_conv`` (All-CNN-C),
  * ReLU vs ``relu->elu`` vs ``act:relu->ail_dup`` (logit gates, width kept),
each with Keras' default initialization and with ``autoinit_tf.wrap``. The swaps are applied with
``autoinit_tf.rewrite`` (default init) or ``autoinit_tf.wrap(model, swaps=...)`` (AutoInit).

Offline data: ``apt-get install -y dataset-fashion-mnist`` (files in /usr/share/datasets/fashion-mnist/).
A scaled-down network (width 24/48 instead of 96/192; divisible by 3 for the AIL dup gates) on a subset keeps the whole run to ~15 minutes on
2 CPU cores:

    python examples/all_cnn.py --train 3000 --test 2000 --epochs 3 --lrs 0.01,0.03 --seeds 0

Both inits use the same optimizer (SGD, momentum 0.9) and the same learning-rate sweep; a run that
reaches a non-finite loss stops there (``TerminateOnNaN``) and is reported as diverged. The summary
gives, per network and init, the learning rate with the lowest mean final training loss over the seeds
(chosen without looking at the test set) and its test accuracy (mean and range over seeds).
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
import warnings

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"


def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(n_train, n_test, seed=0):
    if not os.path.isdir(DATA):
        raise SystemExit(f"{DATA} not found: apt-get install -y dataset-fashion-mnist")
    xtr = load_idx(f"{DATA}/train-images-idx3-ubyte.gz")
    ytr = load_idx(f"{DATA}/train-labels-idx1-ubyte.gz")
    xte = load_idx(f"{DATA}/t10k-images-idx3-ubyte.gz")
    yte = load_idx(f"{DATA}/t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    itr = rng.permutation(len(xtr))[:n_train]
    ite = rng.permutation(len(xte))[:n_test]
    mean, std = xtr.mean() / 255.0, xtr.std() / 255.0

    def prep(x):
        return ((x.astype("float32") / 255.0 - mean) / std)[..., None]

    return prep(xtr[itr]), ytr[itr].astype("int32"), prep(xte[ite]), yte[ite].astype("int32")


def all_cnn_c_base(width=32, num_classes=10):
    """Model C of Springenberg et al.: 3x3 convs with 3x3/2 max-pooling, GAP head (no BN)."""
    import keras
    from keras import layers as L

    w1, w2 = width, 2 * width
    i = keras.Input((28, 28, 1), name="image")
    x = L.Dropout(0.2, name="drop_in")(i)
    x = L.Conv2D(w1, 3, padding="same", activation="relu", name="conv1a")(x)
    x = L.Conv2D(w1, 3, padding="same", activation="relu", name="conv1b")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)  # 14x14
    x = L.Dropout(0.5, name="drop1")(x)
    x = L.Conv2D(w2, 3, padding="same", activation="relu", name="conv2a")(x)
    x = L.Conv2D(w2, 3, padding="same", activation="relu", name="conv2b")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)  # 7x7
    x = L.Dropout(0.5, name="drop2")(x)
    x = L.Conv2D(w2, 3, padding="valid", activation="relu", name="conv3a")(x)  # 5x5
    x = L.Conv2D(w2, 1, activation="relu", name="conv3b")(x)
    x = L.Conv2D(num_classes, 1, name="conv3c")(x)  # no ReLU before GAP (documented choice)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    o = L.Activation("softmax", name="softmax")(x)
    return keras.Model(i, o, name="all_cnn_c")


CONFIGS = [
    ("max-pool + ReLU", []),
    ("strided conv + ReLU", ["maxpool->strided_conv"]),
    ("max-pool + ELU", ["relu->elu"]),
    ("max-pool + AIL dup", ["act:relu->ail_dup"]),
]


def run(name, swaps, init, data, args, lr, seed):
    import keras

    import autoinit_tf

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    xtr, ytr, xte, yte = data
    base = all_cnn_c_base(args.width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if init == "autoinit":
            model = autoinit_tf.wrap(base, swaps=swaps or None, data=xtr[:512], seed=seed)
        else:
            model = autoinit_tf.rewrite(base, swaps) if swaps else base
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    hist = model.fit(xtr, ytr, batch_size=args.batch, epochs=args.epochs, verbose=0,
                     callbacks=[keras.callbacks.TerminateOnNaN()])
    secs = time.perf_counter() - t0
    train_loss = hist.history["loss"][-1]
    if not np.isfinite(train_loss) or model.stop_training:
        loss, acc, train_loss = float("nan"), float("nan"), float("nan")
    else:
        loss, acc = model.evaluate(xte, yte, batch_size=512, verbose=0)
    return dict(name=name, init=init, lr=lr, seed=seed, params=model.count_params(), train_loss=train_loss,
                test_loss=loss, test_acc=acc, secs=secs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lrs", default="0.01,0.03", help="comma-separated SGD learning rates (swept)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (init, dropout, data order)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test subset")
    p.add_argument("--only", default=None, help="comma-separated config indices (0-3)")
    args = p.parse_args(argv)
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    data = load_fashion_mnist(args.train, args.test, args.data_seed)
    configs = CONFIGS if args.only is None else [CONFIGS[int(i)] for i in args.only.split(",")]
    rows = []
    for name, swaps in configs:
        for init in ("default", "autoinit"):
            for lr in lrs:
                for seed in seeds:
                    r = run(name, swaps, init, data, args, lr, seed)
                    rows.append(r)
                    print(f"  done: {r['name']:<22} {r['init']:<9} lr {lr:<6g} seed {seed} "
                          f"train loss {r['train_loss']:.3f} acc {r['test_acc']:.4f} ({r['secs']:.0f}s)", flush=True)
    print()
    print(f"All-CNN-C (width {args.width}/{2 * args.width}) on Fashion-MNIST, {args.train} train / {args.test} test, "
          f"{args.epochs} epochs, SGD momentum 0.9, batch {args.batch}, lrs {lrs}, seeds {seeds}")
    print()
    swaps_of = dict(CONFIGS)
    print("All runs (nan = diverged, stopped at the first non-finite loss):")
    print()
    print("| network | init | lr | seed | train loss | test loss | test acc | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['init']} | {r['lr']:g} | {r['seed']} | {r['train_loss']:.3f} | "
              f"{r['test_loss']:.3f} | {r['test_acc']:.4f} | {r['secs']:.0f} |")
    print()
    print("Best learning rate per network and init (lowest mean final train loss over seeds):")
    print()
    print("| network | swaps | init | params | best lr | train loss | test acc (mean) | test acc (min-max) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, _ in configs:
        for init in ("default", "autoinit"):
            best = None
            for lr in lrs:
                rs = [r for r in rows if r["name"] == name and r["init"] == init and r["lr"] == lr]
                tl = float(np.mean([r["train_loss"] for r in rs]))
                if np.isfinite(tl) and (best is None or tl < best[1]):
                    best = (lr, tl, rs)
            sw = ", ".join(f"`{s}`" for s in swaps_of[name]) or "-"
            if best is None:
                print(f"| {name} | {sw} | {init} | - | all diverged | nan | - | - |")
                continue
            lr, tl, rs = best
            accs = [r["test_acc"] for r in rs]
            print(f"| {name} | {sw} | {init} | {rs[0]['params']:,} | {lr:g} | {tl:.3f} | {np.mean(accs):.4f} | "
                  f"{min(accs):.4f}-{max(accs):.4f} |")


if __name__ == "__main__":
    main()
