"""Fashion-MNIST for the benchmarks, offline: Debian's ``dataset-fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``), images (N, 28, 28, 1) float32 standardized with the training
set's mean 0.2860 and standard deviation 0.3530, labels int32."""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def _read(name, offset):
    path = os.path.join(DATA_DIR, name)
    if not os.path.exists(path):
        sys.exit(f"{path} not found: apt-get install -y dataset-fashion-mnist")
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(split):
    """(x, y) of the official ``"train"`` or ``"test"`` file; x standardized (x * STD + MEAN is in [0, 1])."""
    prefix = "train" if split == "train" else "t10k"
    x = _read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1).astype("float32") / 255.0
    y = _read(f"{prefix}-labels-idx1-ubyte.gz", 8).astype("int32")
    return (x - MEAN) / STD, y
