"""Model formats: detection, Keras-2 SavedModel/.h5/JSON fix-ups, Keras-3 round trips, error cases.

Keras-2 fixtures are written once per session by tf_keras in a subprocess (TF_USE_LEGACY_KERAS=1).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from autoinit_tf import formats  # noqa: E402

K2_MODELS = ("seq", "nested", "bn", "tfop")

K2_WRITER = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    import tf_keras as k

    out = sys.argv[1]
    k.utils.set_random_seed(0)

    def seq():
        return k.Sequential([k.Input((16,)), k.layers.Dense(32, activation="relu", name="d1"),
                             k.layers.Dense(3, name="d2")], name="seq")

    def nested():  # a nested Sequential called twice
        inner = k.Sequential([k.Input((16,)), k.layers.Dense(16, activation="tanh", name="in_d")], name="inner")
        inp = k.Input((16,), name="x")
        h = inner(inner(inp))
        return k.Model(inp, k.layers.Dense(2, name="out")(h), name="nested")

    def bn():
        inp = k.Input((8, 8, 3), name="img")
        h = k.layers.Conv2D(16, 3, padding="same", name="c1")(inp)
        h = k.layers.BatchNormalization(name="bn")(h)
        h = k.layers.Activation("relu", name="act")(h)
        h = k.layers.GlobalAveragePooling2D(name="gap")(h)
        return k.Model(inp, k.layers.Dense(2, name="out")(h), name="bnnet")

    def tfop():  # a tf.nn op: a TFOpLambda layer in Keras 2
        inp = k.Input((16,), name="x")
        h = tf.nn.relu(k.layers.Dense(32, name="d1")(inp))
        return k.Model(inp, k.layers.Dense(2, name="d2")(h), name="tfop")

    for name, build in [("seq", seq), ("nested", nested), ("bn", bn), ("tfop", tfop)]:
        m = build()
        x = np.random.default_rng(0).normal(size=(4,) + tuple(m.input_shape[1:])).astype("float32")
        if name == "bn":  # non-trivial moving statistics
            m.compile("sgd", "mse")
            m.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0)
        m.save(os.path.join(out, name + "_sm"), save_format="tf")
        m.save(os.path.join(out, name + ".h5"), save_format="h5")
        with open(os.path.join(out, name + ".json"), "w") as f:
            f.write(m.to_json())
        np.save(os.path.join(out, name + "_x.npy"), x)
        np.save(os.path.join(out, name + "_y.npy"), m.predict(x, verbose=0))
    open(os.path.join(out, "DONE"), "w").close()
    """
)


def keras2_fixture_dir(tmp_path_factory):
    """Write the Keras-2 fixtures once per session (shared by the test modules) and return their dir."""
    pytest.importorskip("tf_keras")
    base = tmp_path_factory.getbasetemp() / "keras2_fixtures"
    if (base / "DONE").exists():
        return base
    base.mkdir(exist_ok=True)
    script = base.parent / "keras2_writer.py"
    script.write_text(K2_WRITER)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), str(base)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and (base / "DONE").exists(), proc.stderr[-3000:]
    return base


