"""benchmarks/gpu_check.py keeps working: every variant runs at smoke sizes on the JAX backend with
TensorFlow hidden (as on a GPU machine without it), and the ratios it reports are finite."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_on_jax_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--in-process",
         "--hide-tensorflow", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())
    results = summary["results"]
    assert not [v for v, r in results.items() if "error" in r]
    assert all(r["backend"] == "jax" and r["tensorflow_imported"] is False for r in results.values())
    # one figure per requested measurement: wrap/build, fit wrapped/plain, every swap recipe, DP vs plain
    ratios = summary["ratios"]
    expected = {"wrap/build resnet50", "wrap_probe/build resnet50", "wrap/build transformer",
                "fit throughput wrapped/plain cnn", "fit throughput wrapped/plain transformer",
                "dp step/plain step batch 16"}
    expected |= {f"step time {r}/original" for r in ("bn->proxynorm", "act:relu->and_ail", "act:relu->elu",
                                                      "gap->logavgexp", "residual->stochastic_depth",
                                                      "conv_unit->whitening", "residual->scaled", "darbn")}
    assert expected <= set(ratios), expected - set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    assert all(r["peak_mb"] > 0 for r in results.values())
