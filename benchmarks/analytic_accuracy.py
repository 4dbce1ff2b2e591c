"""Analytic-wrap accuracy of one zoo model from a given source tree, for side-by-side comparisons of commits.

One process: seed Keras, build the model (`benchmarks/zoo_real.py`'s builder, random weights), run
``wrap(seed=0, calibrate=None)``, then measure every weighted layer's pre-activation variance with the zoo's
recorder on `--fresh` fresh inputs (batches of 32, training mode; the zoo's inputs, another seed than any
probe). Prints the median and worst |log var| over the layers, and with ``--layers`` each layer's log var
and its standard error. Run it for two checkouts of the project, e.g.

    git worktree add /tmp/old 7435e7d
    python benchmarks/analytic_accuracy.py /tmp/old EfficientNetV2B0 --fresh 1024
    python benchmarks/analytic_accuracy.py . EfficientNetV2B0 --fresh 1024

(the same build seed and fresh inputs in both, so only the source differs).
"""

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("model")
    ap.add_argument("--fresh", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=3, help="the fresh inputs' seed")
    ap.add_argument("--layers", action="store_true")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import keras
    import numpy as np

    import autoinit_tf
    import zoo_real
    from autoinit_tf import graph

    if not os.path.abspath(autoinit_tf.__file__).startswith(root):
        raise SystemExit(f"imported {autoinit_tf.__file__}, not the tree at {root}")
    warnings.simplefilter("ignore")
    keras.utils.set_random_seed(0)
    model = zoo_real.build(args.model)
    fn = graph.as_functional(model)
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    rec = zoo_real.Recorder(zoo_real.weighted_layers(model))

    batches = (zoo_real.fresh_inputs(fn, 32, args.seed * 100000 + 12345 + i) for i in range(max(args.fresh // 32, 1)))
    var, _ = rec.run(model, batches)
    logs = {k: float(np.log(v)) for k, v in var.items() if v > 0}
    a = np.abs(np.array(list(logs.values())))
    if args.layers:
        for k, v in logs.items():
            print(f"  {v:+.3f} +-{rec.rse[k]:.3f} {k}")
    print(f"{os.path.basename(root):10s} {args.model:18s} fresh {args.fresh}  layers {len(a)}  "
          f"median |log var| {np.median(a):.3f}  worst {a.max():.3f}  in [0.5, 2] {np.mean(a <= np.log(2.0)):.0%}")


if __name__ == "__main__":
    main()
