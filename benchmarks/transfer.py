"""Transfer on Fashion-MNIST: pretrain a small CNN (AutoInit) on classes 0-4, transfer to classes 5-9 with
10, 50 and 100 labelled images per class.

Methods, per (images per class, seed):
* ``linear probe``: `autoinit_tf.transfer.linear_probe` on the frozen backbone (L-BFGS logistic regression,
  strength chosen on a held-out quarter of the labelled images from Kornblith's 45-value grid, refit on all);
* ``fine-tune, AutoInit head``: `fine_tune_model(backbone, 5, data=labelled images)`: the head initialized
  from the backbone's real features, then the whole network fine-tuned (BN statistics frozen);
* ``fine-tune, default head``: the same with Keras' default head initialization;
* ``from scratch``: the same CNN with Keras' default initialization, trained on the labelled images only.
Fine-tuning and from-scratch training use the same optimizer (Adam), batch and number of epochs.
Reported: accuracy on the Fashion-MNIST test images of classes 5-9 (5,000 images, balanced).

    python benchmarks/transfer.py --per-class 10 50 100 --seeds 0 1 2 --out transfer.json
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

METHODS = ("linear probe", "fine-tune, AutoInit head", "fine-tune, default head", "from scratch")


def cnn(keras, num_classes, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1))
    h = inp
    for width, pool in ((32, False), (32, True), (64, False), (64, True), (128, False)):
        h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        if pool:
            h = keras.layers.MaxPooling2D()(h)
    features = keras.layers.GlobalAveragePooling2D(name="features")(h)
    return keras.Model(inp, keras.layers.Dense(num_classes, name="head")(features), name="cnn")


def backbone_of(keras, model):
    return keras.Model(model.inputs, model.get_layer("features").output, name="backbone")


def copy_backbone(keras, backbone):
    clone = keras.models.clone_model(backbone)
    clone.set_weights(backbone.get_weights())
    return clone


def accuracy(keras, model, x, y):
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain", type=int, default=15000, help="source images (classes 0-4)")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning / from-scratch epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (from scratch, head warm-up)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4, help="Adam learning rate when fine-tuning")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    import autoinit_tf
    from autoinit_tf.transfer import fine_tune_model, linear_probe

    x_train, y_train = load("train")
    x_test, y_test = load("test")
    source = np.flatnonzero(y_train < 5)[: args.pretrain]
    target_test = np.flatnonzero(y_test >= 5)
    xt, yt = x_test[target_test], y_test[target_test] - 5

    t0 = time.perf_counter()
    pre = autoinit_tf.wrap(cnn(keras, 5, 0), seed=0, data=x_train[source[:1024]])
    pre.compile(optimizer=keras.optimizers.Adam(args.lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    pre.fit(x_train[source], y_train[source], batch_size=128, epochs=args.pretrain_epochs, verbose=0)
    backbone = backbone_of(keras, pre)
    source_test = np.flatnonzero(y_test < 5)
    print(f"pretrained on {len(source)} images of classes 0-4 in {time.perf_counter() - t0:.0f}s: "
          f"source test accuracy {100 * accuracy(keras, pre, x_test[source_test], y_test[source_test]):.2f}%",
          flush=True)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = []
    for n in args.per_class:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            picked = np.concatenate([rng.choice(np.flatnonzero(y_train == c), n, replace=False) for c in range(5, 10)])
            rng.shuffle(picked)
            xs, ys = x_train[picked], y_train[picked] - 5
            result = {"per_class": n, "seed": seed}
            # linear probe: strength chosen on a held-out quarter, refit on all labelled images
            cut = max(5, len(xs) // 4)
            head, report = linear_probe(backbone, (xs[cut:], ys[cut:]), (xs[:cut], ys[:cut]), num_classes=5,
                                        progress=False)
            probe = keras.Sequential([backbone, head])
            result["linear probe"] = accuracy(keras, probe, xt, yt)
            result["probe_l2"] = report.chosen_l2
            for method, data in (("fine-tune, AutoInit head", xs), ("fine-tune, default head", None)):
                keras.utils.set_random_seed(seed)
                model = fine_tune_model(copy_backbone(keras, backbone), 5, freeze=False, data=data, seed=seed)
                model.compile(optimizer=keras.optimizers.Adam(args.fine_tune_lr), loss=loss)
                model.fit(xs, ys, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
                result[method] = accuracy(keras, model, xt, yt)
            scratch = cnn(keras, 5, seed)
            scratch.compile(optimizer=keras.optimizers.Adam(args.lr), loss=loss)
            scratch.fit(xs, ys, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
            result["from scratch"] = accuracy(keras, scratch, xt, yt)
            rows.append(result)
            print(json.dumps(result), flush=True)

    print(f"\nFashion-MNIST classes 5-9 test accuracy (%), backbone pretrained on classes 0-4; "
          f"{args.epochs} epochs of Adam (fine-tune lr {args.fine_tune_lr}, scratch lr {args.lr}), seeds {args.seeds}\n")
    print("| images per class | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for n in args.per_class:
        rs = [r for r in rows if r["per_class"] == n]
        cells = [f"{100 * np.mean([r[m] for r in rs]):.2f} ± {100 * np.std([r[m] for r in rs]):.2f}" for m in METHODS]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "keras": keras.__version__,
                       "backend": keras.backend.backend(), "machine": platform.platform()}, f, indent=1)


if __name__ == "__main__":
    main()
