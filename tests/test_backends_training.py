"""The training-side techniques' tests under KERAS_BACKEND=jax and =torch (a file of its own, so that the
suite's two workers run these beside test_backends.py's reruns)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_backends import _rerun_core  # noqa: E402

TRAINING = ["tests/test_gradinit.py", "tests/test_revisited_bn.py", "tests/test_transfer.py", "tests/test_powergrad.py",
            "tests/test_pure_noise.py", "tests/test_byol.py", "tests/test_quantize.py",
            "tests/test_quantize_graph.py"]


def test_training_techniques_pass_on_jax_backend():
    _rerun_core("jax", "jax", TRAINING, extra=["-x"], timeout=1500)


def test_training_techniques_pass_on_torch_backend():
    # GradInit's create_graph path, PowerGrad's surrogate, BYOL's optimizer-driven target, fake quantization
    _rerun_core("torch", "torch", ["tests/test_gradinit.py", "tests/test_powergrad.py", "tests/test_byol.py",
                                   "tests/test_quantize.py", "tests/test_quantize_graph.py"], timeout=1500)