@pytest.fixture(scope="session")
def k2(tmp_path_factory):
    return keras2_fixture_dir(tmp_path_factory)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _train_two_steps(model, x, seed=0):
    y = np.random.default_rng(seed).normal(size=(len(x),) + tuple(model.output_shape[1:])).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    hist = model.fit(x, y, batch_size=max(1, len(x) // 2), epochs=1, steps_per_epoch=2, verbose=0)
    assert all(math.isfinite(v) for v in hist.history["loss"])
    after = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "training changed nothing"


def _assert_signal_matches(model, report, tol=0.5):
    """The model's measured per-layer variance matches the conversion's analysed prediction."""
    from autoinit_tf.measure import measure

    measured = {r.name: r for r in measure(model, batch_size=512, seed=0)}
    checked = 0
    for row in report.rows:
        got = measured.get(row.name)
        if got is None or not row.outputs or not got.outputs:
            continue
        p, m = row.outputs[0].var, got.outputs[0].var
        if not (p > 1e-4 and m > 0):
            continue
        assert abs(math.log(p / m)) < tol, (row.name, p, m)
        checked += 1
    assert checked >= 2


def _convert(loaded, out_path, seed=3):
    import autoinit_tf

    model, report = autoinit_tf.wrap(loaded.model, seed=seed, return_report=True)
    formats.save_keras(model, out_path)
    return model, report


# -- Keras 2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", K2_MODELS)
@pytest.mark.parametrize("kind", ["saved_model", "h5"])
def test_keras2_converts_exactly(k2, tmp_path, name, kind):
    path = k2 / (f"{name}_sm" if kind == "saved_model" else f"{name}.h5")
    assert formats.detect_format(path) == kind
    loaded = formats.load(path)
    assert loaded.keras2 and loaded.format == kind
    # The rebuilt architecture with the stored weights reproduces Keras 2's predictions.
    x, y = np.load(k2 / f"{name}_x.npy"), np.load(k2 / f"{name}_y.npy")
    assert loaded.apply_stored_weights()
    np.testing.assert_allclose(_np(loaded.model.predict(x, verbose=0)), y, rtol=1e-5, atol=1e-5)
    if name == "nested":
        assert any("nested" in f for f in loaded.fixups)
    if name == "tfop":
        assert any("TFOpLambda" in f for f in loaded.fixups)

    out = tmp_path / "out.keras"
    _, report = _convert(loaded, out)
    back = keras.saving.load_model(out)
    _assert_signal_matches(back, report)
    _train_two_steps(back, np.random.default_rng(1).normal(size=(8,) + x.shape[1:]).astype("float32"))
    # The input is untouched and no temporary file is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"]


@pytest.mark.parametrize("name", ["nested", "bn"])
def test_keras2_json(k2, name):
    loaded = formats.load(k2 / f"{name}.json")
    assert loaded.keras2 and loaded.format == "json" and not loaded.has_weights
    assert any("module" in f for f in loaded.fixups)
    assert [ly.name for ly in loaded.model.layers][-1] == "out"
    with pytest.raises(formats.ConversionError, match="no weights"):
        loaded.stored_weights()


def test_keras_metadata_is_parsed_with_protobuf(k2):
    cfg = formats.read_keras_metadata(k2 / "nested_sm")
    assert cfg["class_name"] == "Functional" and cfg["config"]["name"] == "nested"
    # tuples were decoded
    inp = cfg["config"]["layers"][0]["config"]
    assert inp["batch_input_shape"] == [None, 16]
    # the message class comes from the protobuf library
    from google.protobuf.message import Message

    assert issubclass(formats._saved_metadata_class(), Message)


def test_corrupted_keras_metadata(k2, tmp_path):
    import shutil

    d = tmp_path / "sm"
    shutil.copytree(k2 / "seq_sm", d)
    (d / "keras_metadata.pb").write_bytes((d / "keras_metadata.pb").read_bytes()[:57])
    with pytest.raises(formats.ConversionError, match="corrupted|truncated|no root"):
        formats.load(d)


def test_keep_weights_from_saved_model(k2):
    loaded = formats.load(k2 / "bn_sm")
    stored = loaded.stored_weights()
    assert set(stored) == {"c1", "bn", "out"}
    # BN's moving statistics come back too (4 variables)
    assert len(stored["bn"]) == 4


# -- Keras 3 -----------------------------------------------------------------------------------------


def _k3_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(16, activation="tanh", name="d2")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h), name="k3")


@pytest.mark.parametrize("kind", ["keras", "h5", "json"])
def test_keras3_round_trip(tmp_path, kind):
    m = _k3_model()
    src = tmp_path / f"in.{kind}"
    if kind == "json":
        src.write_text(m.to_json())
    else:
        m.save(src)
    before = src.read_bytes()
    assert formats.detect_format(src) == kind
    loaded = formats.load(src)
    assert not loaded.keras2
    assert loaded.has_weights == (kind != "json")
    out = tmp_path / "out.keras"
    _, report = _convert(loaded, out)
    assert src.read_bytes() == before  # input never modified
    back = keras.saving.load_model(out)
    _assert_signal_matches(back, report)
    _train_two_steps(back, np.random.default_rng(1).normal(size=(16, 6)).astype("float32"))


def test_keras3_exported_saved_model_is_refused(tmp_path):
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    m.export(str(tmp_path / "exp"), verbose=False)
    with pytest.raises(formats.ConversionError) as err:
        formats.load(tmp_path / "exp")
    msg = str(err.value)
    assert "keras_metadata.pb" in msg and ".keras" in msg and "export" in msg


# -- errors --------------------------------------------------------------------------------------------


def test_directory_not_saved_model(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hi")
    with pytest.raises(formats.ConversionError, match="not a SavedModel"):
        formats.load(tmp_path / "d")


def test_truncated_files(tmp_path):
    m = _k3_model()
    m.save(tmp_path / "m.keras")
    m.save(tmp_path / "m.h5")
    for name in ("m.keras", "m.h5"):
        data = (tmp_path / name).read_bytes()
        bad = tmp_path / f"bad_{name}"
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(formats.ConversionError, match="truncated|corrupted"):
            formats.load(bad)
    (tmp_path / "empty.keras").write_bytes(b"")
    with pytest.raises(formats.ConversionError, match="empty, truncated or corrupted"):
        formats.load(tmp_path / "empty.keras")
    (tmp_path / "bad.json").write_text('{"class_name": "Functional", "config": {"layers": [')
    with pytest.raises(formats.ConversionError, match="not valid JSON"):
        formats.load(tmp_path / "bad.json")


def _custom_layer_json(tmp_path):
    cfg = json.loads(_k3_model().to_json())
    layers = cfg["config"]["layers"]
    d2 = next(ly for ly in layers if ly["name"] == "d2")
    d2.update(class_name="MyScale", module="my_layers_mod", registered_name="MyScale",
              config={"name": "d2", "trainable": True, "dtype": "float32", "factor": 2.0})
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(cfg))
    return path


