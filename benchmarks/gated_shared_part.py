"""What the analytic pass predicts at the squeeze-and-excitation blocks of a gated network, against measurement.

One process: seed Keras, build the model (`benchmarks/zoo_real.py`'s builder, random weights), run the analytic
``wrap(seed=0, calibrate=None)``, then measure the input of each named block's squeeze (its global average pool)
on 512 probe examples (16 batches of 32, training mode, the calibration's probe generator, seeds 999..1014).
Per block it prints the total variance, the variance across examples of each channel's per-example mean
(averaged over channels; predicted: the `shared` part the pass carries, which leaves out what it carries as the
correlation of positions), the variance of the examples' log-energies (`Moments.scale`), predicted and measured,
at the squeeze's input ("in") and at the gated map (the block's ``<block>_squeeze_excite_mul``, "gated"); for the
squeeze's input also the variance of the pooled output, predicted (shared part and correlated positions together)
and measured ("pooled"). For example

    python benchmarks/gated_shared_part.py MobileNetV3Small expanded_conv expanded_conv_3 expanded_conv_7

(block names are the prefixes of the ``<block>_squeeze_excite_avg_pool`` layers).
"""

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    import numpy as np
    import zoo_real

    import autoinit_tf
    from autoinit_tf import graph, inputs

    warnings.simplefilter("ignore")
    name, blocks = sys.argv[1], sys.argv[2:]
    keras.utils.set_random_seed(0)
    model = zoo_real.build(name)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    rows = {r.name: r for r in rep.rows}
    points = [(b, "in", model.get_layer(b + "_squeeze_excite_avg_pool").input, b + "_squeeze_excite_avg_pool", True)
              for b in blocks]
    points += [(b, "gated", model.get_layer(b + "_squeeze_excite_mul").output, b + "_squeeze_excite_mul", False)
               for b in blocks]
    sub = keras.Model(model.inputs, [p[2] for p in points])
    fn = graph.as_functional(model)
    outs = [[] for _ in points]
    for i in range(16):
        x = inputs.probe_arrays(fn, None, 32, seed=999 + i)[0]
        ys = sub(x, training=True)
        for k, y in enumerate(ys if isinstance(ys, (list, tuple)) else [ys]):
            outs[k].append(keras.ops.convert_to_numpy(y))
    order = sorted(range(len(points)), key=lambda i: (blocks.index(points[i][0]), points[i][1] != "in"))
    for i in order:
        b, where, _, row, as_input = points[i]
        a = np.concatenate(outs[i]).astype(np.float64)
        n, c = len(a), a.shape[-1]
        per_example_mean = a.reshape(n, -1, c).mean(axis=1)
        energy = (a.reshape(n, -1) ** 2).mean(axis=1)
        m = rows[row].inputs[0] if as_input else rows[row].outputs[0]
        shared = float(np.mean(m.shared)) if getattr(m, "shared", None) is not None else float("nan")
        print(f"{b:18s} {where:5s} {'x'.join(map(str, a.shape[1:3])):6s} var pred {m.var:.3f} meas {a.var():.3f} | "
              f"per-example means pred {shared:.4f} meas {per_example_mean.var(axis=0).mean():.4f} | "
              f"log-energy var pred {getattr(m, 'scale', None) or 0.0:.3f} meas {np.log(energy).var():.3f}"
              + (f" | pooled pred {rows[row].outputs[0].var:.4f} meas {per_example_mean.var():.4f}" if as_input else ""))


if __name__ == "__main__":
    main()
