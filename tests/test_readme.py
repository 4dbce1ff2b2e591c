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
    # keras-hub's rows appear only once keras-hub is imported (another test may have imported it here).
    assert rows == {row for row in supported_layers() if row[2] != "keras_hub_layers"}
