"""Drawing weights: `distributions.standard_normal` (Box-Muller on float32 uniforms) against numpy's float32
ziggurat, and `distributions.sample` against what Keras' own initializers take for the same number of weights.

One process, side by side, best of `--repeat` timings each:

  * ns per value of the standard normal itself, one thread, 1 M values per call (SFC64 and PCG64);
  * `sample` of `--n` values (default 50 M, VGG16's kernels) for each distribution, on all cores, and the
    same with the chunks drawn by numpy's ziggurat (the sampler before) for truncated_normal;
  * Keras' GlorotUniform and TruncatedNormal initializers (the backend's own RNG) on the same size.

    python benchmarks/draw_speed.py [--n 50000000] [--repeat 3]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from autoinit_tf import distributions as D

    m = 1 << 20
    buf = np.empty(m, dtype=np.float32)
    print(f"standard normal, one thread, ns per value ({m} per call):")
    for name, bits in (("SFC64", np.random.SFC64), ("PCG64", np.random.PCG64)):
        g = np.random.Generator(bits(0))
        zig = best(lambda: g.standard_normal(dtype=np.float32, out=buf), args.repeat) / m * 1e9
        bm = best(lambda: D.standard_normal(g, buf), args.repeat) / m * 1e9
        print(f"  {name}: numpy ziggurat {zig:.2f}  Box-Muller {bm:.2f}  ratio {zig / bm:.2f}x")

    n = args.n
    print(f"\n{n} values, {os.cpu_count()} cores, seconds:")
    for dist in ("truncated_normal", "untruncated_normal", "uniform"):
        t = best(lambda: D.sample((n,), 1.0, dist, D.rng_for(0, "w")), args.repeat)
        print(f"  sample {dist:20s} {t:.3f}")
    old_fill = D._fill

    def old(out, std, distribution, rng, normal):  # the chunks with numpy's ziggurat, as before
        return old_fill(out, std, distribution, rng, D._ziggurat)

    D._fill = old
    try:
        t_old = best(lambda: D.sample((n,), 1.0, "truncated_normal", D.rng_for(0, "w")), args.repeat)
    finally:
        D._fill = old_fill
    t_new = best(lambda: D.sample((n,), 1.0, "truncated_normal", D.rng_for(0, "w")), args.repeat)
    print(f"  truncated_normal, ziggurat sampler {t_old:.3f}  Box-Muller {t_new:.3f}  ratio {t_old / t_new:.2f}x")

    import keras

    shape = (n // 4096, 4096)
    for init in (keras.initializers.GlorotUniform(seed=0), keras.initializers.TruncatedNormal(seed=0)):
        t = best(lambda: keras.ops.convert_to_numpy(init(shape)), args.repeat)
        print(f"  keras {type(init).__name__:18s} ({keras.backend.backend()}) {t:.3f}  "
              f"sample truncated_normal / this {t_new / t:.2f}x")


if __name__ == "__main__":
    main()
