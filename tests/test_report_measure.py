"""SignalReport: predicted vs measured columns, colour, JSON, PNG plot."""

import json

import keras
import numpy as np
import pytest

import autoinit_tf
from autoinit_tf import compare
from autoinit_tf.measure import measure
from autoinit_tf.report import supports_color


def _model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="d1")(inp)
    h = keras.layers.Dense(32, name="d2")(h)
    return keras.Model(inp, keras.layers.Dense(4, name="d3")(keras.layers.Activation("tanh", name="act")(h)))


@pytest.mark.core
def test_table_json_and_colour(monkeypatch):
    model = _model()
    autoinit_tf.wrap(model, seed=0)
    rep = compare(model, seed=0)
    text = rep.table(color=False)
    head = text.splitlines()[0]
    for col in ("pred var", "meas var", "|log ratio|"):
        assert col in head
    assert "\x1b[" not in text and len(text.splitlines()) == 2 + len(rep)
    coloured = rep.table(color=True)
    assert "\x1b[32m" in coloured or "\x1b[33m" in coloured or "\x1b[31m" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    assert not supports_color() and "\x1b[" not in rep.table()
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert supports_color()
    data = json.loads(rep.to_json())
    node = data["nodes"][0]
    assert node["measured"][0]["var"] > 0 and node["preactivation"]["var"] > 0 and node["channel"][0]["var"] > 0
    mtext = measure(model).table(color=False)
    assert "ch mean^2" in mtext.splitlines()[0]


@pytest.mark.core
def test_with_measurement_rejects_predicted():
    model = _model()
    rep = autoinit_tf.analyze(model)
    with pytest.raises(ValueError):
        rep.with_measurement(rep)


@pytest.mark.core
def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = _model()
    default = measure(model)
    autoinit_tf.wrap(model, seed=0)
    rep = compare(model, seed=0)
    for i, (r, kw) in enumerate([(rep, {"default_init": default}), (measure(model), {}),
                                 (autoinit_tf.analyze(model), {})]):
        path = tmp_path / f"signal{i}.png"
        assert r.plot(path, **kw) == path
        raw = path.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 2000
        import matplotlib.image

        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plot_clear_error_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    rep = autoinit_tf.analyze(_model())
    with pytest.raises(ImportError, match=r"autoinit-tf\[plot\]"):
        rep.plot(tmp_path / "x.png")
