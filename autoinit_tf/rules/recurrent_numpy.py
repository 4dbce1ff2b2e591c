"""A NumPy forward pass of Keras' standard recurrent layers (SimpleRNN, LSTM, GRU, Bidirectional).

The recurrent rules estimate a layer's output moments by running it on probe sequences with the weights
the pass is about to assign. Through Keras that costs one eager call per time step (0.15 s for a 64-step
LSTM on 8 sequences, more than building the model); here the whole batch of sequences advances one step
per matrix product, so hundreds of sequences cost a few milliseconds, and the estimate's own standard
error becomes small. The recurrences, for input x_t, state h, weights W (kernel), U (recurrent kernel), b:

- SimpleRNN: h_t = act(x_t W + b + h_{t-1} U)
- LSTM: [z_i z_f z_c z_o] = x_t W + h_{t-1} U + b; c_t = rec(z_f) c_{t-1} + rec(z_i) act(z_c);
  h_t = rec(z_o) act(c_t)
- GRU, reset after the product (Keras' default): [x_z x_r x_h] = x_t W + b_in,
  [u_z u_r u_h] = h_{t-1} U + b_rec; z = rec(x_z + u_z), r = rec(x_r + u_r),
  h~ = act(x_h + r u_h); h_t = z h_{t-1} + (1 - z) h~.
  Reset before: h~ = act(x_h + (r h_{t-1}) U_h)

with act / rec the cell's activation / recurrent activation, zero initial states, and Keras' output
conventions (the last output or the whole sequence, in processing order; ``go_backwards`` processes the
reversed sequence; ``return_state`` appends the final states). Layers this pass does not reproduce exactly
(dropout in training, a stateful layer, a custom cell or activation) are named by `unsupported`, and the
caller runs Keras instead.
"""

from __future__ import annotations

import keras
import numpy as np


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # = 1 / (1 + exp(-x)), without overflow


def _hard_sigmoid(x):
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)  # Keras 3: relu6(x + 3) / 6


def _relu(x):
    return np.maximum(x, 0.0)


def _linear(x):
    return x


_ACTIVATIONS = {
    keras.activations.tanh: np.tanh,
    keras.activations.sigmoid: _sigmoid,
    keras.activations.hard_sigmoid: _hard_sigmoid,
    keras.activations.relu: _relu,
    keras.activations.linear: _linear,
}

_CELLS = {keras.layers.SimpleRNNCell: 1, keras.layers.LSTMCell: 4, keras.layers.GRUCell: 3}


def _activation(fn):
    return _linear if fn is None else _ACTIVATIONS.get(fn)


def unsupported(layer) -> str | None:
    """Why `layer` is not reproduced by `run` (None when it is)."""
    if isinstance(layer, keras.layers.Bidirectional):
        if getattr(layer, "return_state", False):
            return "a Bidirectional layer returning its states"
        if layer.merge_mode not in ("concat", "sum", "ave", "mul"):
            return f"merge_mode={layer.merge_mode!r}"
        return unsupported(layer.forward_layer) or unsupported(layer.backward_layer)
    cell = getattr(layer, "cell", None)
    if type(cell) not in _CELLS:
        return f"cell {type(cell).__name__}"
    if getattr(layer, "stateful", False):
        return "a stateful layer (its state carries over between batches)"
    if float(getattr(cell, "dropout", 0.0) or 0.0) > 0 or float(getattr(cell, "recurrent_dropout", 0.0) or 0.0) > 0:
        return "dropout in training"
    for name in ("activation", "recurrent_activation"):
        if hasattr(cell, name) and _activation(getattr(cell, name)) is None:
            return f"{name} {getattr(getattr(cell, name), '__name__', getattr(cell, name))!r}"
    return None


