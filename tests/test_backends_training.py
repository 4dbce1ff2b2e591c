"""The training-side techniques' tests under KERAS_BACKEND=jax and =torch (see `test_backends.py`)."""

from backend_rerun import rerun_core

TRAINING = ["tests/test_gradinit.py", "tests/test_revisited_bn.py", "tests/test_transfer.py", "tests/test_powergrad.py",
            "tests/test_pure_noise.py", "tests/test_byol.py", "tests/test_quantize.py",
            "tests/test_quantize_graph.py"]


def test_training_techniques_pass_on_jax_backend():
    rerun_core("jax", "jax", TRAINING, extra=["-x"], timeout=1500)


def test_training_techniques_pass_on_torch_backend():
    # GradInit's create_graph path, PowerGrad's surrogate, BYOL's optimizer-driven target, fake quantization
    rerun_core("torch", "torch", ["tests/test_gradinit.py", "tests/test_powergrad.py", "tests/test_byol.py",
                                  "tests/test_quantize.py", "tests/test_quantize_graph.py"], timeout=1500)
