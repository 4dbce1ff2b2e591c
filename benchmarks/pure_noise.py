"""Pure-noise oversampling (OPeN) with DAR-BN on Fashion-MNIST-LT: a long-tailed training set built from the
official training file (class c keeps n_max * (1/ratio)^(c/9) images, ratio 100), three methods with the same
model, optimizer, epochs and seeds:

* ERM: plain shuffled training;
* deferred oversampling: class-balanced sampling from `--defer` on (no noise);
* OPeN + DAR-BN: class-balanced sampling plus pure-noise replacement (delta 1/3) from `--defer` on, every
  BatchNormalization turned into DARBatchNormalization (`setup_pure_noise`).

Reported on the (balanced) Fashion-MNIST test set: balanced accuracy and the accuracy of the three rarest
classes (7, 8, 9).

    python benchmarks/pure_noise.py --n-max 2000 --epochs 12 --defer 6 --seeds 0 1 2 --out pure_noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from powergrad import small_resnet  # noqa: E402
from fashion_mnist import load  # noqa: E402

METHODS = ("ERM", "deferred oversampling", "OPeN + DAR-BN")


def long_tailed(x, y, n_max, ratio, seed):
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(10):
        n_c = max(1, int(round(n_max * (1.0 / ratio) ** (c / 9))))
        keep.append(rng.choice(np.flatnonzero(y == c), n_c, replace=False))
    keep = np.concatenate(keep)
    return x[keep], y[keep]


def scores(model, x, y, with_mask):
    inputs = [x, np.zeros((len(x), 1), "float32")] if with_mask else x
    pred = np.argmax(model.predict(inputs, batch_size=512, verbose=0), axis=1)
    per_class = [float(np.mean(pred[y == c] == c)) for c in range(10)]
    return float(np.mean(per_class)), float(np.mean(per_class[7:]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-max", type=int, default=2000)
    p.add_argument("--ratio", type=float, default=100.0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--defer", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    import autoinit_tf
    from autoinit_tf.noise import PureNoiseSequence, setup_pure_noise

    x_all, y_all = load("train")
    xt, yt = load("test")
    rows = []
    for seed in args.seeds:
        x, y = long_tailed(x_all, y_all, args.n_max, args.ratio, seed)
        row = {"seed": seed, "train_counts": np.bincount(y).tolist()}
        for method in METHODS:
            model = autoinit_tf.wrap(small_resnet(keras, seed, width=16), seed=seed)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9), loss=loss)
            with_mask = method == "OPeN + DAR-BN"
            if method == "ERM":
                model.fit(x, y, batch_size=128, epochs=args.epochs, verbose=0)
            elif method == "deferred oversampling":
                data = PureNoiseSequence(x, y, 128, delta=0.0, start_epoch=args.defer, seed=seed, with_mask=False)
                model.fit(data, epochs=args.epochs, verbose=0)
            else:
                model, data = setup_pure_noise(model, x, y, 128, start_epoch=args.defer, seed=seed)
                model.fit(data, epochs=args.epochs, verbose=0)
            row[method] = scores(model, xt, yt, with_mask)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nFashion-MNIST-LT (ratio {args.ratio:g}, n_max {args.n_max}), small ResNet (width 16, AutoInit), "
          f"{args.epochs} epochs, balancing from epoch {args.defer}, seeds {args.seeds}\n")
    print("| method | balanced test accuracy | rarest 3 classes |")
    print("|---|---|---|")
    for method in METHODS:
        bal = [r[method][0] for r in rows]
        rare = [r[method][1] for r in rows]
        print(f"| {method} | {100 * np.mean(bal):.2f} ± {100 * np.std(bal):.2f} | "
              f"{100 * np.mean(rare):.2f} ± {100 * np.std(rare):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
