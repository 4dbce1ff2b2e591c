"""Rerunning a subset of the test suite in a subprocess under another Keras backend (the backend is fixed
when keras is first imported, so each backend needs its own process)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_python(code_or_args, env_extra, timeout=900):
    """`python -c code` (or the argument list) from the project root with `env_extra` in the environment."""
    env = dict(os.environ, **env_extra)
    env.pop("PYTEST_ADDOPTS", None)
    args = code_or_args if isinstance(code_or_args, list) else [sys.executable, "-c", code_or_args]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


#: XLA's backend optimizations off for the JAX reruns: they check results, not speed, and eager JAX compiles
#: every op for every new shape (the core tests' JAX rerun: ~20% less time, the same results).
JAX_TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def rerun_core(backend, module, files, extra=(), timeout=900):
    """Run the core tests of `files` (not the slow ones, nor the `backend_free` ones, which run no Keras
    code) in a subprocess with KERAS_BACKEND=`backend`; assert they pass."""
    pytest.importorskip(module)
    if os.environ.get("KERAS_BACKEND") == backend:
        pytest.skip(f"already running on {backend}")
    env = {"KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + JAX_TEST_XLA_FLAGS).strip()
    proc = run_python([sys.executable, "-m", "pytest", "-q", "-m", "core and not slow and not backend_free",
                       "-p", "no:cacheprovider", *extra, *files], env, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail
