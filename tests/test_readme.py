"""The README's supported-layer table is the registry's (regenerate with `autoinit-tf layers --markdown`)."""

import os

import pytest

pytestmark = pytest.mark.core


def test_readme_layer_table_matches_the_registry():
    from autoinit_tf_cli.layers import supported_layers

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Supported layers"): text.index("## Licence")]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| class")}
    assert rows == set(supported_layers())
