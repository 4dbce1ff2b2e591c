"""Small keras-hub backbones built from constructor arguments (random weights, no presets): the
acceptance models of issue 15. Skipped when keras-hub is not installed (it is in the test extra)."""

import warnings

import keras

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import autoinit_tf  # noqa: E402
from autoinit_tf import declared, graph, inputs  # noqa: E402
from over_seeds import assert_over_seeds  # noqa: E402

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


def _decoder_after_analytic_wrap(name, seed=0):
    """A small GPT-2, Llama or Gemma backbone after ``wrap(calibrate=None, seed=seed)``. Names restart (the
    session is cleared) so that the variables' paths, which key wrap's random streams, do not depend on the
    models earlier tests built: the same weights whichever tests ran before."""
    keras.backend.clear_session()
    if name == "gpt2":
        model = keras_hub.models.GPT2Backbone(num_heads=2, max_sequence_length=64, **SIZE)
    elif name == "llama":
        model = keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **SIZE)
    else:
        model = keras_hub.models.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=32, **SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autoinit_tf.wrap(model, seed=seed, calibrate=None)
    return model


def _outputs_on_fresh_tokens(model, layers, seeds):
    """``id(layer) -> [output arrays]`` of each of `layers` over the model's training-mode calls on fresh
    probes of 64 examples (token ids uniform over the vocabulary, masks ones), one per seed."""
    seen = {}
    for layer in layers:
        original = layer.call

        def call(*args, _layer=layer, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.setdefault(id(_layer), []).append(np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64))
            return out

        object.__setattr__(layer, "call", call)
    fn = graph.as_functional(model)
    for seed in seeds:
        x = dict(zip([kt.name for kt in fn.inputs], inputs.probe_arrays(fn, None, 64, seed=seed)))
        model(x, training=True)
    return seen


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


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "stack"])
def test_blocks_are_walked_inside_without_fallbacks(name):
    """Was: every keras-hub block fell back to a probe and kept Keras' init (0.2% of the parameters of a
    TransformerEncoder stack re-initialized; Llama's decoder blocks and norms fell back)."""
    import keras

    from autoinit_tf import FallbackRuleWarning

    if name == "bert":
        model = keras_hub.models.BertBackbone(num_heads=2, max_sequence_length=64, **SIZE)
    elif name == "gpt2":
        model = keras_hub.models.GPT2Backbone(num_heads=2, max_sequence_length=64, **SIZE)
    elif name == "llama":
        model = keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **SIZE)
    else:
        ids = keras.Input((64,), dtype="int32")
        x = keras_hub.layers.TokenAndPositionEmbedding(1000, 64, 64)(ids)
        x = keras_hub.layers.TransformerDecoder(128, 2)(keras_hub.layers.TransformerEncoder(128, 2)(x))
        model = keras.Model(ids, keras.layers.Dense(10)(x[:, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert not rep.fallbacks
    inner = [r.name for r in rep.rows if r.weighted and "/" in r.name]
    assert len(inner) >= 6  # the blocks' own Dense / EinsumDense / attention layers, 3+ per block
    kernels = [v for v in model.weights if len(v.shape) >= 2 and not v.path.endswith("bias")]
    kept = [v.path for v in kernels if v.path not in set(rep.assigned)]
    assert not kept  # Llama's untied reverse head too, though the backbone never calls it


def test_untied_head_of_a_wrapped_backbone_puts_the_causal_lm_logits_on_target():
    """LlamaBackbone alone never calls its untied reverse table (32% of its weighted parameters were left
    as Keras drew them); wrap draws it for the normalized head input, so the LlamaCausalLM built on the
    wrapped backbone starts with logit variance on target. Measured on the task model's real logits."""
    backbone = keras_hub.models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **SIZE)
    before = backbone.token_embedding.reverse_embeddings.numpy().copy()
    _, rep = autoinit_tf.wrap(backbone, seed=0, calibrate=None, return_report=True)
    assert not rep.untouched
    assert not np.array_equal(before, backbone.token_embedding.reverse_embeddings.numpy())
    lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    fn = graph.as_functional(backbone)
    x = dict(zip([kt.name for kt in fn.inputs], inputs.probe_arrays(fn, None, 32, seed=7)))
    logits = np.asarray(keras.ops.convert_to_numpy(lm(x)), dtype=np.float64)
    hidden = np.asarray(keras.ops.convert_to_numpy(backbone(x)), dtype=np.float64)
    assert np.mean(hidden ** 2) == pytest.approx(1.0, rel=0.05)  # the final RMS norm's output
    assert logits.var() == pytest.approx(1.0, rel=0.1)


def test_tied_lm_head_logits_on_target():
    """GPT2CausalLM: one table serves the embedding and the head; was predicted 1.0, measured 63.8."""
    backbone = keras_hub.models.GPT2Backbone(num_heads=2, max_sequence_length=64, **SIZE)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    fn = graph.as_functional(model)
    x = dict(zip([kt.name for kt in fn.inputs], inputs.probe_arrays(fn, None, 32, seed=7)))
    logits = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    assert logits.var() == pytest.approx(1.0, rel=0.15)
    assert rep.output.var == pytest.approx(logits.var(), rel=0.15)


def test_vit_later_attention_blocks_are_calibrated_by_default():
    """Block 2 of a ViT reads values that share 22% of their variance across positions (what block 1's
    attention averaging left, lumped with per-unit offsets): the analytic pass put its attention output
    at 0.61. The rule calls that an estimate, so the default wrap calibrates that projection (only)."""
    model = keras_hub.models.ViTBackbone(image_shape=(96, 96, 3), patch_size=16, num_layers=2, num_heads=2,
                                         hidden_dim=64, mlp_dim=128)
    outs = sorted((layer for layer in model._flatten_layers(include_self=False, recursive=True)
                   if layer.name == "attention_output"), key=lambda layer: layer.path)  # block 1, block 2
    assert len(outs) == 2
    seen, recording = {}, []
    for i, layer in enumerate(outs):
        original = layer.call

        def call(*args, _original=original, _i=i, **kwargs):
            y = _original(*args, **kwargs)
            if recording:  # only on the measuring call below, never inside wrap's traces and replays
                seen[_i] = float(np.var(keras.ops.convert_to_numpy(y)))
            return y

        object.__setattr__(layer, "call", call)
    x = np.random.default_rng(7).standard_normal((64, 96, 96, 3)).astype("float32")
    variances = {}
    for mode in (None, "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, rep = autoinit_tf.wrap(model, seed=0, calibrate=mode, return_report=True)
        recording.append(True)
        model(x, training=True)
        recording.clear()
        variances[mode] = dict(seen)
    assert [n for n in rep.auto_calibrated if "mha" in n] == ["vit_encoder/transformer_block_2/mha"]
    assert "across positions" in rep.auto_calibrated["vit_encoder/transformer_block_2/mha"]
    # the analytic estimate of block 2: 0.72-1.17 over five seeds (0.61 on this one before block 1's position
    # pattern was carried, 0.77 now); calibrated, 0.96-1.02
    assert abs(np.log(variances["auto"][1])) < abs(np.log(variances[None][1]))
    assert 0.85 < variances["auto"][1] < 1.15
    # block 1 is predicted, not calibrated: within the default wrap's target. Half the tokens' variance is
    # the position table, a pattern fixed per position that the uniform part of the attention weights
    # averages away; counted as independent, block 1 measured 0.76-0.84 over five seeds (0.85 on this one).
    # With the pattern carried (`Moments.pattern`): 0.88-0.99 (0.99 here; tests/test_attention_pattern.py).
    assert 0.8 < variances["auto"][0] < 1.25


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_causal_attention_outputs_on_target_after_the_analytic_wrap(name):
    """Each query of a causal decoder averages its own i + 1 keys, not all 64: the attention output
    projections came out 2.6-5x the target after the analytic wrap (GPT-2 through MultiHeadAttention's
    mask, Llama and Gemma through their masked Softmax and the einsum of the weights with the values, and
    Gemma's where on the queries that see nothing). The causal mask is now folded from the probe's all-ones
    padding mask and reaches those rules exactly. Measured: each block's attention output projection on
    fresh token ids, training mode, over three seeds (weights and tokens). Over five seeds the first block
    measured 0.95-1.04; the second block's values share per-example parts, which the rule calls an
    estimate (the default wrap calibrates it): 0.96-1.25 (GPT-2), 1.16-1.43 (Llama), 1.05-1.09 (Gemma)."""
    first, second = [], []
    for seed in range(3):
        model = _decoder_after_analytic_wrap(name, seed=seed)
        projections = [l for l in model._flatten_layers(include_self=False, recursive=True)
                       if isinstance(l, keras.layers.EinsumDense) and l.name in ("attention_output", "output")]
        assert len(projections) == 2
        seen = _outputs_on_fresh_tokens(model, projections, seeds=(11 + seed, 12 + seed))
        first_y, second_y = (np.concatenate(seen[id(layer)]) for layer in projections)
        first.append(np.mean(first_y * first_y))
        second.append(np.mean(second_y * second_y))
    assert_over_seeds(first, mean=0.05, each=0.08, what="block 1")
    assert_over_seeds(second, mean=0.4, each=0.6, what="block 2 (an estimate)")


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_projections_after_the_rms_norms_on_target_after_the_analytic_wrap(name):
    """keras-hub's RMS norms are traced into raw ops; taken as a product of two independent signals,
    x * rsqrt(mean(x^2) + eps) was predicted 1.065-1.093 for 1.000, and every query, key and value
    projection after it came out 0.90-0.95 of the target (`rules.rms_pattern`). Measured: each block's
    query, key and value projections on fresh token ids, training mode."""
    model = _decoder_after_analytic_wrap(name)
    layer0 = [l for l in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(l, keras.layers.EinsumDense) and l.name in ("query", "key", "value")][:3]
    assert len(layer0) == 3
    seen = _outputs_on_fresh_tokens(model, layer0, seeds=(21, 22, 23, 24))
    for layer in layer0:
        y = np.concatenate(seen[id(layer)])
        assert 0.96 <= float(np.var(y)) <= 1.04, (layer.path, float(np.var(y)))


def _weighted_layers(model):
    """Every layer in the tree owning a weight of two or more dimensions (kernels and tables) whose output
    is its pre-activation (no fused activation: a Dense with GELU is checked through the layer after it)."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if any(len(v.shape) >= 2 for v in list(layer._trainable_variables) + list(layer._non_trainable_variables))
            and getattr(layer, "activation", None) in (None, keras.activations.linear)]


def _variances_on_fresh_tokens(model, seeds=(101, 102)):
    layers = _weighted_layers(model)
    seen = _outputs_on_fresh_tokens(model, layers, seeds)
    return {layer.path: float(np.var(np.concatenate([a.reshape(-1) for a in seen[id(layer)]])))
            for layer in layers if id(layer) in seen}


def test_deberta_v3_attention_and_relative_embedding_have_rules():
    """Was: DeBERTa-v3's DisentangledSelfAttention (``tf.gather`` on TensorFlow: no trace) and its
    RelativeEmbedding fell back and kept keras-hub's init: 26% of the kernels untouched, attention outputs
    at variance e^-11.7. Now both have rules: every kernel drawn, every weighted layer within [0.67, 1.5] after
    the analytic wrap and within [0.8, 1.25] after the default one (which calibrates the attention: its
    value-logit coupling is approximated)."""
    from autoinit_tf import FallbackRuleWarning

    keras.backend.clear_session()
    model = keras_hub.models.DebertaV3Backbone(num_heads=2, max_sequence_length=64, bucket_size=16, **SIZE)
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRuleWarning)
        _, rep = autoinit_tf.wrap(model, seed=0, calibrate=None, return_report=True)
    assert not rep.fallbacks
    kernels = [v for v in model.weights if len(v.shape) >= 2 and not v.path.endswith("bias")]
    assert all(not np.array_equal(before[v.path], v.numpy()) for v in kernels)
    got = _variances_on_fresh_tokens(model)
    assert any("rel_embedding" in k for k in got) and any("self_attention_layer/attention_output" in k for k in got)
    assert all(0.67 < v < 1.5 for v in got.values()), got
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert any("self_attention_layer" in name for name in rep.auto_calibrated)
    got = _variances_on_fresh_tokens(model)
    assert all(0.8 < v < 1.25 for v in got.values()), got


@pytest.mark.parametrize("name", ["esm2", "dinov2", "gpt_oss"])
def test_other_backbones_wrap_by_default(name):
    """Were: ESM2's attention fell back (its rotary sublayer declares one shape, returns two), DINOv2's default
    wrap raised (a ``training`` keyword passed on to its Conv2D), GPT-OSS raised in the clip rule. Each now
    wraps by default; ESM2's attention is walked inside and every kernel of it is drawn."""
    keras.backend.clear_session()
    m = keras_hub.models
    if name == "esm2":
        model = m.ESM2Backbone(num_heads=2, **SIZE)
    elif name == "dinov2":
        model = m.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=64, num_heads=2, intermediate_dim=128,
                                 image_shape=(70, 70, 3))
    else:
        model = m.GptOssBackbone(num_query_heads=2, num_key_value_heads=1, num_experts=4, **SIZE)
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = autoinit_tf.wrap(model, seed=0, return_report=True)
    assert np.isfinite(float(rep.output.var))
    if name == "esm2":
        assert not rep.fallbacks
        attention = [v for v in model.weights if "attention_layer" in v.path and v.path.endswith("kernel")]
        assert len(attention) == 8 and all(not np.array_equal(before[v.path], v.numpy()) for v in attention)


@pytest.mark.parametrize("name", ["dinov2", "vitdet"])
def test_position_tables_added_to_a_wrapped_patch_projection_are_per_position_biases(name):
    """A learned position table added to a patch convolution's output is a per-position bias of it (std 0.02
    of the signal, as DeiT's). Was: DINOv2 wraps its convolution in a layer of its own and ViTDet adds the
    table in another layer than the convolution's, so the table was drawn as an embedding and the sum came
    out 1.95-2x (DINOv2's ``embeddings``, ViTDet's ``add_positional_embedding``). Now the projection is
    found through traced blocks in both directions, and those outputs are on target after the analytic wrap."""
    keras.backend.clear_session()
    m = keras_hub.models
    if name == "dinov2":
        model = m.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=64, num_heads=2, intermediate_dim=128,
                                 image_shape=(70, 70, 3))
        target = "embeddings"
    else:
        model = m.ViTDetBackbone(hidden_size=64, num_layers=2, intermediate_dim=128, num_heads=2,
                                 global_attention_layer_indices=[1], image_shape=(64, 64, 3), patch_size=16,
                                 window_size=2)
        target = "add_positional_embedding"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autoinit_tf.wrap(model, seed=0, calibrate=None)
    got = _variances_on_fresh_tokens(model)
    assert 0.8 < got[target] < 1.25, got
    assert all(0.5 < v < 2.0 for v in got.values()), got
