"""Network slimming on Fashion-MNIST: sparsity training, channel surgery at 40% and 70%, fine-tuning.

Per seed, a VGG-style CNN (conv-BN-ReLU x 6, two max-pools, GAP, Dense), every run trained alike (SGD
momentum 0.9, batch 64, lr 0.05 cosine-decayed to 0), as in the paper's protocol where the pruned model is
fine-tuned with the full schedule again:
* ``baseline``: trained E epochs without sparsity (the unpruned reference);
* ``sparse``: trained E epochs with lam * sum |gamma| on every BatchNormalization (lam = 1e-4, the paper's VGG
  value; `autoinit_tf.slimming.add_bn_sparsity`);
* ``pruned r``: `autoinit_tf.prune_channels(sparse, ratio=r)` (global |gamma| percentile, channels physically
  removed, the removed channels' constant output folded into the next biases), accuracy before and after F
  fine-tuning epochs.
Reported: test accuracy (10,000 test images), parameters, multiply-adds, and CPU inference ms per batch of
256 (`predict_on_batch`, median of 20 after warm-up), measured side by side in one run.

    python benchmarks/slimming.py --train 10000 --epochs 15 --finetune 15 --seeds 0 1 2 --out slimming.json
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


def vgg(keras, seed, widths=(16, 16, "P", 32, 32, "P", 64, 64)):
    """BN momentum 0.9 (PyTorch's 0.1): short runs evaluate in inference mode on settled statistics."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1))
    h = inp
    for w in widths:
        if w == "P":
            h = keras.layers.MaxPooling2D()(h)
            continue
        h = keras.layers.Conv2D(w, 3, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h))


def latency_ms(model, x, repeats=20):
    model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def accuracy(model, x, y):
    return float((np.argmax(model.predict(x, batch_size=512, verbose=0), 1) == y).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--finetune", type=int, default=15)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.7])
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    from autoinit_tf import prune_channels
    from autoinit_tf.slimming import add_bn_sparsity, model_flops

    x, y = load("train")
    xt, yt = load("test")
    x, y = x[: args.train], y[: args.train]
    xb = xt[:256]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(model, epochs, lr, seed):
        """SGD momentum 0.9, batch 64, the learning rate cosine-decayed to 0 over the run (every run alike)."""
        keras.utils.set_random_seed(seed)
        steps = epochs * -(-len(x) // 64)
        model.compile(keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, steps), momentum=0.9), loss)
        model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
        return model

    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        base = fit(vgg(keras, seed), args.epochs, args.lr, seed)
        row = {"seed": seed, "baseline": accuracy(base, xt, yt), "params": base.count_params(),
               "flops": model_flops(base), "ms": latency_ms(base, xb)}
        sparse = vgg(keras, seed)
        add_bn_sparsity(sparse, args.lam)
        fit(sparse, args.epochs, args.lr, seed)
        row["sparse"] = accuracy(sparse, xt, yt)
        for r in args.ratios:
            pruned, report = prune_channels(sparse, ratio=r)
            before = accuracy(pruned, xt, yt)
            fit(pruned, args.finetune, args.lr, seed)
            row[f"pruned {r:g}"] = {"before_ft": before, "after_ft": accuracy(pruned, xt, yt),
                                    "params": pruned.count_params(), "flops": model_flops(pruned),
                                    "ms": latency_ms(pruned, xb)}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)

    def stat(values):
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"

    print(f"\nFashion-MNIST, {args.train} training images, E={args.epochs} + F={args.finetune} epochs, "
          f"seeds {args.seeds}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    base = rows[0]
    print(f"{'model':<22}{'test acc %':>18}{'params':>10}{'MACs':>12}{'ms/256':>9}")
    print(f"{'baseline (E)':<22}{stat([r['baseline'] for r in rows]):>18}{base['params']:>10,}"
          f"{base['flops']:>12,}{np.mean([r['ms'] for r in rows]):>9.1f}")
    print(f"{'sparse (E, lam)':<22}{stat([r['sparse'] for r in rows]):>18}")
    for r in args.ratios:
        k = f"pruned {r:g}"
        print(f"{k + ' before FT':<22}{stat([row[k]['before_ft'] for row in rows]):>18}")
        print(f"{k + ' after FT':<22}{stat([row[k]['after_ft'] for row in rows]):>18}"
              f"{int(np.mean([row[k]['params'] for row in rows])):>10,}{int(np.mean([row[k]['flops'] for row in rows])):>12,}"
              f"{np.mean([row[k]['ms'] for row in rows]):>9.1f}")
        gap = [row["baseline"] - row[k]["after_ft"] for row in rows]
        print(f"{'':<22}gap to baseline {100 * np.mean(gap):+.2f} points; params x{base['params'] / np.mean([row[k]['params'] for row in rows]):.2f} fewer, "
              f"MACs x{base['flops'] / np.mean([row[k]['flops'] for row in rows]):.2f} fewer, "
              f"latency x{np.mean([row['ms'] for row in rows]) / np.mean([row[k]['ms'] for row in rows]):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
