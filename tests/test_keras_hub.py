"""Small keras-hub backbones built from constructor arguments (random weights, no presets): the
acceptance models of issue 15. Skipped when keras-hub is not installed (it is in the test extra)."""

import warnings

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import autoinit_tf  # noqa: E402
from autoinit_tf import declared, graph, inputs  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = dict(vocabulary_size=1000, num_layers=2, hidden_dim=64, intermediate_dim=128)


def _changed_fraction(model, run):
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(model)
    total = sum(a.size for a in before.values())
    changed = sum(before[v.path].size for v in model.weights if not np.array_equal(before[v.path], v.numpy()))
    return changed / total


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_position_table_backbones_wrap(name):
    """Crashed with 'Expected size[0] in [0, 64], but got 256': the probe's unknown sequence length
    was the probe batch size."""
    cls = keras_hub.models.BertBackbone if name == "bert" else keras_hub.models.GPT2Backbone
    model = cls(num_heads=2, max_sequence_length=64, **SIZE)
    assert declared.probe_length(model) == 64
    assert _changed_fraction(model, lambda m: autoinit_tf.wrap(m, seed=0)) > 0.3


def test_llama_probe_calibration_fits_in_memory():
    """Was out of memory: token ids and padding mask of shape (1024, 1024), mask drawn from {0..3}."""
    model = keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **SIZE)
    fn = graph.as_functional(model)
    batch = inputs.auto_batch(fn)
    arrays = dict(zip([kt.name for kt in fn.inputs], inputs.probe_arrays(fn, None, batch, seed=0)))
    assert arrays["padding_mask"].shape == (batch, declared.DEFAULT_PROBE_LENGTH)
    assert np.all(arrays["padding_mask"] == 1)
    assert arrays["token_ids"].max() > 900
    assert batch * declared.DEFAULT_PROBE_LENGTH * 64 * 4 <= declared.ACTIVATION_BYTES
    assert _changed_fraction(model, lambda m: autoinit_tf.wrap(m, seed=0, calibrate="probe")) > 0.1
