"""DP-SGD benchmarks (autoinit_tf.privacy).

Speed (default): a small CNN (Tramer & Boneh's end-to-end CNN, 26k params) on 28x28x1 inputs,
batch 256, each variant in its own process (for its peak memory):
  plain      non-private Keras train step (model.fit, jit_compile as Keras resolves "auto")
  plain_xla  non-private Keras train step with jit_compile=True
  dp         make_private train step, plain batches of 256 (per-example part XLA-compiled;
             default per_example_method="direct": one batched pass, closed-form per-example
             gradients from layer inputs and output gradients)
  dp_nojit   make_private(..., jit_compile=False) (the direct engine never uses XLA: same as dp)
  dp_poisson make_private train step on poisson_batches (default padding="none": real,
             variable Poisson batch sizes, mean 256, the step traced once for any size)
  dp_poisson_max  the same with padding="max" (every batch padded to the 1e-9-overflow size)
Keras-model variants are timed per step inside an ordinary model.fit (a callback records each
batch's wall time; the first --warmup steps are dropped); the naive loops are timed directly.
  dp_vmap    make_private(..., per_example_method="vectorized_map"): the tf.vectorized_map
             engine (the previous default), XLA; dp_vmap_nojit: the same without XLA
  naive      one-example-at-a-time DP-SGD: a compiled tf.while_loop over the batch computing
             each example's gradient, clipping, accumulating (no vectorization)
  naive_python  the textbook loop: a Python for-loop of per-example tf.GradientTape calls
             (eager), clip, accumulate, noise, optimizer step

    python benchmarks/dp_sgd.py                 # speed table
    python benchmarks/dp_sgd.py --utility --epochs 25   # Fashion-MNIST at epsilon 3, delta 1e-5

Utility: Fashion-MNIST (Debian package dataset-fashion-mnist) from scratch with DP-SGD,
Poisson sampling, noise calibrated for (epsilon, delta) over the planned epochs (PLD), reports
the test accuracy of the final and of the EMA weights, the privacy statement and the wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from step_timer import step_timer  # noqa: E402


def cnn(seed=0, activation="tanh"):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation=activation),
            keras.layers.MaxPooling2D(2, 1),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation=activation),
            keras.layers.MaxPooling2D(2, 1),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation=activation),
            keras.layers.Dense(10),
        ]
    )


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def run_variant(variant, batch, steps, warmup):
    import keras
    import tensorflow as tf

    from autoinit_tf import privacy

    rng = np.random.default_rng(0)
    n = batch * 40
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    model = cnn()
    rss0 = _rss_mb()
    step = None
    total = warmup + steps
    plain_data = lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()  # noqa: E731
    rows = batch
    if variant in ("plain", "plain_xla"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss(), jit_compile=True if variant == "plain_xla" else "auto")
        data = plain_data()
    elif variant in ("dp", "dp_nojit", "dp_poisson", "dp_poisson_max", "dp_vmap", "dp_vmap_nojit"):
        privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=batch, dataset_size=n, seed=0,
                             jit_compile=not variant.endswith("nojit"),
                             per_example_method="vectorized_map" if variant.startswith("dp_vmap") else "direct")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss())
        if variant.startswith("dp_poisson"):
            padding = "max" if variant == "dp_poisson_max" else "none"
            data = privacy.poisson_batches(x, y, batch_size=batch, seed=0, steps_per_epoch=total, padding=padding)
            rows = data.dp_sampler.max_batch_size if padding == "max" else batch
        else:
            data = plain_data()
    elif variant == "naive":
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
        loss_fn = _loss()
        clip, sigma = 1.0, 1.0

        @tf.function
        def naive_step(xb, yb):
            tv = model.trainable_variables
            acc = [tf.zeros_like(v) for v in tv]

            def body(i, acc):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb[i : i + 1], model(xb[i : i + 1], training=True))
                g = tape.gradient(loss, tv)
                norm = tf.linalg.global_norm(g)
                f = tf.minimum(1.0, clip / (norm + 1e-12))
                return i + 1, [a + gi * f for a, gi in zip(acc, g)]

            _, acc = tf.while_loop(lambda i, _: i < tf.shape(xb)[0], body, (0, acc))
            grads = [(a + tf.random.normal(tf.shape(a)) * sigma * clip) / tf.cast(tf.shape(xb)[0], tf.float32) for a in acc]
            opt.apply(grads, tv)

        data = plain_data()
        step = lambda it: naive_step(*next(it))  # noqa: E731
    elif variant == "naive_python":
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
        loss_fn = _loss()
        clip, sigma = 1.0, 1.0

        def step(it):
            xb, yb = next(it)
            tv = model.trainable_variables
            acc = [tf.zeros_like(v) for v in tv]
            for i in range(int(xb.shape[0])):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb[i : i + 1], model(xb[i : i + 1], training=True))
                g = tape.gradient(loss, tv)
                f = tf.minimum(1.0, clip / (tf.linalg.global_norm(g) + 1e-12))
                acc = [a + gi * f for a, gi in zip(acc, g)]
            grads = [(a + tf.random.normal(tf.shape(a)) * sigma * clip) / float(xb.shape[0]) for a in acc]
            opt.apply(grads, tv)

        data = plain_data()
    else:
        raise ValueError(variant)
    if step is None:
        # Keras models: time each step of an ordinary ``fit`` (the data pipeline runs as in real
        # training: tf.data prefetching, the generator of poisson_batches in its own thread).
        timer = step_timer()
        model.fit(data, epochs=1, steps_per_epoch=total, verbose=0, callbacks=[timer])
        times = timer.times[warmup:]
        if os.environ.get("DP_BENCH_DEBUG"):
            print([round(1000 * t) for t in timer.times], file=sys.stderr)
    else:
        it = iter(data)
        for _ in range(warmup):
            step(it)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step(it)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "variant": variant,
        "ms_per_step_median": 1000 * float(np.median(times)),
        "ms_per_step_mean": 1000 * float(np.mean(times)),
        "rows_per_step": rows,
        "peak_rss_mb": peak,
        "peak_rss_over_model_mb": peak - rss0,
        "params": int(model.count_params()),
        "load_avg": os.getloadavg(),
    }


def speed(args):
    results = {}
    runs = {v: [] for v in args.variants}
    for r in range(args.rounds):
        # Rounds interleave the variants, so a burst of load from other processes on a shared
        # machine hits every variant alike; each variant's figure is the median over rounds.
        for variant in args.variants:
            steps = args.naive_steps if variant.startswith("naive") else args.steps
            cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--steps", str(steps),
                   "--warmup", str(args.warmup)]
            env = dict(os.environ, KERAS_BACKEND=args.backend)
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                sys.stderr.write(out.stderr[-3000:])
                raise SystemExit(f"variant {variant} failed")
            res = json.loads(lines[-1])
            runs[variant].append(res)
            print(f"[round {r + 1}] {variant:14s} {res['ms_per_step_median']:9.1f} ms/step (median of {steps}, "
                  f"{res['rows_per_step']} rows)  peak RSS {res['peak_rss_mb']:7.0f} MB "
                  f"(+{res['peak_rss_over_model_mb']:.0f} MB after model build)  load {res['load_avg'][0]:.1f}", flush=True)
    for variant, rs in runs.items():
        r = dict(rs[-1])
        r["ms_per_step_median"] = float(np.median([x["ms_per_step_median"] for x in rs]))
        r["ms_per_step_rounds"] = [x["ms_per_step_median"] for x in rs]
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
        results[variant] = r
        print(f"{variant:14s} {r['ms_per_step_median']:9.1f} ms/step (median over {len(rs)} rounds: "
              f"{', '.join(f'{t:.0f}' for t in r['ms_per_step_rounds'])})  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    plain = min(results[v]["ms_per_step_median"] for v in ("plain", "plain_xla") if v in results)
    summary = {}
    if "dp" in results:
        summary["dp_over_best_plain"] = results["dp"]["ms_per_step_median"] / plain
    for v in ("dp_poisson", "dp_poisson_max"):
        if v in results:
            summary[f"{v}_over_best_plain"] = results[v]["ms_per_step_median"] / plain
    for v in ("dp_nojit", "dp_vmap", "dp_vmap_nojit"):
        if v in results:
            summary[f"{v}_over_best_plain"] = results[v]["ms_per_step_median"] / plain
    for naive in ("naive", "naive_python"):
        if naive in results:
            for v in ("dp", "dp_nojit", "dp_vmap", "dp_vmap_nojit"):
                if v in results:
                    summary[f"speedup_{v}_over_{naive}"] = (
                        results[naive]["ms_per_step_median"] / results[v]["ms_per_step_median"])
    print(json.dumps(summary, indent=1))
    print(versions(), f"(variants ran on the {args.backend} backend)")
    return results, summary


def versions():
    import keras
    import tensorflow as tf

    import dp_accounting  # noqa: F401
    from importlib.metadata import version

    return (f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
            f"dp-accounting {version('dp-accounting')}, jax {_jax_version()}, {platform.machine()} {os.cpu_count()} cores")


def _jax_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jax")
    except PackageNotFoundError:
        return "not installed"


def load_fashion_mnist(root="/usr/share/datasets/fashion-mnist"):
    def images(name):
        with gzip.open(os.path.join(root, name)) as f:
            return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)

    def labels(name):
        with gzip.open(os.path.join(root, name)) as f:
            return np.frombuffer(f.read(), np.uint8, offset=8).astype("int32")

    x_tr, y_tr = images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz")
    x_te, y_te = images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")
    norm = lambda a: ((a.astype("float32") / 255.0) - 0.2860) / 0.3530  # noqa: E731
    return norm(x_tr), y_tr, norm(x_te), y_te


def utility(args):
    import keras

    from autoinit_tf import privacy

    t0 = time.time()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    model = cnn(seed=args.seed)
    init = "keras default"
    if args.autoinit:
        try:
            from autoinit_tf.autoinit import wrap

            model = wrap(model, seed=args.seed)
            init = "AutoInit (autoinit_tf.wrap)"
        except Exception as err:  # report, keep the default init
            init = f"keras default (AutoInit failed: {type(err).__name__}: {err})"
    privacy.make_private(
        model, l2_norm_clip=args.clip, target_epsilon=args.epsilon, target_delta=args.delta,
        batch_size=args.batch, dataset_size=len(x_tr), epochs=args.epochs,
        ema_momentum=args.ema or None, microbatch_size=args.microbatch or None,
    )
    model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=args.momentum), loss=_loss(), metrics=["accuracy"])
    t_setup = time.time() - t0
    print(f"setup (data, model, AutoInit, noise calibration) {t_setup:.1f} s", flush=True)
    cb = privacy.PrivacyCallback(max_epsilon=args.epsilon)

    epochs_log = []

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.time()
            self.t_batch = time.time()
            self.batch_times = []

        def on_train_batch_end(self, batch, logs=None):
            now = time.time()
            self.batch_times.append(now - self.t_batch)
            self.t_batch = now

        def on_epoch_end(self, epoch, logs=None):
            train_s = time.time() - self.t_epoch
            t = time.time()
            test = model.evaluate(x_te, y_te, batch_size=2000, verbose=0)[1]
            eval_s = time.time() - t
            step_s = float(np.median(self.batch_times)) if self.batch_times else float("nan")
            epochs_log.append({"epoch": epoch + 1, "loss": float(logs["loss"]), "epsilon": float(logs.get("epsilon", float("nan"))),
                               "test_accuracy": float(test), "train_s": train_s, "eval_s": eval_s,
                               "median_step_s": step_s, "load": os.getloadavg()})
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f} eps {logs.get('epsilon', float('nan')):.3f} "
                  f"test acc {test:.4f} train {train_s:.0f} s (median step {step_s:.2f} s) eval {eval_s:.1f} s "
                  f"load {os.getloadavg()[0]:.1f} ({time.time() - t0:.0f} s)", flush=True)

    model.fit(privacy.poisson_batches(x_tr, y_tr, batch_size=args.batch, seed=args.seed), epochs=args.epochs,
              callbacks=[cb, Progress()], verbose=0)
    acc = model.evaluate(x_te, y_te, batch_size=2000, verbose=0)[1]
    acc_ema = None
    if args.ema:
        with privacy.ema_weights(model):
            acc_ema = model.evaluate(x_te, y_te, batch_size=2000, verbose=0)[1]
    st = privacy.statement(model)
    print(str(st))
    res = {"test_accuracy": acc, "test_accuracy_ema": acc_ema, "epsilon": st.epsilon, "delta": st.delta,
           "steps": st.steps, "noise_multiplier": st.noise_multiplier, "init": init, "statement": str(st),
           "padding": "auto", "load_avg_end": os.getloadavg(),
           "wall_s": time.time() - t0, "setup_s": t_setup, "epochs": epochs_log, "config": vars(args),
           "versions": versions()}
    print(json.dumps(res, indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=["plain", "plain_xla", "dp", "dp_poisson", "dp_poisson_max", "dp_vmap", "dp_vmap_nojit", "naive",
                                                    "naive_python"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--naive-steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"],
                   help="speed: Keras backend of the variant processes (jax: plain, dp, dp_poisson* only)")
    p.add_argument("--rounds", type=int, default=1, help="speed: run every variant this many times, interleaved")
    p.add_argument("--utility", action="store_true")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=4.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--microbatch", type=int, default=0)
    p.add_argument("--autoinit", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="utility: also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.steps, args.warmup)), flush=True)
    elif args.utility:
        if args.batch == 256 and "--batch" not in (argv or sys.argv):
            args.batch = 1024
        utility(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
