"""`autoinit-tf` command line: convert, report, recipes, --help/--version, exit codes, one real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
from click.testing import CliRunner  # noqa: E402

from autoinit_tf_cli.main import cli  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_formats import keras2_fixture_dir  # noqa: E402


@pytest.fixture(scope="session")
def k2(tmp_path_factory):
    return keras2_fixture_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def k3_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="img")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(h), name="small")
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path_factory.mktemp("k3") / "small.keras"
    model.save(path)
    return path


def run(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


def _copy(src, tmp_path):
    dst = tmp_path / os.path.basename(src)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return dst


def test_help_version_recipes():
    r = run(["--help"])
    assert r.exit_code == 0 and "convert" in r.output and "report" in r.output and "recipes" in r.output
    r = run(["--version"])
    assert r.exit_code == 0 and "autoinit-tf" in r.output
    r = run(["convert", "--help"])
    assert r.exit_code == 0 and "--keep-weights-of" in r.output and "--dry-run" in r.output
    r = run(["recipes"])
    assert r.exit_code == 0 and "bn->remove" in r.output
    r = run(["recipes", "--json"])
    assert any(x["name"] == "bn->remove" for x in json.loads(r.stdout))


def test_convert_default_output_summary_and_no_overwrite(k3_file, tmp_path):
    src = _copy(k3_file, tmp_path)
    before = src.read_bytes()
    r = run(["convert", src, "--seed", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "small.autoinit.keras"
    assert out.exists() and src.read_bytes() == before
    for word in ("layers re-initialized: 3", "layers swapped:        0", "layers kept:           0",
                 "fallback rules used:   0", str(out), "time:"):
        assert word in r.stdout
    back = keras.saving.load_model(out)
    assert back.optimizer is not None  # the compiled state came through
    stamp = out.stat().st_mtime_ns
    r = run(["convert", src])
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.output and out.stat().st_mtime_ns == stamp
    r = run(["convert", src, "--overwrite", "-q", "--seed", "2"])
    assert r.exit_code == 0 and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.autoinit.keras", "small.keras"]


def test_usage_errors_exit_2(k3_file, tmp_path):
    out = tmp_path / "o.keras"
    for args in (["convert", k3_file, out, "--calibrate", "data"],
                 ["convert", k3_file, tmp_path / "o.h5"],
                 ["convert", k3_file, out, "--distribution", "cauchy"],
                 ["convert", tmp_path / "missing.keras"],
                 ["convert", k3_file, out, "--input-var", "-1"]):
        r = run(args)
        assert r.exit_code == 2, (args, r.output)
    assert not out.exists()


def test_dry_run_writes_nothing(k3_file, tmp_path):
    r = run(["convert", k3_file, tmp_path / "o.keras", "--dry-run", "--swap", "relu->elu"])
    assert r.exit_code == 0, r.output
    assert "Swap plan" in r.stdout and "pred var" in r.stdout and "nothing written" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_convert_swap_data_calibrate_report_plot(k3_file, tmp_path):
    x = np.random.default_rng(0).normal(0.5, 2.0, size=(64, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "o.keras"
    r = run(["convert", k3_file, out, "--swap", "relu->elu", "--data", tmp_path / "x.npy", "--calibrate", "data",
             "--seed", "0", "--report", tmp_path / "r.json", "--plot", tmp_path / "p.png",
             "--keep-weights-of", "head"])
    assert r.exit_code == 0, r.output
    assert "layers swapped:        2" in r.stdout and "calibrated layers" in r.stdout
    assert "layers kept:           1 (head)" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"] and any(n["name"] == "c1" for n in rep["nodes"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    back = keras.saving.load_model(out)
    assert back.get_layer("c1").get_config()["activation"] == "elu"
    original = keras.saving.load_model(k3_file, compile=False)
    np.testing.assert_array_equal(back.get_layer("head").kernel.numpy(), original.get_layer("head").kernel.numpy())


def test_convert_keras2_saved_model_keep_weights_and_export(k2, tmp_path):
    src = k2 / "bn_sm"
    out = tmp_path / "o.keras"
    r = run(["convert", src, out, "--keep-weights-of", "c*", "--keep-weights-of", "bn",
             "--export-saved-model", tmp_path / "served", "--seed", "0"])
    assert r.exit_code == 0, r.output
    assert "layers kept:           2 (c1, bn)" in r.stdout and "Keras 2 fix-ups" not in r.stdout
    back = keras.saving.load_model(out)
    import tensorflow as tf

    stored = tf.saved_model.load(str(src))
    by_name = {v.name[:-2]: v.numpy() for v in stored.variables}
    np.testing.assert_array_equal(back.get_layer("c1").kernel.numpy(), by_name["c1/kernel"])
    np.testing.assert_array_equal(back.get_layer("bn").moving_mean.numpy(), by_name["bn/moving_mean"])
    assert not np.array_equal(back.get_layer("out").kernel.numpy(), by_name["out/kernel"])
    assert (tmp_path / "served" / "saved_model.pb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.keras", "served"]
    r = run(["convert", src, tmp_path / "o2.keras", "--keep-weights-of", "nope*"])
    assert r.exit_code == 1 and "matched no layer" in r.stderr


def test_convert_errors_exit_1_nothing_written(k3_file, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(k3_file.read_bytes()[:200])
    r = run(["convert", bad])
    assert r.exit_code == 1 and "truncated or corrupted" in r.stderr and "Traceback" not in r.output
    r = run(["-v", "convert", bad])
    assert r.exit_code == 1 and "Traceback" in r.stderr
    (tmp_path / "notsm").mkdir()
    r = run(["convert", tmp_path / "notsm", tmp_path / "o.keras"])
    assert r.exit_code == 1 and "not a SavedModel" in r.stderr
    r = run(["convert", k3_file, tmp_path / "missing" / "o.keras"])
    assert r.exit_code == 1 and "does not exist" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras", "notsm"]


def test_convert_custom_objects(tmp_path, monkeypatch):
    from test_formats import _custom_layer_json

    path = _custom_layer_json(tmp_path)
    r = run(["convert", path, tmp_path / "o.keras"])
    assert r.exit_code == 1 and "MyScale" in r.stderr and "--custom-objects" in r.stderr
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "cli_layers_mod.py").write_text(
        "import keras\n\n"
        "@keras.saving.register_keras_serializable(package='cli_test')\n"
        "class MyScale(keras.layers.Layer):\n"
        "    def __init__(self, factor=1.0, **kw):\n"
        "        super().__init__(**kw)\n"
        "        self.factor = factor\n"
        "    def call(self, x):\n"
        "        return x * self.factor\n"
        "    def get_config(self):\n"
        "        return {**super().get_config(), 'factor': self.factor}\n")
    monkeypatch.syspath_prepend(str(mods))
    r = run(["convert", path, tmp_path / "o.keras", "--custom-objects", "cli_layers_mod"])
    assert r.exit_code == 0, r.output
    # MyScale's call (x * factor) is traced: no fallback, and --strict accepts it.
    assert "fallback rules used:   0" in r.stdout
    r = run(["convert", path, tmp_path / "o2.keras", "--custom-objects", "cli_layers_mod", "--strict"])
    assert r.exit_code == 0 and (tmp_path / "o2.keras").exists()


def test_report_command(k2, tmp_path):
    r = run(["report", k2 / "seq.h5", "--json", tmp_path / "r.json"])
    assert r.exit_code == 0, r.output
    assert "meas var" in r.stdout and "stored weights" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["nodes"][0]["measured"] is not None
    r = run(["report", k2 / "seq.h5", "--json", tmp_path / "r.json"])
    assert r.exit_code == 1 and "already exists" in r.stderr


def test_installed_script_subprocess(k3_file, tmp_path):
    exe = shutil.which("autoinit-tf")
    if exe is None:
        pytest.skip("the autoinit-tf script is not installed (pip install -e .)")
    out = tmp_path / "o.keras"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([exe, "convert", str(k3_file), str(out), "--seed", "0"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layers re-initialized" in proc.stdout and out.exists()
    # (the error path of the same command is covered through CliRunner above: one subprocess keeps time down)


def test_unstable_signal_warning_is_one_line_with_the_command_line_remedy(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = inp
    for _ in range(30):  # 30 GELU layers: deviations grow ~57x (autoinit_tf.stability)
        h = keras.layers.Dense(16, activation="gelu")(h)
    path = tmp_path / "gelu.keras"
    keras.Model(inp, keras.layers.Dense(2)(h)).save(path)
    res = run(["convert", path, tmp_path / "auto.keras"])  # the default (auto) calibrates: nothing to say
    assert res.exit_code == 0 and "unstable" not in res.stderr, res.output
    assert "not exact analytically: 31 layers" in res.stdout
    res = run(["convert", path, tmp_path / "plain.keras", "--calibrate", "none"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if "unstable" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "--calibrate probe" in lines[0]
    res = run(["convert", path, tmp_path / "calibrated.keras", "--calibrate", "probe"])
    assert res.exit_code == 0 and "unstable" not in res.stderr  # the remedy is applied: nothing to say
    res = run(["report", path, "-q"])
    assert res.exit_code == 0 and any(ln.startswith("warning: The predicted signal is unstable")
                                      for ln in res.stderr.splitlines())


def test_the_summary_counts_the_weights_left_as_they_were(tmp_path):
    inp = keras.Input((8,))
    frozen = keras.layers.Dense(8, name="frozen")
    h = frozen(inp)
    frozen.trainable = False
    path = tmp_path / "frozen.keras"
    keras.Model(inp, keras.layers.Dense(2, name="head")(h)).save(path)
    res = run(["convert", path, tmp_path / "out.keras", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert "left as they were:     1 weight tensors" in res.stdout
