"""autoinit-tf on an accelerator: wrap time, training throughput of wrapped and swapped models, DP-SGD step.

Every figure is a ratio measured side by side in one run, each variant in its own process (so its peak
device memory is its own):

  wrap            build time, analytic ``wrap`` and ``wrap(calibrate="probe")`` time, for ResNet50 and a
                  transformer encoder classifier of keras-hub size (ratios to the build time)
  fit             ``model.fit`` throughput (examples/s after warm-up, ``jit_compile=True``) of the wrapped vs
                  the unwrapped model (wrap changes values, not the graph: the ratio should be 1.0)
  swap:<recipe>   the same CNN with each swap recipe applied vs the original (the paper layers' step time
                  against the built-ins: ProxyNormalization, logit-space AND gate, ELU, LogAvgExp,
                  StochasticDepth, IterNorm whitening, scaled residuals)
  dp:<batch>      DP-SGD step (``make_private``, ``jax.vmap`` per-example gradients) vs the non-private
                  step, batch 256 and 1024

Peak device memory per variant: ``jax.Device.memory_stats()["peak_bytes_in_use"]`` on JAX, ``torch.cuda.
max_memory_allocated`` on PyTorch, peak RSS on CPU. The JAX path never imports TensorFlow (checked and
reported), so it runs on a machine without it.

    KERAS_BACKEND=jax python benchmarks/gpu_check.py --out gpu_check.json     # about 5-8 min on one GPU
    python benchmarks/gpu_check.py --smoke                                     # tiny sizes, CPU, ~3 min
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --smoke --in-process --hide-tensorflow   # the test, ~1 min

DAR-BN has no swap recipe yet (issue "Training techniques of the literature"): its layer is timed in
place of BatchNormalization by the ``swap:darbn`` variant, built by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SWAPS = ["bn->proxynorm", "act:relu->and_ail", "act:relu->elu", "gap->logavgexp", "residual->stochastic_depth",
         "conv_unit->whitening", "residual->scaled", "darbn"]


def sizes(smoke):
    if smoke:
        return dict(image=32, resnet_width=8, blocks=1, tokens=16, d_model=32, heads=2, layers=1, vocab=200,
                    batch=16, steps=4, warmup=2, dp_batches=[16], classes=10)
    return dict(image=224, resnet_width=64, blocks=3, tokens=128, d_model=768, heads=12, layers=12, vocab=30522,
                batch=128, steps=30, warmup=5, dp_batches=[256, 1024], classes=1000)


# ------------------------------------------------------------------------------------ models
def resnet50(s):
    import keras

    if s["image"] >= 64:
        return keras.applications.ResNet50(weights=None, input_shape=(s["image"], s["image"], 3), classes=s["classes"])
    return small_resnet(s)


def small_resnet(s, darbn=False):
    """A small BN ResNet (conv-BN-ReLU units, residual sums, max-pool, GAP): every swap recipe applies."""
    import keras

    from autoinit_tf.layers import DARBatchNormalization

    w = s["resnet_width"]
    bn = (lambda: DARBatchNormalization()) if darbn else (lambda: keras.layers.BatchNormalization())
    inp = keras.Input((s["image"], s["image"], 3))
    h = keras.layers.Conv2D(w, 3, padding="same")(inp)
    h = bn()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    for _ in range(s["blocks"]):
        r = keras.layers.Conv2D(w, 3, padding="same")(h)
        r = bn()(r)
        r = keras.layers.Activation("relu")(r)
        r = keras.layers.Conv2D(w, 3, padding="same")(r)
        r = bn()(r)
        h = keras.layers.Add()([h, r])  # pre-activation style: every ReLU follows a conv + BN
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(s["classes"])(h))


def transformer(s):
    """A BERT-base-sized encoder classifier from Keras layers (keras-hub is optional on the device)."""
    import keras

    inp = keras.Input((s["tokens"],), dtype="int32")
    h = keras.layers.Embedding(s["vocab"], s["d_model"])(inp)
    for _ in range(s["layers"]):
        a = keras.layers.MultiHeadAttention(s["heads"], s["d_model"] // s["heads"])(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(4 * s["d_model"], activation="gelu")(h)
        h = keras.layers.LayerNormalization()(h + keras.layers.Dense(s["d_model"])(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


def data_for(model, n, s):
    import numpy as np

    rng = np.random.default_rng(0)
    kt = model.inputs[0]
    shape = (n,) + tuple(kt.shape[1:])
    if "int" in str(kt.dtype):
        x = rng.integers(0, s["vocab"], size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    classes = int(model.outputs[0].shape[-1])
    return x, rng.integers(0, classes, size=(n,)).astype("int32")


# --------------------------------------------------------------------------- measurement
def peak_memory_mb():
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            dev = jax.devices()[0]
            if dev.platform != "cpu":
                return dev.memory_stats()["peak_bytes_in_use"] / 2**20, f"{dev.platform} peak"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated() / 2**20, "cuda peak"
    except Exception:  # noqa: BLE001 - memory stats are best effort
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def fit_throughput(model, s, batch=None):
    """Examples per second of ``model.fit`` after warm-up (per-batch wall time, median)."""
    import keras
    import numpy as np

    batch = batch or s["batch"]
    steps = s["steps"] + s["warmup"]
    x, y = data_for(model, batch * steps, s)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, b, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, b, logs=None):
            if logs is not None:
                float(np.asarray(logs.get("loss", 0.0)))  # wait for the step's result
            times.append(time.perf_counter() - self.t)

    if not model.compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=[Timer()])
    step = float(np.median(times[s["warmup"]:]))
    return batch / step, step


def child(variant, smoke):
    import keras

    import autoinit_tf

    s = sizes(smoke)
    out = {"variant": variant}
    if variant.startswith("wrap:"):
        which = variant.split(":", 1)[1]
        make = resnet50 if which == "resnet50" else transformer
        t0 = time.perf_counter()
        model = make(s)
        out["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        autoinit_tf.wrap(model, seed=0, calibrate=None)
        out["wrap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        autoinit_tf.wrap(model, seed=0, calibrate="probe")
        out["wrap_probe_s"] = time.perf_counter() - t0
    elif variant.startswith("fit:"):
        wrapped = variant.endswith(":wrapped")
        keras.utils.set_random_seed(0)
        model = small_resnet(s) if "cnn" in variant else transformer(s)
        if wrapped:
            autoinit_tf.wrap(model, seed=0, calibrate=None)
        out["examples_per_s"], out["step_s"] = fit_throughput(model, s)
    elif variant.startswith("swap:"):
        recipe = variant.split(":", 1)[1]
        keras.utils.set_random_seed(0)
        if recipe == "none":
            model = small_resnet(s)
        elif recipe == "darbn":
            model = small_resnet(s, darbn=True)
        else:
            model = autoinit_tf.wrap(small_resnet(s), swaps=[recipe], seed=0)
        out["examples_per_s"], out["step_s"] = fit_throughput(model, s)
    elif variant.startswith("dp:"):
        _, mode, batch = variant.split(":")
        batch = int(batch)
        keras.utils.set_random_seed(0)
        model = small_resnet(s)
        # DP-SGD needs per-example normalization: the same network with GroupNorm
        model = autoinit_tf.wrap(model, swaps=["bn->groupnorm"], seed=0)
        if mode == "private":
            from autoinit_tf import privacy

            privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch,
                                 dataset_size=batch * 100, seed=0)
        out["examples_per_s"], out["step_s"] = fit_throughput(model, s, batch=batch)
    else:
        raise SystemExit(f"unknown variant {variant}")
    out["peak_mb"], out["memory_kind"] = peak_memory_mb()
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    out["backend"] = keras.backend.backend()
    print("RESULT " + json.dumps(out), flush=True)


def variants(smoke):
    s = sizes(smoke)
    v = ["wrap:resnet50", "wrap:transformer", "fit:cnn:plain", "fit:cnn:wrapped", "fit:transformer:plain",
         "fit:transformer:wrapped", "swap:none"] + [f"swap:{r}" for r in SWAPS]
    for b in s["dp_batches"]:
        v += [f"dp:plain:{b}", f"dp:private:{b}"]
    return v


def device_words():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"jax {jax.__version__}, {d.platform}: {getattr(d, 'device_kind', d)}"
    if backend == "torch":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        return f"torch {torch.__version__}, {name}"
    return backend


class _HiddenTensorFlow:
    """A meta-path finder that makes ``import tensorflow`` fail, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by --hide-tensorflow)", name=name)
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, the test suite)")
    p.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"), choices=["jax", "torch", "tensorflow"])
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per variant")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (faster; peak memory is then not per variant)")
    p.add_argument("--hide-tensorflow", action="store_true",
                   help="make `import tensorflow` fail, as on a GPU machine without it (checks the JAX path)")
    args = p.parse_args(argv)
    if args.hide_tensorflow:
        sys.meta_path.insert(0, _HiddenTensorFlow())
    if args.child:
        child(args.child, args.smoke)
        return 0
    if args.in_process:
        return _run_in_process(args)
    env = dict(os.environ, KERAS_BACKEND=args.backend, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results, t_start = {}, time.perf_counter()
    for v in args.variants or variants(args.smoke):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v] + (["--smoke"] if args.smoke else []) + (
            ["--hide-tensorflow"] if args.hide_tensorflow else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results[v] = json.loads(line[-1][7:]) if line else {"error": (proc.stdout + proc.stderr)[-1500:]}
        except subprocess.TimeoutExpired:
            results[v] = {"error": f"timed out after {args.timeout:.0f} s"}
        r = results[v]
        print(f"{v:32s} " + (r["error"].splitlines()[-1][:90] if "error" in r else
                             " ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
                                      for k, val in r.items() if k not in ("variant", "backend"))), flush=True)
    ratios = summarize(results)
    probe = subprocess.run([sys.executable, "-c", "import keras, sys; sys.path.insert(0, %r); "
                            "from benchmarks.gpu_check import device_words; print(device_words())" % ROOT],
                           env=env, capture_output=True, text=True)
    summary = {"device": probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?",
               "backend": args.backend, "smoke": args.smoke, "total_s": time.perf_counter() - t_start,
               "ratios": ratios, "results": results}
    print(json.dumps({"device": summary["device"], "ratios": ratios}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0 if all("error" not in r for r in results.values()) else 1


def _run_in_process(args):
    """Every variant in this process (KERAS_BACKEND must already be set); the same summary."""
    import contextlib
    import io

    os.environ.setdefault("KERAS_BACKEND", args.backend)
    results, t_start = {}, time.perf_counter()
    for v in args.variants or variants(args.smoke):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                child(v, args.smoke)
            line = [ln for ln in buf.getvalue().splitlines() if ln.startswith("RESULT ")]
            results[v] = json.loads(line[-1][7:])
        except Exception as exc:  # noqa: BLE001 - reported per variant
            results[v] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{v:32s} {results[v]}", flush=True)
    ratios = summarize(results)
    summary = {"device": device_words(), "backend": args.backend, "smoke": args.smoke,
               "total_s": time.perf_counter() - t_start, "ratios": ratios, "results": results}
    print(json.dumps({"device": summary["device"], "ratios": ratios}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0 if all("error" not in r for r in results.values()) else 1


def summarize(results):
    def get(v, k):
        return results.get(v, {}).get(k)

    ratios = {}
    for which in ("resnet50", "transformer"):
        b = get(f"wrap:{which}", "build_s")
        if b:
            ratios[f"wrap/build {which}"] = get(f"wrap:{which}", "wrap_s") / b
            ratios[f"wrap_probe/build {which}"] = get(f"wrap:{which}", "wrap_probe_s") / b
    for net in ("cnn", "transformer"):
        a, b = get(f"fit:{net}:wrapped", "examples_per_s"), get(f"fit:{net}:plain", "examples_per_s")
        if a and b:
            ratios[f"fit throughput wrapped/plain {net}"] = a / b
    base = get("swap:none", "step_s")
    for r in SWAPS:
        t = get(f"swap:{r}", "step_s")
        if base and t:
            ratios[f"step time {r}/original"] = t / base
    for v in list(results):
        if v.startswith("dp:private:"):
            b = v.rsplit(":", 1)[1]
            t, t0 = get(v, "step_s"), get(f"dp:plain:{b}", "step_s")
            if t and t0:
                ratios[f"dp step/plain step batch {b}"] = t / t0
    return ratios


if __name__ == "__main__":
    sys.exit(main())
