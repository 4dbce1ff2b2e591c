"""The per-example scale after squeeze-and-excitation gates, predicted against measured, layer by layer.

For one model of `benchmarks/zoo_real.py` (random weights, 96x96 images) after the analytic wrap, per layer
output (every layer whose name contains one of the given patterns; all layers without):

  * lam: the variance over examples of the log of an example's energy (the mean square of its entries about
    its own channel means: its positions' fluctuation), predicted (`Moments.scale`, `rules.shared_part`) and
    measured; "batch": measured about the batch's channel means (the example's channel-mean deviations in);
  * var: the output's variance, predicted and measured;
  * shared: the per-example shared part (`Moments.shared`, averaged over channels), predicted, and the
    variance over examples of an example's channel means measured (which also holds the average of the
    positions' fluctuations: on an H x W map about their variance / (H W), more where positions correlate).

Measured on `--batches` batches of 32 fresh images (the zoo's: pixel values as the model's preprocessing
declares them, `inputs.probe_arrays`) in training mode (BatchNormalization on batch
statistics, as the zoo's recorder):

    python benchmarks/per_example_scale.py MobileNetV3Small [--patterns expanded_conv_10,logits] [--batches 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--patterns", default="", help="comma-separated parts of layer names (default: all)")
    parser.add_argument("--batches", type=int, default=32)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import keras
    import numpy as np

    import autoinit_tf
    import zoo_real
    from autoinit_tf import graph, inputs as inputs_mod

    model = zoo_real.build(args.model)
    _, report = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    rows = {r.name: r for r in report.rows}
    patterns = [p for p in args.patterns.split(",") if p]
    picked, seen = [], set()
    for layer in model.layers[1:]:
        if patterns and not any(p in layer.name for p in patterns):
            continue
        out = layer.output
        if id(out) in seen or layer.name not in rows or not rows[layer.name].outputs:
            continue
        seen.add(id(out))
        picked.append((layer.name, out))
    probe = keras.Model(model.inputs, [t for _, t in picked])
    # The zoo's fresh inputs (`inputs.probe_arrays`: the pixel values the model's own preprocessing declares,
    # what the analytic pass assumes), another seed per batch.
    fn = graph.as_functional(model)
    batches = [[np.asarray(y) for y in keras.tree.flatten(probe(inputs_mod.probe_arrays(fn, None, 32, seed=777 + i)[0],
                                                                 training=True))]
               for i in range(args.batches)]
    print(f"{'layer':44s} {'lam pred':>9s} {'meas':>7s} {'batch':>7s} | {'var pred':>9s} {'meas':>8s} | "
          f"{'shared pred':>11s} {'meas':>8s}")
    for i, (name, _) in enumerate(picked):
        y = np.concatenate([b[i] for b in batches])
        flat = y.reshape(y.shape[0], -1, y.shape[-1])
        # The predicted scale is that of an example's energy about its OWN channel means (its positions'
        # fluctuation; the examples' channel-mean deviations are carried apart, `Given`): measured the same way,
        # and about the batch's channel means (what an example's deviations add) for comparison.
        within = ((flat - flat.mean(axis=1, keepdims=True)) ** 2).mean(axis=(1, 2))
        # (a map of one position has no fluctuation of its own: "-")
        measured_lam = float(np.log(within).var()) if flat.shape[1] > 1 else float("nan")
        about_batch = ((flat - flat.mean(axis=(0, 1))) ** 2).mean(axis=(1, 2))
        batch_lam = float(np.log(np.maximum(about_batch, 1e-300)).var())
        pred = rows[name].outputs[0]
        lam = getattr(pred, "scale", None) or 0.0
        shared = getattr(pred, "shared", None)
        shared = 0.0 if shared is None else float(np.mean(shared))
        means = float(flat.mean(axis=1).var(axis=0).mean())
        print(f"{name:44s} {lam:9.3f} {'-' if measured_lam != measured_lam else f'{measured_lam:.3f}':>7s} {batch_lam:7.3f} | {pred.var:9.4f} {float(flat.var()):8.4f} | "
              f"{shared:11.4f} {means:8.4f}")


if __name__ == "__main__":
    main()
