"""keras-hub's other backbones: each built from constructor arguments (random weights, small sizes), wrapped
analytically and by default, in its own subprocess. Beyond the 29 models of `zoo_real.py` (issue 15's list):
what a user reaching for another keras-hub family meets.

Per model it prints one JSON line: build / analytic / default wrap times (s); reinit, the fraction of
weighted-layer kernels the analytic wrap re-initialized (`zoo_real.weighted_layers`, floating-point kernels
and tables of two or more dimensions, biases excluded) and the first kept ones; the layers left to the probe fallback; per mode
the three weighted layers furthest from the target (|log var| of the pre-activation output, `zoo_real.Recorder`;
the target is 1 except where the layer's report row names its own, `zoo_real.relative_to_targets`,
on 128 fresh examples in batches of 32: `zoo_real.fresh_inputs`), the median |log var|, and for the default
wrap how many layers it calibrated (``auto``); an error, if any, with its traceback's end.

    python benchmarks/hub_sweep.py [NAME ...]

Sizes: text models vocabulary 1000, 2 layers, hidden 64, intermediate 128 (64 tokens where a length is
declared); vision models 64x64 images (70x70 for DINOv2's patch 14) unless noted.
"""

import json
import os
import subprocess
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

T = dict(vocabulary_size=1000, num_layers=2, hidden_dim=64, intermediate_dim=128)
def build(name):
    """A small keras-hub backbone `name`, built from constructor arguments (random weights)."""
    import keras_hub
    m = keras_hub.models
    img = (64, 64, 3)
    B = {
     "AlbertBackbone": lambda: m.AlbertBackbone(num_heads=2, embedding_dim=32, max_sequence_length=64, **T),
     "BartBackbone": lambda: m.BartBackbone(num_heads=2, max_sequence_length=64, **T),
     "BloomBackbone": lambda: m.BloomBackbone(num_heads=2, **T),
     "DebertaV3Backbone": lambda: m.DebertaV3Backbone(num_heads=2, max_sequence_length=64, bucket_size=16, **T),
     "DistilBertBackbone": lambda: m.DistilBertBackbone(num_heads=2, max_sequence_length=64, **T),
     "ESM2Backbone": lambda: m.ESM2Backbone(num_heads=2, **T),
     "ElectraBackbone": lambda: m.ElectraBackbone(vocab_size=1000, num_layers=2, num_heads=2, hidden_dim=64, embedding_dim=32, intermediate_dim=128, max_sequence_length=64),
     "FNetBackbone": lambda: m.FNetBackbone(max_sequence_length=64, **T),
     "FalconBackbone": lambda: m.FalconBackbone(num_attention_heads=2, **T),
     "GPTNeoXBackbone": lambda: m.GPTNeoXBackbone(num_heads=2, max_sequence_length=64, **T),
     "Llama3Backbone": lambda: m.Llama3Backbone(num_query_heads=2, num_key_value_heads=1, **T),
     "MistralBackbone": lambda: m.MistralBackbone(num_query_heads=2, num_key_value_heads=1, **T),
     "MixtralBackbone": lambda: m.MixtralBackbone(num_query_heads=2, num_key_value_heads=1, num_experts=4, **T),
     "OPTBackbone": lambda: m.OPTBackbone(num_heads=2, max_sequence_length=64, **T),
     "Phi3Backbone": lambda: m.Phi3Backbone(num_query_heads=2, num_key_value_heads=1, **T),
     "QwenBackbone": lambda: m.QwenBackbone(num_query_heads=2, num_key_value_heads=1, **T),
     "Qwen2Backbone": lambda: m.Qwen2Backbone(num_query_heads=2, num_key_value_heads=1, **T),
     "Qwen3Backbone": lambda: m.Qwen3Backbone(num_query_heads=2, num_key_value_heads=1, head_dim=32, **T),
     "QwenMoeBackbone": lambda: m.QwenMoeBackbone(num_query_heads=2, num_key_value_heads=1, moe_intermediate_dim=32, shared_expert_intermediate_dim=64, num_experts=4, **T),
     "Qwen3MoeBackbone": lambda: m.Qwen3MoeBackbone(num_query_heads=2, num_key_value_heads=1, moe_intermediate_dim=32, num_experts=4, **T),
     "RobertaBackbone": lambda: m.RobertaBackbone(num_heads=2, max_sequence_length=64, **T),
     "XLMRobertaBackbone": lambda: m.XLMRobertaBackbone(num_heads=2, max_sequence_length=64, **T),
     "XLNetBackbone": lambda: m.XLNetBackbone(num_heads=2, **T),
     "RoformerV2Backbone": lambda: m.RoformerV2Backbone(num_heads=2, head_size=32, max_wavelength=10000, **T),
     "T5Backbone": lambda: m.T5Backbone(num_heads=2, **T),
     "WhisperBackbone": lambda: m.WhisperBackbone(num_heads=2, max_encoder_sequence_length=64, max_decoder_sequence_length=64, **T),
     "GptOssBackbone": lambda: m.GptOssBackbone(num_query_heads=2, num_key_value_heads=1, num_experts=4, **T),
     "DINOV2Backbone": lambda: m.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=64, num_heads=2, intermediate_dim=128, image_shape=(70, 70, 3)),
     "DenseNetBackbone": lambda: m.DenseNetBackbone(stackwise_num_repeats=[2, 2], image_shape=img),
     "VGGBackbone": lambda: m.VGGBackbone(stackwise_num_repeats=[2, 2], stackwise_num_filters=[16, 32], image_shape=img),
     "XceptionBackbone": lambda: m.XceptionBackbone(stackwise_conv_filters=[[32, 64], [128, 128], [256, 256]], stackwise_pooling=[False, True, False], image_shape=img),
     "CLIPVisionEncoder": lambda: m.CLIPVisionEncoder(patch_size=16, hidden_dim=64, num_layers=2, num_heads=2, intermediate_dim=128, image_shape=(64, 64, 3)),
     "ViTDetBackbone": lambda: m.ViTDetBackbone(hidden_size=64, num_layers=2, intermediate_dim=128, num_heads=2, global_attention_layer_indices=[1], image_shape=(64, 64, 3), patch_size=16, window_size=2),
     "SegFormerBackbone": lambda: m.SegFormerBackbone(image_encoder=m.MiTBackbone(image_shape=img, layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[4, 2], max_drop_path_rate=0.0, hidden_dims=[16, 32], layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2]), projection_filters=32),
     "MobileNetBackbone": lambda: m.MobileNetBackbone(stackwise_expansion=[[1], [4, 6]], stackwise_num_blocks=[1, 2], stackwise_num_filters=[[16], [24, 40]], stackwise_kernel_size=[[3], [3, 5]], stackwise_num_strides=[[2], [2, 2]], stackwise_se_ratio=[[0.25], [None, 0.25]], stackwise_activation=[["relu"], ["relu", "hard_swish"]], stackwise_padding=[[1], [1, 2]], output_num_filters=128, depthwise_filters=8, depthwise_stride=2, depthwise_residual=False, last_layer_filter=64, image_shape=img),
     "EfficientNetBackbone": lambda: m.EfficientNetBackbone(stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 2], stackwise_input_filters=[32, 16], stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 6], stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2], stackwise_block_types=["v1", "v1"], width_coefficient=1.0, depth_coefficient=1.0),  # images (None, None, 3)
    }
    return B[name]()
