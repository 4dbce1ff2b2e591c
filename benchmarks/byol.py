"""BYOL on Fashion-MNIST (images in [0, 1]): pre-train a small ResNet encoder without labels, then a linear
probe (`autoinit_tf.transfer.linear_probe`) on its features. Compared, per seed: BYOL from a default-initialized
and from an AutoInit-wrapped encoder, the random encoders themselves (no training), and a supervised encoder
trained with labels for the same epochs. The collapse monitor's trace is printed.

    python benchmarks/byol.py --pretrain 10000 --epochs 5 --seeds 0 --out byol.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist import MEAN, STD, load  # noqa: E402
from powergrad import small_resnet  # noqa: E402


def encoder(keras, seed, width=16):
    """The small ResNet of powergrad.py without its head, Keras' BN momentum (0.99) as in the recorded run."""
    return small_resnet(keras, seed, width=width, momentum=0.99, head=False, name="encoder")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain", type=int, default=10000)
    p.add_argument("--probe-train", type=int, default=5000)
    p.add_argument("--probe-val", type=int, default=2000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.45 * 256 / 256, help="LARS base lr x batch / 256 (BYOL <= 100 ep)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    import autoinit_tf
    from autoinit_tf.byol import BYOL, TAU_PRESETS
    from autoinit_tf.optimizers import LARS
    from autoinit_tf.transfer import linear_probe

    x, y = load("train")
    x = x * STD + MEAN  # back to [0, 1] for the colour augmentations
    xt, yt = load("test")
    xt = (xt * STD + MEAN)[: args.test]
    yt = yt[: args.test]
    pre = x[: args.pretrain]
    a, b = args.pretrain, args.pretrain + args.probe_train
    train, val = (x[a:b], y[a:b]), (x[b:b + args.probe_val], y[b:b + args.probe_val])
    rows = []

    def probe(enc):
        head, rep = linear_probe(enc, train, val, progress=False, max_iter=500)
        logits = head(enc.predict(xt, batch_size=512, verbose=0))
        return float(np.mean(np.argmax(keras.ops.convert_to_numpy(logits), 1) == yt)), rep.chosen_l2

    for seed in args.seeds:
        row = {"seed": seed}
        for init in ("default", "autoinit"):
            enc = encoder(keras, seed)
            if init == "autoinit":
                autoinit_tf.wrap(enc, seed=seed, data=pre[:512])
            row[f"random {init}"] = probe(enc)[0]
            byol = BYOL(enc, projection_dim=128, hidden_dim=512, tau_base=TAU_PRESETS[40], seed=seed)
            byol.compile(optimizer=LARS(args.lr, weight_decay=1e-6))
            hist = byol.fit(pre, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
            row[f"BYOL {init}"] = probe(byol.encoder)[0]
            row[f"BYOL {init} loss"] = [float(v) for v in hist.history["loss"]]
            row[f"BYOL {init} collapse trace"] = byol.collapse_monitor.history
        enc = autoinit_tf.wrap(encoder(keras, seed), seed=seed, data=pre[:512])
        clf = keras.Sequential([enc, keras.layers.Dense(10)])
        clf.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        clf.fit(pre, y[: args.pretrain], batch_size=args.batch_size, epochs=args.epochs, verbose=0)
        row["supervised (AutoInit)"] = probe(enc)[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    methods = ["random default", "random autoinit", "BYOL default", "BYOL autoinit", "supervised (AutoInit)"]
    print(f"\nLinear-probe test accuracy (%) on Fashion-MNIST ({args.test} test images); encoders pre-trained on "
          f"{args.pretrain} images for {args.epochs} epochs (BYOL: LARS lr {args.lr}, batch {args.batch_size}, "
          f"tau_base {TAU_PRESETS[40]}), seeds {args.seeds}\n")
    print("| encoder | linear probe accuracy |")
    print("|---|---|")
    for m in methods:
        v = [r[m] for r in rows]
        print(f"| {m} | {100 * np.mean(v):.2f} ± {100 * np.std(v):.2f} |")
    for r in rows:
        for init in ("default", "autoinit"):
            trace = ", ".join(f"{s}:{v:.3f}" for s, v in r[f"BYOL {init} collapse trace"])
            print(f"collapse monitor, seed {r['seed']}, {init}: {trace}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
