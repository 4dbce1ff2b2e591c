"""Wrap time of one zoo model from a given source tree, for side-by-side comparisons of commits.

One process: build the model (`benchmarks/zoo_real.py`'s builder, random weights), run `analyze` once, then
time three `wrap(calibrate=None)` calls; with ``--default``, one analytic wrap and then three default
`wrap` calls (``calibrate="auto"``; the first is what the zoo times); with ``--default --report``, one analytic
wrap and then two rounds of `wrap(model, seed=0)` and `wrap(model, seed=0, return_report=True)` (the zoo's
"auto" and "autoR"). Run it alternately for two checkouts of the project, e.g.

    git worktree add /tmp/old da93531 && git worktree add /tmp/new HEAD
    for r in 1 2; do for v in old new; do python benchmarks/analytic_wrap_time.py /tmp/$v EfficientNetB0; done; done

and compare the lines (same machine, same minutes).
"""

import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    root, name = os.path.abspath(sys.argv[1]), sys.argv[2]
    default = "--default" in sys.argv[3:]
    report = default and "--report" in sys.argv[3:]
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import autoinit_tf
    import zoo_real

    if not os.path.abspath(autoinit_tf.__file__).startswith(root):
        raise SystemExit(f"imported {autoinit_tf.__file__}, not the tree at {root}")
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    model = zoo_real.build(name)
    build = time.perf_counter() - t
    autoinit_tf.analyze(model, seed=0)
    if default:
        autoinit_tf.wrap(model, seed=0, calibrate=None)
    if report:
        plain, reported = [], []
        for _ in range(2):
            for times, rep in ((plain, False), (reported, True)):
                t = time.perf_counter()
                autoinit_tf.wrap(model, seed=0, return_report=rep)
                times.append(time.perf_counter() - t)
        print(f"{os.path.basename(root):10s} {name:18s} build {build:.2f}  default " + " ".join(f"{w:.2f}" for w in plain)
              + "  with report " + " ".join(f"{w:.2f}" for w in reported))
        return
    wraps = []
    for _ in range(3):
        t = time.perf_counter()
        autoinit_tf.wrap(model, seed=0, calibrate="auto" if default else None)
        wraps.append(time.perf_counter() - t)
    kind = "default wraps" if default else "wraps"
    print(f"{os.path.basename(root):10s} {name:18s} build {build:.2f}  {kind} " + " ".join(f"{w:.2f}" for w in wraps))


if __name__ == "__main__":
    main()