NAMES = ["AlbertBackbone","BartBackbone","BloomBackbone","DebertaV3Backbone","DistilBertBackbone","ESM2Backbone","ElectraBackbone","FNetBackbone","FalconBackbone","GPTNeoXBackbone","Llama3Backbone","MistralBackbone","MixtralBackbone","OPTBackbone","Phi3Backbone","QwenBackbone","Qwen2Backbone","Qwen3Backbone","QwenMoeBackbone","Qwen3MoeBackbone","RobertaBackbone","XLMRobertaBackbone","XLNetBackbone","RoformerV2Backbone","T5Backbone","WhisperBackbone","GptOssBackbone","DINOV2Backbone","DenseNetBackbone","VGGBackbone","XceptionBackbone","CLIPVisionEncoder","ViTDetBackbone","SegFormerBackbone","MobileNetBackbone","EfficientNetBackbone"]

def one(name):
    """Build, wrap (analytic, then default) and measure one model; a dict of the figures."""
    import numpy as np, zoo_real, autoinit_tf
    from autoinit_tf import graph
    res = {"model": name}
    t = time.perf_counter()
    try:
        model = build(name)
    except Exception as e:
        res["build_error"] = f"{type(e).__name__}: {str(e)[:200]}"; return res
    res["build_s"] = time.perf_counter() - t
    layers = zoo_real.weighted_layers(model)
    kernels = {v.path: v for l in layers for v in l.weights if len(v.shape) >= 2 and "float" in str(v.dtype) and "bias" not in v.path.rsplit("/",1)[-1]}
    before = {p: zoo_real._digest(v) for p, v in kernels.items()}
    rec = zoo_real.Recorder(layers)
    fn = graph.as_functional(model)
    batches = [zoo_real.fresh_inputs(fn, 32, 12345 + i) for i in range(4)]  # 128 fresh examples
    for mode, cal in (("analytic", None), ("default", "auto")):
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                t = time.perf_counter()
                _, rep = autoinit_tf.wrap(model, seed=0, calibrate=cal, return_report=True)
                res[mode + "_s"] = time.perf_counter() - t
            res[mode + "_warn"] = sorted({str(x.message)[:160] for x in w})[:4]
        except Exception as e:
            res[mode + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            res[mode + "_tb"] = traceback.format_exc()[-1500:]
            continue
        if mode == "analytic":
            kept = [p for p, d in before.items() if d == zoo_real._digest(kernels[p])]
            tot = sum(int(np.prod(v.shape)) for v in kernels.values())
            res["reinit"] = 1 - sum(int(np.prod(kernels[p].shape)) for p in kept) / max(tot, 1)
            res["kept"] = kept[:5]
            res["fallbacks"] = sorted({r.name for r in rep.fallbacks})[:6]
        else:
            res["auto"] = len(rep.auto_calibrated)
        targets = rep.targets()
        got, final = rec.run(model, batches)
        got = zoo_real.relative_to_targets(got, targets)
        logs = {k: float(np.log(max(v, 1e-30))) for k, v in got.items()}
        worst = sorted(logs.items(), key=lambda kv: -abs(kv[1]))[:3]
        res[mode + "_worst"] = [(k, round(v, 3)) for k, v in worst]
        res[mode + "_median"] = float(np.median(np.abs(list(logs.values())))) if logs else 0
        res[mode + "_final"] = abs(float(np.log(max(float(rep.output.var), 1e-30) / max(final, 1e-30))))
    return res

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        warnings.simplefilter("ignore")
        print("RESULT " + json.dumps(one(sys.argv[2])))
    else:
        for n in sys.argv[1:] or NAMES:
            try:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", n], capture_output=True,
                                   text=True, timeout=900)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                print(line[0][7:] if line else json.dumps({"model": n, "crash": p.stderr[-800:]}), flush=True)
            except subprocess.TimeoutExpired:
                print(json.dumps({"model": n, "timeout": True}), flush=True)
