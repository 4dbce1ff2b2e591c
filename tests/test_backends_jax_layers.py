"""The paper layers', measurement and rewrite tests under KERAS_BACKEND=jax (see `test_backends.py`)."""

import glob
import os

from backend_rerun import HERE, ROOT, rerun_core


def test_layers_measure_and_rewrite_pass_on_jax_backend():
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(HERE, "test_layer_*.py")))
    files += ["tests/test_measure.py", "tests/test_report_measure.py", "tests/test_rewrite.py",
              "tests/test_stability.py"]
    rerun_core("jax", "jax", files, timeout=1500)
