"""The models users run: keras.applications and keras-hub backbones, wrapped as a new user would.

Each model is built in its own subprocess (random weights, small inputs: 96x96 images, 64 tokens,
vocabulary 1000) and goes through analyze, ``wrap(calibrate=None)`` (analytic), ``wrap()`` (the default,
``calibrate="auto"``) and ``wrap(calibrate="probe")``. Per model it prints:

  * build / analyze / wrap times (s) for each mode, wrap / build and auto / build: ``auto`` is
    ``wrap(model)`` as a user calls it (the default, ``calibrate="auto"``, no report), ``autoR`` the same with
    ``return_report=True`` (its calibration also measures every node for the report: the columns after it);
  * reinit: the fraction of weighted-layer parameters the analytic wrap re-initialized (weighted layers
    anywhere in the layer tree, inside keras-hub blocks too; tied or unused tables count as kept). Kernels
    and tables only: floating-point weights of two or more dimensions whose name does not say ``bias``
    (integer variables are ids, not weights; biases are kept by policy, and a bias shaped (heads, head_dim) or a relative-position bias table is a bias too);
  * fb: layers left to the probe fallback, auto: layers ``calibrate="auto"`` calibrated;
  * worst / median |log var| over weighted layers, per mode: a recorder on the ``call`` of every weighted
    layer in the tree records its pre-activation output variance on FRESH inputs (another seed than
    any probe; images N(0, 1), token ids uniform over the vocabulary, masks ones) in training mode; the
    target is `signal_variance` = 1, except for a layer whose report row names a target of its own (a
    position table added to a projection's output, ViT's position Embedding: a per-position bias at std
    0.02 of the signal's, `NodeRow.target`), measured against that (``targets``: how many);
  * the fraction of weighted layers within [0.5, 2] (analytic) and [0.8, 1.25] (default) of the target;
  * final: |log(predicted / measured)| of the model's (first) output variance after the analytic wrap;
  * default and probe: also the standard error (relative, +-rse) of the worst layer's measured variance on
    the fresh examples (from the spread of the examples' energies: heavy-tailed after squeeze-and-excitation
    gates); probe: how many layers are off by more than 10% plus two of their own standard errors
    (>10%+2se);
  * the recorder measures `--fresh` (512) fresh examples in batches of `--batch` (32), accumulating sums of
    x and x^2 per example and layer, so each variance is that of all 512 examples (training mode: BatchNormalization
    normalizes by each batch's statistics, so the batch is part of what is measured: 32 is Keras fit's
    default batch size and `wrap`'s default ``training_batch_size``, the batch its calibration targets;
    the runs in BENCHMARKS.md up to commit c53d30e measured in batches of 64);
  * for the calibrated modes, where a layer's verdict (default: inside [0.8, 1.25]; probe: |log var| below
    0.10) is within two of its own standard errors of the edge on those 512, a second line: the same
    layers measured on more fresh examples (512 at a time, generated one batch at a time) until every
    verdict is decided at two standard errors or `--max-fresh` (8192) examples are measured: examples
    measured, worst |log var| and its +-rse, layers out, layers still undecided, and the worst relative
    standard error wrap's calibration claimed for itself (`report.calibration_error`);
  * peak RSS (MB) of the subprocess, and ``wrapRSS``: its peak when analyze and the three wraps are done,
    before any recorder pass (the wraps run first, each mode's weights saved to disk and restored for its
    recorder pass): what building and wrapping the model takes. The recorder's own training-mode forward
    passes (~36 MB per 96x96 example on ConvNeXtTiny) are in the first figure only.

    python benchmarks/zoo_real.py [--only NAME ...] [--variants] [--batch 32] [--fresh 512] [--max-fresh 8192] [--probe-rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

APPLICATIONS = ["ResNet50V2", "DenseNet121", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
                "EfficientNetB0", "EfficientNetV2B0", "ConvNeXtTiny", "Xception", "InceptionV3", "NASNetMobile",
                "VGG16", "ResNet50", "InceptionResNetV2", "MobileNet"]
HUB = ["BertBackbone", "GPT2Backbone", "GPT2CausalLM", "LlamaBackbone", "GemmaBackbone", "Gemma3Backbone",
       "ViTBackbone", "DeiTBackbone", "SwinTransformerBackbone", "MiTBackbone", "ResNetBackbone", "CSPNetBackbone",
       "TransformerStack"]
OTHER = ["EmbeddingLSTM"]
MODELS = APPLICATIONS + HUB + OTHER
#: The other keras.applications models Keras 3.15 has (deeper / wider members of the families above):
#: ``--variants`` runs them (about an hour on a 2-core CPU; the default run keeps one per family).
VARIANTS = ["ResNet101", "ResNet152", "ResNet101V2", "ResNet152V2", "DenseNet169", "DenseNet201", "VGG19",
            "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetB4", "EfficientNetB5", "EfficientNetB6",
            "EfficientNetB7", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S",
            "EfficientNetV2M", "EfficientNetV2L", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge",
            "NASNetLarge"]
TEXT = dict(vocabulary_size=1000, num_layers=2, hidden_dim=64, intermediate_dim=128)


def build(name):
    import keras

    if name in APPLICATIONS or name in VARIANTS:
        return getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3), classes=10)
    if name == "EmbeddingLSTM":
        ids = keras.Input((64,), dtype="int32", name="token_ids")
        h = keras.layers.LSTM(64)(keras.layers.Embedding(1000, 64)(ids))
        return keras.Model(ids, keras.layers.Dense(10)(h))
    import keras_hub

    m = keras_hub.models
    if name == "BertBackbone":
        return m.BertBackbone(num_heads=2, max_sequence_length=64, **TEXT)
    if name == "GPT2Backbone":
        return m.GPT2Backbone(num_heads=2, max_sequence_length=64, **TEXT)
    if name == "GPT2CausalLM":
        return m.GPT2CausalLM(backbone=m.GPT2Backbone(num_heads=2, max_sequence_length=64, **TEXT), preprocessor=None)
    if name == "LlamaBackbone":
        return m.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **TEXT)
    if name == "GemmaBackbone":
        return m.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=32, **TEXT)
    if name == "Gemma3Backbone":
        return m.Gemma3Backbone(num_query_heads=2, num_key_value_heads=1, head_dim=32, image_size=None,
                                vision_encoder=None, **TEXT)
    if name == "ViTBackbone":
        return m.ViTBackbone(image_shape=(96, 96, 3), patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                             mlp_dim=128)
    if name == "DeiTBackbone":
        return m.DeiTBackbone(image_shape=(96, 96, 3), patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                              intermediate_dim=128)
    if name == "SwinTransformerBackbone":
        return m.SwinTransformerBackbone(image_shape=(96, 96, 3), patch_size=4, embed_dim=32, depths=(2, 2),
                                         num_heads=(2, 4), window_size=6)
    if name == "MiTBackbone":
        return m.MiTBackbone(image_shape=(96, 96, 3), layerwise_depths=[1, 1], num_layers=2,
                             layerwise_num_heads=[1, 2], layerwise_sr_ratios=[4, 2], max_drop_path_rate=0.0,
                             hidden_dims=[16, 32], layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2])
    if name == "ResNetBackbone":
        return m.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128],
                                stackwise_num_blocks=[2, 2], stackwise_num_strides=[1, 2], block_type="bottleneck_block",
                                image_shape=(96, 96, 3))
    if name == "CSPNetBackbone":
        return m.CSPNetBackbone(stem_filters=16, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1],
                                stackwise_num_filters=[32, 64], stackwise_strides=2, block_type="dark_block", stage_type="dark",
                                image_shape=(96, 96, 3))
    if name == "TransformerStack":
        ids = keras.Input((64,), dtype="int32", name="token_ids")
        x = keras_hub.layers.TokenAndPositionEmbedding(1000, 64, 64)(ids)
        for _ in range(2):
            x = keras_hub.layers.TransformerEncoder(128, 2)(x)
        for _ in range(2):
            x = keras_hub.layers.TransformerDecoder(128, 2)(x)
        return keras.Model(ids, keras.layers.Dense(10)(x[:, 0]))
    raise SystemExit(f"unknown model {name}")


def weighted_layers(model):
    """Every layer in the tree that itself owns a kernel-like weight (2+ dims)."""
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if "Cell" in type(layer).__name__:
            continue  # recurrent cells run once per step; their gates are not one pre-activation
        own = list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))
        if any(len(v.shape) >= 2 for v in own):
            out.append(layer)
    return out


class Recorder:
    """Pre-activation output variance of every call of the given layers (instance-level `call`)."""

    def __init__(self, layers):
        import keras

        self.values = {}
        self.layers = layers
        self.active = False
        self.examples = None
        self.batch = {}
        self.rse = {}
        for layer in layers:
            original = layer.call
            # The fused activation of Dense/EinsumDense/convolutions is set aside to read the pre-activation.
            fused = isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) or "Conv" in type(layer).__name__
            act = getattr(layer, "activation", None) if fused else None
            linear = keras.activations.linear

            def call(*args, _layer=layer, _original=original, _act=act, **kwargs):
                if not self.active:  # only while `run` records (never inside wrap's own replays)
                    return _original(*args, **kwargs)
                if _act is not None and _act is not linear:
                    _layer.activation = linear
                    try:
                        out = _original(*args, **kwargs)
                    finally:
                        _layer.activation = _act
                    self._record(_layer, out)
                    return _act(out)
                out = _original(*args, **kwargs)
                self._record(_layer, out)
                return out

            object.__setattr__(layer, "call", call)

    def _record(self, layer, out):
        import keras
        import numpy as np

        out = out[0] if isinstance(out, (list, tuple)) else out
        key = layer.path if hasattr(layer, "path") else layer.name
        if key in self.batch:  # only the first call of the layer in this batch
            return
        try:
            a = np.asarray(keras.ops.convert_to_numpy(out))
        except Exception:  # noqa: BLE001 - symbolic call
            return
        # Per-example sums in float64 (one example at a time: no float64 copy of a whole activation), so
        # the spread of the examples' energies gives each variance's own standard error. An output
        # without the batch axis (a position table) is the same for every example: one row.
        rows = a.reshape(a.shape[0], -1) if a.ndim and a.shape[0] == self.examples else a.reshape(1, -1)
        s1 = np.array([float(r.astype(np.float64).sum()) for r in rows])
        s2 = np.array([float(np.dot(r.astype(np.float64), r.astype(np.float64))) for r in rows])
        self.batch[key] = (rows.shape[1], s1, s2)

    def run(self, model, batches):
        """Each layer's variance over every batch (sums of x and x^2 accumulated, so the estimate is that of
        all the examples, with one batch in memory at a time), and the model's final output variance."""
        self.reset()
        self.add(model, batches)
        return self.result()

    def reset(self):
        self.sums, self.final, self.n_examples = {}, [0, 0.0, 0.0], 0

    def add(self, model, batches):
        """Accumulate more batches into the sums of `run` (`result` gives the estimates over all of them)."""
        import keras
        import numpy as np

        sums, final = self.sums, self.final
        for inputs in batches:
            self.batch = {}
            self.examples = int(keras.tree.flatten(inputs)[0].shape[0])
            self.n_examples += self.examples
            self.active = True
            try:
                y = model(inputs, training=True)
            finally:
                self.active = False
            for k, (n, s1, s2) in self.batch.items():
                t = sums.setdefault(k, [n, [], []])
                t[1].append(s1)
                t[2].append(s2)
            y = np.asarray(keras.ops.convert_to_numpy(keras.tree.flatten(y)[0]), dtype=np.float64)
            final[0] += y.size
            final[1] += float(y.sum())
            final[2] += float(np.sum(y * y))

    def result(self):
        import numpy as np

        sums, final = self.sums, self.final
        var, self.rse = {}, {}
        for k, (n, s1, s2) in sums.items():
            m, q = np.concatenate(s1) / n, np.concatenate(s2) / n  # per example: mean, mean square
            mu = float(m.mean())
            var[k] = max(float(q.mean()) - mu * mu, 0.0)
            # Delta method: V = mean(q) - mean(m)^2 moves by (q - 2 mu m) per example.
            z = q - 2.0 * mu * m
            self.rse[k] = float(z.std() / np.sqrt(len(z)) / var[k]) if len(z) > 1 and var[k] > 0 else 0.0
        return var, max(final[2] / final[0] - (final[1] / final[0]) ** 2, 0.0)


