"""`convert`: a prepared (QAT) model to a real integer model, TensorFlow Lite / LiteRT int8.

One walk of the prepared graph builds an export model that TensorFlow's converter understands as
quantization-aware-trained: every `QuantizedLayer` becomes its merged float layer (BatchNorm folded:
kernel Q(w f), bias beta + (b - mu) f) whose constant kernel passes through
`tf.quantization.fake_quant_with_min_max_vars[_per_channel]` with the QAT grid's range, and every
`FakeQuant` becomes that op with the range the quantizer uses in inference ((q_min - z) s, (q_max - z) s).
The converter reads those ranges, so the int8 model computes on the QAT model's grids; tensors the preset's
graph level leaves in float (TFLite's int8 kernels need every tensor quantized) get ranges from the
representative data. Inputs and outputs stay float (quantized on entry, dequantized on exit) unless
`int8_io`.

Runs on the TensorFlow backend (the converter needs TensorFlow graphs). A QAT model trained on JAX or
PyTorch is saved as `.keras` and converted in a TensorFlow-backend process (`autoinit-tf quantize --qat`).
What else is possible: the prepared model's grids are everything an ONNX QDQ or a TensorRT explicit-
quantization export needs; only the TFLite path is built here.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np

import keras
from keras import ops, tree

from autoinit_tf.graph import as_functional, walk
from autoinit_tf.quantize.layers import FakeQuant, QuantizedLayer, linear_call

__all__ = ["convert", "IntegerModel", "export_model"]


def _tf_range(s, z, q_min, q_max, bits):
    """Arguments of TensorFlow's fake-quant op for the grid (s, z, [q_min, q_max]) and the clamp range.

    8 bits: the range ((q_min - z) s, (q_max - z) s) itself. Fewer bits: TFLite has no int4 kernels, so the
    8-bit grid with the same step s and zero point holds the b-bit values exactly (int8 storage of b-bit
    values); activations are then clamped to the b-bit range (an exact int8 MINIMUM/MAXIMUM on that grid)."""
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    clamp = ((q_min - z) * s, (q_max - z) * s)
    if bits == 8:
        lo8, hi8, narrow = clamp[0], clamp[1], (q_max - q_min == 254)
    else:
        q8 = (-128, 127) if q_min < 0 else (0, 255)
        lo8, hi8, narrow = (q8[0] - z) * s, (q8[1] - z) * s, False
    args = dict(min_vals=np.asarray(lo8, np.float32), max_vals=np.asarray(hi8, np.float32), num_bits=8,
                narrow_range=bool(narrow))
    return args, (None if bits == 8 else (np.asarray(clamp[0], np.float32), np.asarray(clamp[1], np.float32)))


class _ExportFakeQuant(keras.layers.Layer):
    """TensorFlow's fake-quant op with a constant range (what the TFLite converter reads)."""

    def __init__(self, quantizer, **kwargs):
        super().__init__(**kwargs)
        s, z = quantizer.grid()
        self.args, self.clamp = _tf_range(s, z, quantizer.q_min, quantizer.q_max, quantizer.bits)

    def call(self, x):
        x = keras.quantizers.fake_quant_with_min_max_vars(x, **self.args)
        if self.clamp is not None:  # after the 8-bit grid of step s, so that no tensor is rounded twice
            x = ops.clip(x, float(self.clamp[0]), float(self.clamp[1]))
        return x


class _ExportLinear(keras.layers.Layer):
    """The merged float layer with constant, fake-quantized kernels (on the QAT grid) and the folded bias."""

    def __init__(self, wrapper, **kwargs):
        super().__init__(**kwargs)
        self.layer = wrapper.layer
        kernels = [np.asarray(ops.convert_to_numpy(k), np.float32) for k in wrapper.quantized_kernels()]
        bias = wrapper.folded_bias()
        self.bias = None if bias is None else np.asarray(bias, np.float32)
        self.kernels, self.notes = [], []
        dense = isinstance(self.layer, keras.layers.Dense) and not isinstance(self.layer, keras.layers.EinsumDense)
        for k, (s, z), depthwise in zip(kernels, wrapper.weight_grids(), wrapper.depthwise):
            channels = k.shape[-2] * k.shape[-1] if depthwise else k.shape[-1]
            per_channel = np.ndim(s) > 0 and np.size(s) > 1
            if dense:
                k = k.reshape((1, 1) + k.shape)
            args, _ = _tf_range(s, z, wrapper.q_min, wrapper.q_max, wrapper.bits)
            if per_channel and depthwise and k.shape[-1] != 1:
                # TFLite stores this kernel as (1, h, w, in * mult): a per-channel grid cannot follow the reshape
                args.update(min_vals=np.min(args["min_vals"]), max_vals=np.max(args["max_vals"]))
                per_channel = False
                self.notes.append(f"{self.layer.name}: depth_multiplier > 1, weights per tensor in TFLite")
            if np.any(np.asarray(z) != 0):
                # TFLite's int8 kernels take symmetric weights only: its converter re-quantizes this kernel
                args = None
                self.notes.append(f"{self.layer.name}: asymmetric weight grid; TFLite re-quantized the weights "
                                  "symmetrically")
            self.kernels.append((k, channels, per_channel, args))

    def call(self, x):
        kernels = []
        for k, channels, per_channel, args in self.kernels:
            if args is None:
                kernels.append(ops.convert_to_tensor(k))
            elif per_channel and channels == k.shape[-1]:
                kernels.append(keras.quantizers.fake_quant_with_min_max_vars(ops.convert_to_tensor(k), axis=-1,
                                                                             **args))
            elif per_channel and k.shape[-1] == 1:  # depthwise, multiplier 1: the channels are axis -2
                kernels.append(keras.quantizers.fake_quant_with_min_max_vars(ops.convert_to_tensor(k), axis=-2,
                                                                             **args))
            else:
                kernels.append(keras.quantizers.fake_quant_with_min_max_vars(ops.convert_to_tensor(k), **args))
        if isinstance(self.layer, keras.layers.Dense) and not isinstance(self.layer, keras.layers.EinsumDense):
            # x @ W as a 1x1 convolution: TFLite's converter keeps per-channel weight grids on CONV_2D, while
            # a FULLY_CONNECTED kernel is transposed, which loses the channel axis of the grid
            k = kernels[0]  # built as (1, 1, in, out) in __init__
            lead = ops.shape(x)[:-1]
            y = ops.conv(ops.reshape(x, (-1, 1, 1, x.shape[-1])), k)
            y = ops.reshape(y, tuple(lead) + (k.shape[-1],))
        else:
            y = linear_call(self.layer, x, kernels)
        if self.bias is not None:
            y = y + self.bias
        act = self.layer.activation
        return act(y) if act is not None else y


def export_model(qat_model):
    """The float model with TensorFlow fake-quant ops that `convert` hands to the TFLite converter (its
    outputs equal the QAT model's in inference up to float rounding)."""
    fn = as_functional(qat_model)

    def visit(node, args, kwargs, site):
        op = node.operation
        if isinstance(op, FakeQuant):
            return _ExportFakeQuant(op, name=f"{op.name}_export")(tree.flatten(args)[0])
        if isinstance(op, QuantizedLayer):
            return _ExportLinear(op, name=f"{op.name}_export")(tree.flatten(args)[0])
        kwargs = {k: v for k, v in kwargs.items() if k != "training"}
        return op(*args, **kwargs)

    inputs = [keras.Input(batch_shape=kt.shape, dtype=kt.dtype, name=kt.name) for kt in fn.inputs]
    outputs = walk(fn, inputs if len(inputs) > 1 else inputs[0], visit)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=f"{qat_model.name}_export")


class IntegerModel:
    """A converted TFLite / LiteRT model: `predict` runs it; `save` writes the flatbuffer atomically."""

    def __init__(self, content: bytes, int8_io=False, notes=()):
        self.content = bytes(content)
        self.notes = list(notes)  # where the integer model departs from the QAT grids (stated by convert)
        self.int8_io = int8_io
        self._interpreter = None
        self._batch = None

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    def interpreter(self):
        if self._interpreter is None:
            try:
                from ai_edge_litert.interpreter import Interpreter
            except ImportError:
                import tensorflow as tf

                Interpreter = tf.lite.Interpreter
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._interpreter = Interpreter(model_content=self.content)
            self._interpreter.allocate_tensors()
        return self._interpreter

    def tensor_types(self) -> dict:
        """{dtype name: number of tensors} of the flatbuffer (a real integer model is mostly int8)."""
        counts = {}
        for d in self.interpreter().get_tensor_details():
            name = np.dtype(d["dtype"]).name
            counts[name] = counts.get(name, 0) + 1
        return counts

    def op_types(self) -> list:
        """The builtin op names in execution order (e.g. CONV_2D, FULLY_CONNECTED, QUANTIZE)."""
        try:
            return [op["op_name"] for op in self.interpreter()._get_ops_details()]
        except AttributeError:  # older interpreters
            return []

    def predict(self, x, batch_size=256):
        """Float outputs for float inputs `x` (one array per model input, or a single array)."""
        it = self.interpreter()
        ins, outs = it.get_input_details(), it.get_output_details()
        xs = x if isinstance(x, (list, tuple)) else [x]
        n = len(xs[0])
        results = []
        for start in range(0, n, batch_size):
            chunk = [np.asarray(a[start:start + batch_size]) for a in xs]
            if self._batch != len(chunk[0]):
                for d, a in zip(ins, chunk):
                    it.resize_tensor_input(d["index"], a.shape)
                it.allocate_tensors()
                ins, outs = it.get_input_details(), it.get_output_details()
                self._batch = len(chunk[0])
            for d, a in zip(ins, chunk):
                if np.dtype(d["dtype"]) in (np.int8, np.uint8) and not np.issubdtype(a.dtype, np.integer):
                    s, z = d["quantization"]
                    info = np.iinfo(d["dtype"])
                    a = np.clip(np.round(a / s + z), info.min, info.max)
                it.set_tensor(d["index"], a.astype(d["dtype"]))
            it.invoke()
            batch_out = []
            for d in outs:
                y = it.get_tensor(d["index"])
                if np.dtype(d["dtype"]) in (np.int8, np.uint8):
                    s, z = d["quantization"]
                    y = (y.astype(np.float32) - z) * s
                batch_out.append(y.copy())
            results.append(batch_out)
        merged = [np.concatenate([r[i] for r in results]) for i in range(len(outs))]
        return merged[0] if len(merged) == 1 else merged

    def save(self, path, *, overwrite=False):
        from autoinit_tf import io_utils

        directory = os.path.dirname(os.path.abspath(path))
        tmp = io_utils.temp_path(directory, suffix=".tflite")
        try:
            with open(tmp, "wb") as f:
                f.write(self.content)
        except BaseException:
            io_utils.remove(tmp)
            raise
        io_utils.publish(tmp, path, overwrite=overwrite)


def _representative(model, data, batches, batch_size, seed):
    from autoinit_tf.quantize.prepare import QuantizationWarning, batches_of

    if data is None:
        from autoinit_tf.inputs import probe_arrays

        warnings.warn("quantize.convert: no representative data; tensors without a QAT range get theirs from "
                      "the Gaussian model-input probe. Pass data=.", QuantizationWarning, stacklevel=3)
        arrays = probe_arrays(as_functional(model), None, batch_size, seed)
        data = arrays if len(arrays) > 1 else arrays[0]

    def gen():
        for x in batches_of(data, batches, batch_size):
            xs = tree.flatten(x)
            for i in range(len(xs[0])):
                yield [np.asarray(a[i:i + 1], np.float32) if "float" in str(np.asarray(a).dtype)
                       else np.asarray(a[i:i + 1]) for a in xs]

    return gen


def convert(qat_model, data=None, *, int8_io=False, batches=4, batch_size=32, seed=0) -> IntegerModel:
    """The prepared (and trained) `qat_model` as a TFLite / LiteRT int8 model (`IntegerModel`).

    `data`: representative inputs (as for `prepare`) for the tensors the QAT graph leaves in float; the
    probe, with a warning, when None. `int8_io`: int8 model inputs and outputs instead of float ones.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "quantize.convert runs on the TensorFlow backend (TFLite's converter reads TensorFlow graphs); this "
            f"process uses {keras.backend.backend()!r}. Save the QAT model (model.save('qat.keras')) and convert "
            "it with KERAS_BACKEND=tensorflow: `autoinit-tf quantize qat.keras out.tflite --qat`.")
    import tensorflow as tf

    wide = sorted({layer.bits for layer in qat_model.layers if isinstance(layer, (FakeQuant, QuantizedLayer))
                   and layer.bits > 8})
    if wide:
        raise ValueError(f"TFLite's integer kernels are int8; this QAT model has {wide}-bit quantizers. Prepare it "
                         "with bits <= 8 to convert (fewer bits are stored in int8 exactly).")
    export = export_model(qat_model)
    notes = [n for layer in export.layers if isinstance(layer, _ExportLinear) for n in layer.notes]
    if notes:
        from autoinit_tf.quantize.prepare import QuantizationWarning

        warnings.warn("quantize.convert: the integer model does not follow the QAT grid everywhere: "
                      + "; ".join(notes) + ".", QuantizationWarning, stacklevel=2)
    specs = [tf.TensorSpec(kt.shape, kt.dtype, name=kt.name) for kt in export.inputs]

    @tf.function
    def serve(*xs):
        return export(list(xs) if len(xs) > 1 else xs[0], training=False)

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = convert_variables_to_constants_v2(serve.get_concrete_function(*specs))  # weights as constants
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(qat_model, data, batches, batch_size, seed)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = converter.convert()
    return IntegerModel(content, int8_io=int8_io, notes=notes)
