"""Wall time and peak memory of `analyze`, `wrap` and `wrap(calibrate="probe")`, side by side.

Models: keras.applications ResNet50 (weights=None, 224x224x3; the calibration probe has batch 8) and
plain ReLU MLPs of width 256 and depth 10, 100, 1000. All models are built first (one warm-up `analyze`
each, so one-time imports are not counted); then each operation runs `--repeat` times (default 3) on
every model in turn, so the models are timed side by side (interleaved) under the same machine load.
The time is the best of the repeats (the usual guard against other processes' noise on a shared
machine). Memory comes from two further calls of each op on each model, each started from a trimmed heap
(the heap's free pages returned to the OS with `malloc_trim`, glibc), shown for the first call and as the
larger of the two: peak resident set size during the call (sampled every 2 ms from /proc) minus the
resident size just before it. Without the trim the figure depended on what earlier calls left free in
the heap (a warm process read +92 to +305 MB for the same calibrated ResNet50 call); the timed calls are
not trimmed, since a trim costs the next call its page faults.

Before every timed call the CPU caches are flushed (a 64 MiB buffer is rewritten, twice the 32 MiB L3 of
the machine BENCHMARKS.md reports). Without it the depth-100 MLP (25 MB of weights) sits in the L3
cache from the previous repeat while the depth-1000 one (251 MB) cannot, so the depth ratio measured
the cache size rather than the algorithm; a real `wrap` call meets a model whose weights were last
touched when it was built. `--warm` skips the flush.

    python benchmarks/wrap_speed.py [--depths 10 100 1000] [--no-resnet] [--repeat 3] [--warm]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import autoinit_tf  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    def __enter__(self):
        self.base = self.peak = _rss()
        self.stop = False
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, _rss())
        self.added = self.peak - self.base
        return False


_FLUSH = None


def flush_caches():
    """Evict the CPU caches: rewrite a buffer of twice the 32 MiB L3 cache."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = np.zeros(16 << 20, np.float32)  # 64 MiB
    np.add(_FLUSH, 1.0, out=_FLUSH)


def trim_heap():
    """Return the heap's free pages to the OS (glibc), so every call's memory is measured from the live set
    rather than from whatever free memory earlier calls left in the heap."""
    from autoinit_tf.heap import HeapTrim

    HeapTrim(trim_now=True)


def mlp(depth, width=256):
    inp = keras.Input((width,))
    h = inp
    for _ in range(depth):
        h = keras.layers.Dense(width, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(10)(h), name=f"mlp_{depth}")


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))


OPS = {
    "analyze": lambda m: autoinit_tf.analyze(m, seed=0),
    "wrap": lambda m: autoinit_tf.wrap(m, seed=0, calibrate=None),
    "wrap(auto)": lambda m: autoinit_tf.wrap(m, seed=0),
    "wrap+probe": lambda m: autoinit_tf.wrap(m, seed=0, calibrate="probe"),
}


def bench(cases, repeat=3, flush=True, memory_runs=2):
    """Time every op on every model, the models interleaved within each round; then measure memory.

    Timed rounds (`repeat`) start from the process as it is (caches flushed unless `flush` is False);
    memory rounds (`memory_runs`) start from a trimmed heap, so "+MB" counts the live set the call adds.
    They are separate because trimming costs the next call its page faults: ResNet50 `analyze` read
    0.64 s from a warm heap and 0.81 s right after a trim (one process, best of 3).
    Returns {name: (weight_bytes, {op: (best_s, first_added_bytes, max_added_bytes)})}.
    """
    models = {}
    for name, build in cases:
        model = build()
        autoinit_tf.analyze(model, seed=0)  # warm-up (imports, quadrature tables)
        weight_bytes = sum(int(v.numpy().nbytes) if hasattr(v, "numpy") else 0 for v in model.weights)
        models[name] = (model, weight_bytes)
    times = {name: {op: [] for op in OPS} for name in models}
    added = {name: {op: [] for op in OPS} for name in models}
    for op, fn in OPS.items():
        for _ in range(repeat):
            for name, (model, _) in models.items():
                if flush:
                    flush_caches()
                t0 = time.perf_counter()
                fn(model)
                times[name][op].append(time.perf_counter() - t0)
        for _ in range(memory_runs):
            for name, (model, _) in models.items():
                trim_heap()
                with PeakRSS() as mem:
                    fn(model)
                added[name][op].append(mem.added)
    return {
        name: (wb, {op: (min(times[name][op]), added[name][op][0], max(added[name][op])) for op in OPS})
        for name, (_, wb) in models.items()
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", nargs="*", type=int, default=[10, 100, 1000])
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per operation (best time)")
    ap.add_argument("--warm", action="store_true", help="do not flush the CPU caches before each timed call")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"keras {keras.__version__} backend {keras.backend.backend()}  autoinit-tf {autoinit_tf.__version__}  "
          f"cpus {os.cpu_count()}  caches {'warm' if args.warm else 'flushed before each call'}")
    cases = [] if args.no_resnet else [("resnet50_224", resnet50)]
    cases += [(f"mlp_depth_{d}", lambda d=d: mlp(d)) for d in args.depths]
    head = f"{'model':<15} {'weights MB':>10} " + " ".join(f"{op + ' s':>12} {'+MB 1st/max':>12}" for op in OPS)
    print(head)
    print("-" * len(head))
    results = bench(cases, args.repeat, flush=not args.warm)
    for name, (wb, res) in results.items():
        cells = " ".join(f"{res[op][0]:>12.2f} {res[op][1] / 2**20:>6.0f}/{res[op][2] / 2**20:<5.0f}" for op in OPS)
        print(f"{name:<15} {wb / 2**20:>10.1f} {cells}", flush=True)
    if "mlp_depth_100" in results and "mlp_depth_1000" in results:
        for op in OPS:
            r = results["mlp_depth_1000"][1][op][0] / results["mlp_depth_100"][1][op][0]
            print(f"depth-1000 / depth-100 time, {op}: {r:.1f}")


if __name__ == "__main__":
    main()