def relative_to_targets(got, targets):
    """Each layer's measured variance over its target: 1 (`signal_variance`), or the target the analytic
    report's row of that layer (the same path) names (`NodeRow.target`)."""
    return {k: v / targets.get(k, 1.0) for k, v in got.items()}


def _digest(variable) -> bytes:
    """A hash of a variable's value (to tell whether wrap changed it without keeping a copy)."""
    import hashlib

    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(variable.numpy()).tobytes()).digest()


def fresh_inputs(fn, batch, seed):
    """One batch of fresh inputs for the functional view `fn` (the model's declared inputs, `inputs.probe_arrays`
    with `seed`): an array, or a dict by input name when the model has several."""
    from autoinit_tf import inputs as inputs_mod

    fresh = inputs_mod.probe_arrays(fn, None, batch, seed=seed)
    fresh = fresh if len(fresh) > 1 else fresh[0]
    if len(fn.inputs) > 1:
        fresh = {kt.name: a for kt, a in zip(fn.inputs, fresh)}
    return fresh


def one(name, batch, fresh_examples, max_fresh=0):
    import resource

    import numpy as np

    import autoinit_tf
    from autoinit_tf import graph

    t = time.perf_counter()
    model = build(name)
    t_build = time.perf_counter() - t
    fn = graph.as_functional(model)

    def fresh_batch(i):
        return fresh_inputs(fn, batch, 12345 + i)

    base = max(fresh_examples // batch, 1)
    batches = [fresh_batch(i) for i in range(base)]
    layers = weighted_layers(model)
    rec = Recorder(layers)
    out = {"model": name, "build_s": t_build}
    modes = (("analytic", None), ("default", "auto"), ("probe", "probe"))
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        rep = autoinit_tf.analyze(model, seed=0)
        out["analyze_s"] = time.perf_counter() - t
        out["fallbacks"] = len({r.name for r in rep.fallbacks})
        kernels = {v.path: v for layer in layers for v in layer.weights
                   if len(v.shape) >= 2 and "float" in str(v.dtype) and "bias" not in v.path.rsplit("/", 1)[-1]}
        before = {p: _digest(v) for p, v in kernels.items()}
        # Every wrap first (their times and the process's peak RSS up to here: what building and wrapping
        # takes), each mode's weights saved to disk one variable at a time; then the recorder on each.
        predicted, claimed = {}, {}
        for mode, cal in modes:
            if mode == "default":
                # `autoinit_tf.wrap(model)` as a user calls it (no report: its calibration keeps no per-node
                # statistics); the call with the report below gives the columns after it.
                t = time.perf_counter()
                autoinit_tf.wrap(model, seed=0)
                out["default_plain_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _, rep = autoinit_tf.wrap(model, seed=0, calibrate=cal, return_report=True)
            out[f"{mode}_s"] = time.perf_counter() - t
            if mode == "analytic":
                targets = rep.targets()
                out["targets"] = len(targets)
                kept = [p for p, d in before.items() if d == _digest(kernels[p])]
                total = sum(int(np.prod(v.shape)) for v in kernels.values())
                out["reinit"] = 1.0 - sum(int(np.prod(kernels[p].shape)) for p in kept) / max(total, 1)
            if mode == "default":
                out["auto"] = len(rep.auto_calibrated)
            # the precision wrap's calibration claims for itself (worst layer's relative standard error)
            claimed[mode] = max((getattr(rep, "calibration_error", None) or {}).values(), default=0.0)
            predicted[mode] = float(rep.output.var)
            del rep
            for i, v in enumerate(model.weights):
                np.save(os.path.join(tmp, f"{mode}_{i}.npy"), v.numpy())
        out["wrap_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for mode, _ in modes:
            for i, v in enumerate(model.weights):
                v.assign(np.load(os.path.join(tmp, f"{mode}_{i}.npy")))
            got, final = rec.run(model, batches)
            got = relative_to_targets(got, targets)
            out[f"{mode}_final"] = abs(float(np.log(max(predicted[mode], 1e-30) / max(final, 1e-30))))
            logs = np.abs(np.log(np.maximum(np.array(list(got.values()) or [1.0]), 1e-30)))
            out[f"{mode}_worst"] = float(logs.max())
            out[f"{mode}_median"] = float(np.median(logs))
            lo, hi = (0.5, 2.0) if mode == "analytic" else (0.8, 1.25)
            vals = np.array(list(got.values()) or [1.0])
            out[f"{mode}_within"] = float(np.mean((vals >= lo) & (vals <= hi)))
            out[f"{mode}_off"] = sorted(((abs(float(np.log(max(v, 1e-30)))), k, v) for k, v in got.items()),
                                        reverse=True)[:3]
            # The measurement's own noise: the standard error of the worst layer's variance on these fresh
            # examples (heavy-tailed per-example energies make it large); for the probe, the layers off by
            # more than 10% plus two of their standard errors.
            worst_key = max(got, key=lambda k: abs(float(np.log(max(got[k], 1e-30)))), default=None)
            out[f"{mode}_worst_rse"] = rec.rse.get(worst_key, 0.0)
            if mode == "probe":
                out["probe_beyond"] = sum(abs(float(np.log(max(v, 1e-30)))) > 0.1 + 2 * rec.rse.get(k, 0.0)
                                          for k, v in got.items())
            if mode != "analytic" and max_fresh > fresh_examples:
                # Sequential: more fresh examples (generated one batch at a time, never all in memory) while
                # some layer's verdict (the probe: |log var| below 0.10; default: inside [0.8, 1.25]) is
                # within two of its own standard errors of the threshold, up to `max_fresh` examples.
                edge = 0.10 if mode == "probe" else float(np.log(1.25))
                i = base
                while rec.n_examples < max_fresh and any(
                        abs(abs(float(np.log(max(v, 1e-30)))) - edge) < 2 * rec.rse.get(k, 0.0) for k, v in got.items()):
                    rec.add(model, (fresh_batch(j) for j in range(i, i + base)))
                    i += base
                    got, _ = rec.result()
                    got = relative_to_targets(got, targets)
                logs = {k: abs(float(np.log(max(v, 1e-30)))) for k, v in got.items()}
                worst_key = max(logs, key=logs.get, default=None)
                out[f"{mode}_ext"] = {"n": rec.n_examples, "worst": logs.get(worst_key, 0.0),
                                      "rse": rec.rse.get(worst_key, 0.0),
                                      "out": sum(v > edge for v in logs.values()),
                                      "undecided": sum(abs(v - edge) < 2 * rec.rse.get(k, 0.0) for k, v in logs.items())}
            if mode != "analytic":
                out[f"{mode}_claimed_rse"] = claimed.get(mode, 0.0)
    out["layers"] = len(layers)
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _value(model, path):
    import numpy as np

    for v in model.weights:
        if v.path == path:
            return np.array(v.numpy())
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--batch", type=int, default=32,
                    help="measurement batch (BatchNormalization's statistics); wrap's default training_batch_size")
    ap.add_argument("--fresh", type=int, default=512, help="fresh examples measured (in batches of --batch)")
    ap.add_argument("--max-fresh", type=int, default=8192,
                    help="for the calibrated modes, measure up to this many fresh examples while a layer's verdict "
                         "is within two standard errors of its threshold")
    ap.add_argument("--probe-rounds", type=int, default=None,
                    help="set autoinit_tf.calibration.MAX_ROUNDS (the probe mode's refinement rounds; the "
                         "remedy a CalibrationWarning names)")
    ap.add_argument("--one")
    ap.add_argument("--variants", action="store_true", help="the other keras.applications models (VARIANTS)")
    args = ap.parse_args()
    if args.one:
        if args.probe_rounds:
            import autoinit_tf.calibration

            autoinit_tf.calibration.MAX_ROUNDS = args.probe_rounds
        print("RESULT " + json.dumps(one(args.one, args.batch, args.fresh, args.max_fresh)))
        return
    names = args.only or (VARIANTS if args.variants else MODELS)
    head = (f"{'model':24s} {'build':>6s} {'analyz':>6s} {'wrap':>6s} {'auto':>6s} {'autoR':>6s} {'probe':>6s} {'w/b':>5s} "
            f"{'a/b':>5s} "
            f"{'reinit':>6s} {'fb':>3s} {'autoN':>5s} | {'analytic worst/med in[.5,2] final':>34s} | "
            f"{'default worst/med +-rse in[.8,1.25]':>37s} | {'probe worst/med +-rse >10%+2se':>31s} | {'RSS MB':>6s} "
            f"{'wrapRSS':>7s}")
    print(head)
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--fresh",
                               str(args.fresh), "--max-fresh", str(args.max_fresh)]
                              + (["--probe-rounds", str(args.probe_rounds)] if args.probe_rounds else []),
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:24s} FAILED: {err[:150]}")
            continue
        r = json.loads(line[7:])
        print(f"{name:24s} {r['build_s']:6.2f} {r['analyze_s']:6.2f} {r['analytic_s']:6.2f} {r['default_plain_s']:6.2f} "
              f"{r['default_s']:6.2f} {r['probe_s']:6.2f} {r['analytic_s'] / r['build_s']:5.2f} "
              f"{r['default_plain_s'] / r['build_s']:5.2f} {r['reinit']:6.1%} {r['fallbacks']:3d} "
              f"{r['auto']:5d} | {r['analytic_worst']:8.2f} {r['analytic_median']:6.3f} {r['analytic_within']:11.0%} "
              f"{r['analytic_final']:5.2f} | "
              f"{r['default_worst']:8.2f} {r['default_median']:6.3f} {r['default_worst_rse']:6.3f} "
              f"{r['default_within']:13.0%} | "
              f"{r['probe_worst']:7.2f} {r['probe_median']:7.3f} {r['probe_worst_rse']:6.3f} {r['probe_beyond']:8d} | "
              f"{r['rss_mb']:6.0f} {r.get('wrap_rss_mb', 0):7.0f}",
              flush=True)
        ext = [(mode, r[f"{mode}_ext"]) for mode in ("default", "probe") if r.get(f"{mode}_ext", {}).get("n", 0) > args.fresh]
        if ext:
            # Measured again on more fresh examples where a verdict was within two standard errors of its edge.
            print(f"{'':24s} more fresh examples: " + "; ".join(
                f"{mode} n={e['n']} worst {e['worst']:.3f} +-{e['rse']:.3f} out {e['out']} undecided {e['undecided']} "
                f"(wrap's own claim +-{r.get(mode + '_claimed_rse', 0.0):.3f})" for mode, e in ext), flush=True)
        if r.get("targets"):
            print(f"{'':24s} layers measured against their report row's own target: {r['targets']}", flush=True)


if __name__ == "__main__":
    main()