def test_unknown_custom_layer_message_and_custom_objects(tmp_path, monkeypatch):
    path = _custom_layer_json(tmp_path)
    with pytest.raises(formats.ConversionError) as err:
        formats.load(path)
    assert "MyScale" in str(err.value) and "--custom-objects" in str(err.value) and "'d2'" in str(err.value)

    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "my_layers_mod.py").write_text(textwrap.dedent(
        """
        import keras

        class MyScale(keras.layers.Layer):
            def __init__(self, factor=1.0, **kw):
                super().__init__(**kw)
                self.factor = factor

            def call(self, x):
                return x * self.factor

            def get_config(self):
                return {**super().get_config(), "factor": self.factor}
        """))
    monkeypatch.syspath_prepend(str(mod_dir))
    objs = formats.load_custom_objects(["my_layers_mod"])
    loaded = formats.load(path, custom_objects=objs)
    assert type(loaded.model.get_layer("d2")).__name__ == "MyScale"
    with pytest.raises(formats.ConversionError, match="cannot import module"):
        formats.load_custom_objects(["no_such_module_xyz"])


def test_lambda_refused_unless_allowed(tmp_path):
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda t: t * 2.0, name="twice")(keras.layers.Dense(4, name="d")(inp))
    path = tmp_path / "lam.json"
    path.write_text(keras.Model(inp, out).to_json())
    with pytest.raises(formats.ConversionError, match="--allow-lambda") as err:
        formats.load(path)
    assert "'twice'" in str(err.value)
    loaded = formats.load(path, allow_lambda=True)
    assert loaded.lambdas == ["twice"]


def test_save_never_overwrites_and_leaves_nothing(tmp_path, monkeypatch):
    m = _k3_model()
    target = tmp_path / "out.keras"
    target.write_text("precious")
    with pytest.raises(formats.ConversionError, match="already exists.*--overwrite"):
        formats.save_keras(m, target)
    assert target.read_text() == "precious"
    # A failure while writing leaves neither a temp file nor a changed target.
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(m), "save", boom)
    with pytest.raises(formats.ConversionError, match="disk full"):
        formats.save_keras(m, target, overwrite=True)
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"]
    monkeypatch.undo()
    formats.save_keras(m, target, overwrite=True)
    assert zipfile.is_zipfile(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"]


def test_unwritable_output(tmp_path):
    m = _k3_model()
    if os.geteuid() == 0:
        target = "/sys/autoinit-test.keras"  # not writable even for root
    else:  # pragma: no cover - depends on the user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = str(ro / "m.keras")
    with pytest.raises(formats.ConversionError, match="not writable"):
        formats.save_keras(m, target)
    with pytest.raises(formats.ConversionError, match="does not exist"):
        formats.save_keras(m, tmp_path / "missing_dir" / "m.keras")
    assert not os.path.exists(target)


def test_tfoplambda_standin(tmp_path):
    """A TFOpLambda without an activation equivalent runs through the registered stand-in and saves."""
    from autoinit_tf.formats_tf import TFOpLambda

    cfg = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "InputLayer", "name": "x",
                 "config": {"batch_input_shape": [None, 3], "dtype": "float32", "name": "x"},
                 "inbound_nodes": []},
                {"class_name": "TFOpLambda", "name": "tf.math.multiply",
                 "config": {"name": "tf.math.multiply", "trainable": True, "dtype": "float32",
                            "function": "math.multiply"},
                 "inbound_nodes": [["x", 0, 0, {"y": 3.0, "name": None}]]},
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [["tf.math.multiply", 0, 0]],
        },
        "keras_version": "2.15.0",
    }
    path = tmp_path / "op.json"
    path.write_text(json.dumps(cfg))
    model = formats.load(path).model
    assert isinstance(model.get_layer("tf.math.multiply"), TFOpLambda)
    np.testing.assert_allclose(_np(model(np.ones((2, 3), "float32"))), 3.0)
    model.save(tmp_path / "op.keras")
    back = keras.saving.load_model(tmp_path / "op.keras")
    np.testing.assert_allclose(_np(back(np.ones((2, 3), "float32"))), 3.0)
