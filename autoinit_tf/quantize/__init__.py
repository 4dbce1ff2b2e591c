"""Quantization-aware training with hardware presets (MQBench's conventions) and int8 conversion.

    qat = autoinit_tf.quantize.prepare(model, preset="tensorrt", bits=8, method="lsq", data=x_calib)
    qat.compile(...); qat.fit(...)                       # any backend; saves and reloads as .keras
    int8 = autoinit_tf.quantize.convert(qat, data=x_calib)   # TensorFlow backend: a TFLite int8 model
    int8.predict(x); int8.save("model.tflite")

Building blocks: fake_quant.py (STE fake quantization, LSQ, PACT, DoReFa, min/max grids), presets.py (the
hardware table), layers.py (FakeQuant, QuantizedLayer with BatchNorm folding), prepare.py (the graph
rewrite), convert.py (the TFLite export).
"""

from autoinit_tf.quantize.convert import IntegerModel, convert, export_model
from autoinit_tf.quantize.fake_quant import (dorefa_activation, dorefa_weights, fake_quantize, lsq_init_scale,
                                             lsq_quantize, minmax_params, pact_quantize, pow2_scale, quant_range,
                                             round_ste)
from autoinit_tf.quantize.layers import METHODS, FakeQuant, QuantizedLayer
from autoinit_tf.quantize.prepare import QuantizationWarning, calibrate, prepare, quantizers_of
from autoinit_tf.quantize.presets import PRESETS, QuantPreset

__all__ = ["prepare", "calibrate", "convert", "export_model", "quantizers_of", "IntegerModel", "FakeQuant",
           "QuantizedLayer", "METHODS", "QuantizationWarning", "fake_quantize", "lsq_quantize", "lsq_init_scale",
           "pow2_scale", "quant_range", "round_ste", "minmax_params", "pact_quantize", "dorefa_weights",
           "dorefa_activation", "PRESETS", "QuantPreset"]
