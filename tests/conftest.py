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
    from autoinit_tf.autoinit import _load_builtin_rules
    from autoinit_tf.rules import registry

    _load_builtin_rules()
    before = dict(registry._REGISTRY)
    yield
    leaked = set(registry._REGISTRY) - set(before)
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    assert not leaked, f"test left rules registered for {sorted(c.__name__ for c in leaked)}"
