import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_configure(config):
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")


@pytest.fixture(autouse=True)
def _rule_registry_left_as_found():
    """The rule registry is process-wide and xdist runs many test files in one process: a test that
    registers a rule must not leak it into later tests (it did once: the README table test failed)."""
    from autoinit_tf.rules import registry
    from autoinit_tf.rules.builtin import register_builtin_rules

    register_builtin_rules()
    before = registry.snapshot()
    yield
    leaked = registry.restore(before)
    assert not leaked, f"test left rules registered for {sorted(getattr(c, '__name__', str(c)) for c in leaked)}"
