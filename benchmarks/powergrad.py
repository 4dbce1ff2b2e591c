"""PowerGrad (softmax gradient tampering) on Fashion-MNIST: a deliberately small ResNet (width 8, an
underfitting regime: the paper's gains show where training accuracy is not saturated; CIFAR-10 shows none),
alpha in {1 (plain cross-entropy), 0.25, 0.05}, the same optimizer and seeds; train and test accuracy.

    python benchmarks/powergrad.py --train 20000 --epochs 4 --seeds 0 1 2 --out powergrad.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist import load  # noqa: E402


def small_resnet(keras, seed, width=8, momentum=0.9, head=True, name=None):
    """BN momentum 0.9 (PyTorch's 0.1): short runs evaluate in inference mode on settled statistics.
    ``head=False``: the encoder alone (ending in global average pooling)."""
    keras.utils.set_random_seed(seed)
    bn = lambda: keras.layers.BatchNormalization(momentum=momentum)  # noqa: E731
    inp = keras.Input((28, 28, 1))
    h = keras.layers.ReLU()(bn()(keras.layers.Conv2D(width, 3, padding="same")(inp)))
    for w, s in ((width, 1), (2 * width, 2), (4 * width, 2)):
        r = keras.layers.Conv2D(w, 3, strides=s, padding="same")(h)
        r = keras.layers.ReLU()(bn()(r))
        r = bn()(keras.layers.Conv2D(w, 3, padding="same")(r))
        if s != 1 or h.shape[-1] != w:
            h = keras.layers.Conv2D(w, 1, strides=s)(h)
        h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    features = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(features) if head else features, name=name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.25, 0.05])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    import autoinit_tf
    from autoinit_tf.losses import PowerGradCrossEntropy

    x, y = load("train")
    xt, yt = load("test")
    x, y = x[: args.train], y[: args.train]
    rows = []
    for alpha in args.alphas:
        for seed in args.seeds:
            model = autoinit_tf.wrap(small_resnet(keras, seed), seed=seed)
            model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9), loss=PowerGradCrossEntropy(alpha),
                          metrics=["accuracy"])
            model.fit(x, y, batch_size=128, epochs=args.epochs, verbose=0)
            _, train_acc = model.evaluate(x, y, batch_size=512, verbose=0)
            _, test_acc = model.evaluate(xt, yt, batch_size=512, verbose=0)
            row = {"alpha": alpha, "seed": seed, "train_acc": float(train_acc), "test_acc": float(test_acc)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nFashion-MNIST, small ResNet (width 8, AutoInit), {args.train} training images, {args.epochs} epochs of "
          f"SGD lr {args.lr} momentum 0.9, seeds {args.seeds}\n")
    print("| alpha | train accuracy | test accuracy |")
    print("|---|---|---|")
    for alpha in args.alphas:
        rs = [r for r in rows if r["alpha"] == alpha]
        tr, te = [r["train_acc"] for r in rs], [r["test_acc"] for r in rs]
        print(f"| {alpha:g}{' (cross-entropy)' if alpha == 1 else ''} | {100 * np.mean(tr):.2f} ± {100 * np.std(tr):.2f} "
              f"| {100 * np.mean(te):.2f} ± {100 * np.std(te):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
