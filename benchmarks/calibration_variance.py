"""How precisely a probe measures each layer's variance: the plain estimate against a ratio estimate.

Calibration sets a layer's kernel from the mean of its examples' energies q (mean square over an example's own
entries) on the probe; its relative standard error is std(q) / (mean(q) sqrt(n)), large after
squeeze-and-excitation gates (a few examples carry much of the energy), which is what makes the default wrap of
EfficientNet and MobileNetV3 replay big probes twice. Where a layer's output energy follows its input's example
by example, the ratio mean(q_out) / mean(q_in) is known far better than either mean (ratio estimator:
rse = std(q_out - r q_in) / (mean(q_out) sqrt(n))). This prints both for every Conv / Dense layer of one zoo
model after the analytic wrap, on fresh inputs in training mode (batches of 32), the twelve worst plain ones
first, and the worst of each and of the better of the two per layer:

    python benchmarks/calibration_variance.py EfficientNetV2B0 [--examples 448]

The ratio estimate needs the input's population energy, which for a calibrated input is only known to that
input's own calibration error: chained from the network input, the steps' errors add up again (BENCHMARKS.md,
"What a probe can know about a gated layer's variance"), so the per-layer figures here are upper bounds of the
gain, not what `wrap` does.
"""

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--examples", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import keras
    import numpy as np

    import autoinit_tf
    import zoo_real
    from autoinit_tf import graph

    model = zoo_real.build(args.model)
    autoinit_tf.wrap(model, seed=0, calibrate=None)
    layers = [l for l in graph.layer_tree(model, include_self=False)
              if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense))]
    probe = keras.Model(model.inputs, [t for l in layers for t in (l.input, l.output)])
    x = zoo_real.fresh_inputs(graph.as_functional(model), args.examples, seed=5)
    parts = []
    for i in range(0, args.examples, args.batch):
        xb = x[i:i + args.batch]
        parts.append([np.mean(np.square(np.asarray(t, dtype=np.float64).reshape(len(xb), -1)), axis=1)
                      for t in probe(xb, training=True)])
    energies = [np.concatenate([p[k] for p in parts]) for k in range(2 * len(layers))]
    n = len(energies[0])
    rows = []
    for j, layer in enumerate(layers):
        q_in, q_out = energies[2 * j], energies[2 * j + 1]
        plain = q_out.std(ddof=1) / (q_out.mean() * np.sqrt(n))
        r = q_out.mean() / q_in.mean()
        ratio = (q_out - r * q_in).std(ddof=1) / (q_out.mean() * np.sqrt(n))
        rows.append((plain, ratio, layer.name))
    print(f"{args.model}: relative standard error of each layer's variance on {n} fresh examples")
    for plain, ratio, name in sorted(rows, reverse=True)[:12]:
        print(f"  {name:30s} plain {plain:.4f}  ratio {ratio:.4f}")
    print(f"worst: plain {max(r[0] for r in rows):.4f}, ratio {max(r[1] for r in rows):.4f}, "
          f"the better of the two per layer {max(min(r[0], r[1]) for r in rows):.4f}")


if __name__ == "__main__":
    main()