def run(layer, x: np.ndarray, value) -> list[np.ndarray]:
    """The outputs of `layer` on the sequences `x` (batch, time, features), weights read by `value(variable)`
    (a NumPy array: the value the pass will assign). A list, like Keras' flattened outputs."""
    if isinstance(layer, keras.layers.Bidirectional):
        y = run(layer.forward_layer, x, value)[0]
        y_rev = run(layer.backward_layer, x, value)[0]
        if layer.return_sequences:
            y_rev = y_rev[:, ::-1]
        merge = layer.merge_mode
        if merge == "concat":
            return [np.concatenate([y, y_rev], axis=-1)]
        if merge == "sum":
            return [y + y_rev]
        if merge == "ave":
            return [(y + y_rev) / 2.0]
        return [y * y_rev]
    cell = layer.cell
    x = np.asarray(x, dtype=np.float32)
    if layer.go_backwards:
        x = x[:, ::-1]
    step = {keras.layers.SimpleRNNCell: _simple_rnn, keras.layers.LSTMCell: _lstm,
            keras.layers.GRUCell: _gru}[type(cell)]
    outputs, states = step(cell, x, value)
    y = np.stack(outputs, axis=1) if layer.return_sequences else outputs[-1]
    return [y] + (list(states) if getattr(layer, "return_state", False) else [])


def _weights(cell, value):
    w = np.asarray(value(cell.kernel), dtype=np.float32)
    u = np.asarray(value(cell.recurrent_kernel), dtype=np.float32)
    b = np.asarray(value(cell.bias), dtype=np.float32) if getattr(cell, "bias", None) is not None else None
    return w, u, b


def _simple_rnn(cell, x, value):
    w, u, b = _weights(cell, value)
    act = _activation(cell.activation)
    xw = x @ w + (b if b is not None else 0.0)  # (batch, time, units): the input part of every step at once
    h = np.zeros((x.shape[0], u.shape[0]), np.float32)
    outputs = []
    for t in range(x.shape[1]):
        h = act(xw[:, t] + h @ u).astype(np.float32, copy=False)
        outputs.append(h)
    return outputs, [h]


def _lstm(cell, x, value):
    w, u, b = _weights(cell, value)
    act, rec = _activation(cell.activation), _activation(cell.recurrent_activation)
    n = u.shape[0]
    h = np.zeros((x.shape[0], n), np.float32)
    c = np.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
        z = x[:, t] @ w + h @ u
        if b is not None:
            z += b
        i, f, g, o = rec(z[:, :n]), rec(z[:, n:2 * n]), act(z[:, 2 * n:3 * n]), rec(z[:, 3 * n:])
        c = (f * c + i * g).astype(np.float32, copy=False)
        h = (o * act(c)).astype(np.float32, copy=False)
        outputs.append(h)
    return outputs, [h, c]


def _gru(cell, x, value):
    w, u, b = _weights(cell, value)
    act, rec = _activation(cell.activation), _activation(cell.recurrent_activation)
    n = u.shape[0]
    after = bool(cell.reset_after)
    if b is None:
        b_in = b_rec = np.zeros(3 * n, np.float32)
    elif after:
        b_in, b_rec = b[0], b[1]
    else:
        b_in, b_rec = b, np.zeros(3 * n, np.float32)
    h = np.zeros((x.shape[0], n), np.float32)
    outputs = []
    for t in range(x.shape[1]):
        xz = x[:, t] @ w + b_in
        if after:
            inner = h @ u + b_rec
            z = rec(xz[:, :n] + inner[:, :n])
            r = rec(xz[:, n:2 * n] + inner[:, n:2 * n])
            hh = act(xz[:, 2 * n:] + r * inner[:, 2 * n:])
        else:
            inner = h @ u[:, :2 * n]
            z = rec(xz[:, :n] + inner[:, :n])
            r = rec(xz[:, n:2 * n] + inner[:, n:2 * n])
            hh = act(xz[:, 2 * n:] + (r * h) @ u[:, 2 * n:])
        h = (z * h + (1.0 - z) * hh).astype(np.float32, copy=False)
        outputs.append(h)
    return outputs, [h]
