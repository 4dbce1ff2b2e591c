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


def rerun_core(backend, module, files, extra=(), timeout=900):
    """Run the core tests of `files` in a subprocess with KERAS_BACKEND=`backend`; assert they pass."""
    pytest.importorskip(module)
    if os.environ.get("KERAS_BACKEND") == backend:
        pytest.skip(f"already running on {backend}")
    proc = run_python([sys.executable, "-m", "pytest", "-q", "-m", "core and not slow", "-p", "no:cacheprovider",
                       *extra, *files], {"KERAS_BACKEND": backend}, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail
