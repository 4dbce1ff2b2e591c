"""Quantization on Fashion-MNIST: float vs post-training int8 vs QAT int8 vs QAT 4-bit, with integer model size,
CPU latency and the QAT step time, measured side by side in one run.

Per seed, the VGG-style CNN of benchmarks/slimming.py (conv-BN-ReLU x 6, GAP, Dense) is trained E epochs in
float (SGD momentum 0.9), then:
* ``float``: fine-tuned F more epochs in float (same extra training as the QAT runs), Keras and TFLite float;
* ``PTQ int8``: `quantize.prepare(model, "tensorrt", 8, "minmax", data=2,048 training images)` (BN folded,
  per-channel symmetric weights, graph level 2) and `quantize.convert` -> TFLite int8, no training;
* ``QAT int8`` / ``QAT 4-bit``: `prepare(model, "tensorrt", bits, "lsq", data=...)`, fine-tuned F epochs,
  accuracy of the fake-quantized Keras model and of its `convert`ed TFLite model (4-bit grids are stored in
  int8 exactly; TFLite has no int4 kernels).
Reported: test accuracy (10,000 images), .tflite size, TFLite CPU ms per batch of 256 (median of 20), and the
median training step time (batch 64, 48 steps after the accuracies are taken) of the QAT models against the
float model, compiled plainly and with XLA (`jit_compile=True`), same backend.

    python benchmarks/quantization.py --train 10000 --epochs 6 --finetune 2 --seeds 0 1 2 --out quantization.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist import load  # noqa: E402
from slimming import vgg  # noqa: E402
from step_timer import step_timer  # noqa: E402


def tflite_float(model):
    import tensorflow as tf

    from autoinit_tf.quantize import IntegerModel

    spec = tf.TensorSpec(model.inputs[0].shape, model.inputs[0].dtype)
    fn = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(fn)])
    return IntegerModel(converter.convert())


def tflite_ms(integer, x, repeats=20):
    integer.predict(x, batch_size=len(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        integer.predict(x, batch_size=len(x))
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--finetune", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--qat-lr", type=float, default=0.005)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import keras

    from autoinit_tf import quantize

    x, y = load("train")
    xt, yt = load("test")
    x, y = x[: args.train], y[: args.train]
    calib = x[:2048]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(model, epochs, lr, seed, jit_compile="auto", n=None):
        keras.utils.set_random_seed(seed)
        model.compile(keras.optimizers.SGD(lr, momentum=0.9), loss, jit_compile=jit_compile)
        steps = step_timer()
        model.fit(x[:n], y[:n], batch_size=64, epochs=epochs, verbose=0, callbacks=[steps])
        return 1000 * float(np.median(steps.times[len(steps.times) // 2:]))  # past the first trace

    def step_ms(model, jit_compile):
        """Median training step (batch 64) on 48 steps, after the accuracies are taken."""
        return fit(model, 1, 1e-4, 0, jit_compile=jit_compile, n=48 * 64)

    def acc(pred):
        return float((np.argmax(pred, 1) == yt).mean())

    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        model = vgg(keras, seed)
        fit(model, args.epochs, args.lr, seed)
        row = {"seed": seed, "float at E": acc(model.predict(xt, batch_size=512, verbose=0))}
        ptq = quantize.convert(quantize.prepare(model, "tensorrt", 8, "minmax", data=calib), data=calib)
        row["ptq int8"] = {"acc": acc(ptq.predict(xt)), "bytes": ptq.size_bytes, "ms": tflite_ms(ptq, xt[:256])}
        qat = {}
        for bits in (8, 4):
            q = quantize.prepare(model, "tensorrt", bits, "lsq", data=calib)
            fit(q, args.finetune, args.qat_lr, seed)
            integer = quantize.convert(q, data=calib)
            qat[bits] = {"acc_fake_quant": acc(q.predict(xt, batch_size=512, verbose=0)),
                         "acc": acc(integer.predict(xt)), "bytes": integer.size_bytes,
                         "ms": tflite_ms(integer, xt[:256]), "model": q}
        row["qat int8"], row["qat 4-bit"] = qat[8], qat[4]
        fit(model, args.finetune, args.qat_lr, seed)  # the float fine-tuning, same schedule
        flt = tflite_float(model)
        row["float"] = {"acc": acc(model.predict(xt, batch_size=512, verbose=0)), "acc_tflite": acc(flt.predict(xt)),
                        "bytes": flt.size_bytes, "ms": tflite_ms(flt, xt[:256])}
        for jit in (False, True):  # step times side by side: plain graph and XLA (fuses the element-wise ops)
            key = "step_ms_xla" if jit else "step_ms"
            row["float"][key] = step_ms(model, jit)
            for bits in (8, 4):
                qat[bits][key] = step_ms(qat[bits]["model"], jit)
        for bits in (8, 4):
            del qat[bits]["model"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)

    def stat(values):
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"

    def mean(key, field):
        return float(np.mean([r[key][field] for r in rows]))

    print(f"\nFashion-MNIST, {args.train} training images, E={args.epochs} float + F={args.finetune} fine-tuning "
          f"epochs, preset tensorrt, seeds {args.seeds}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, keras backend {keras.backend.backend()}")
    print(f"{'model':<26}{'test acc %':>16}{'.tflite bytes':>15}{'TFLite ms/256':>15}{'step ms':>9}{'XLA':>7}")
    print(f"{'float at E (Keras)':<26}{stat([r['float at E'] for r in rows]):>16}")
    print(f"{'float (Keras)':<26}{stat([r['float']['acc'] for r in rows]):>16}{'':>15}{'':>15}"
          f"{mean('float', 'step_ms'):>9.1f}{mean('float', 'step_ms_xla'):>7.1f}")
    print(f"{'float (TFLite fp32)':<26}{stat([r['float']['acc_tflite'] for r in rows]):>16}"
          f"{int(mean('float', 'bytes')):>15,}{mean('float', 'ms'):>15.1f}")
    print(f"{'PTQ int8 (TFLite)':<26}{stat([r['ptq int8']['acc'] for r in rows]):>16}"
          f"{int(mean('ptq int8', 'bytes')):>15,}{mean('ptq int8', 'ms'):>15.1f}")
    for key in ("qat int8", "qat 4-bit"):
        print(f"{key + ' (fake quant)':<26}{stat([r[key]['acc_fake_quant'] for r in rows]):>16}{'':>15}{'':>15}"
              f"{mean(key, 'step_ms'):>9.1f}{mean(key, 'step_ms_xla'):>7.1f}")
        print(f"{key + ' (TFLite int8)':<26}{stat([r[key]['acc'] for r in rows]):>16}"
              f"{int(mean(key, 'bytes')):>15,}{mean(key, 'ms'):>15.1f}")
    print(f"QAT step / float step: int8 x{mean('qat int8', 'step_ms') / mean('float', 'step_ms'):.2f} "
          f"(XLA x{mean('qat int8', 'step_ms_xla') / mean('float', 'step_ms_xla'):.2f}), "
          f"4-bit x{mean('qat 4-bit', 'step_ms') / mean('float', 'step_ms'):.2f} "
          f"(XLA x{mean('qat 4-bit', 'step_ms_xla') / mean('float', 'step_ms_xla'):.2f}); "
          f"int8 size / fp32 size x{mean('qat int8', 'bytes') / mean('float', 'bytes'):.2f}; "
          f"int8 latency / fp32 latency x{mean('qat int8', 'ms') / mean('float', 'ms'):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
