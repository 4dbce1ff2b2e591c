"""Wall time and peak memory of `analyze`, `wrap` and `wrap(calibrate="probe")`, side by side.

Models: keras.applications ResNet50 (weights=None, 224x224x3; the calibration probe has batch 8) and
plain ReLU MLPs of width 256 and depth 10, 100, 1000. Each operation runs `--repeat` times (default 3)
on a freshly built model (after one warm-up `analyze` of that model, so one-time imports are not
counted); the time is the best of the repeats (the usual guard against other processes' noise on a
shared machine); memory is shown for the first call and as the largest over the repeats. Peak memory added = peak resident set size during the
operation (sampled every 2 ms from /proc) minus the resident size just before it.

    python benchmarks/wrap_speed.py [--depths 10 100 1000] [--no-resnet] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

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
    "wrap": lambda m: autoinit_tf.wrap(m, seed=0),
    "wrap+probe": lambda m: autoinit_tf.wrap(m, seed=0, calibrate="probe"),
}


def bench(name, build, repeat=3):
    model = build()
    weight_bytes = sum(int(v.numpy().nbytes) if hasattr(v, "numpy") else 0 for v in model.weights)
    autoinit_tf.analyze(model, seed=0)  # warm-up (imports, quadrature tables)
    res = {}
    for op, fn in OPS.items():
        best, added = float("inf"), []
        for _ in range(repeat):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                fn(model)
                dt = time.perf_counter() - t0
            best = min(best, dt)
            added.append(mem.added)
        res[op] = (best, added[0], max(added))
    return weight_bytes, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", nargs="*", type=int, default=[10, 100, 1000])
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per operation: best time; first and largest memory")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"keras {keras.__version__} backend {keras.backend.backend()}  autoinit-tf {autoinit_tf.__version__}  "
          f"cpus {os.cpu_count()}")
    cases = [] if args.no_resnet else [("resnet50_224", resnet50)]
    cases += [(f"mlp_depth_{d}", lambda d=d: mlp(d)) for d in args.depths]
    head = f"{'model':<15} {'weights MB':>10} " + " ".join(f"{op + ' s':>12} {'+MB 1st/max':>12}" for op in OPS)
    print(head)
    print("-" * len(head))
    times = {}
    for name, build in cases:
        wb, res = bench(name, build, args.repeat)
        times[name] = res
        cells = " ".join(f"{res[op][0]:>12.2f} {res[op][1] / 2**20:>6.0f}/{res[op][2] / 2**20:<5.0f}" for op in OPS)
        print(f"{name:<15} {wb / 2**20:>10.1f} {cells}", flush=True)
        keras.backend.clear_session()
    if "mlp_depth_100" in times and "mlp_depth_1000" in times:
        for op in OPS:
            r = times["mlp_depth_1000"][op][0] / times["mlp_depth_100"][op][0]
            print(f"depth-1000 / depth-100 time, {op}: {r:.1f}")


if __name__ == "__main__":
    main()
