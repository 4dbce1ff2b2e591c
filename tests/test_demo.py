"""`autoinit-tf demo` end to end on a tiny setting: output structure only (no accuracy thresholds)."""

import re

from click.testing import CliRunner

from cli.demo import command


def _run(*args):
    result = CliRunner().invoke(command, ["--depth", "3", "--width", "8", "--epochs", "2", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_demo_output_structure():
    out = _run()
    # the per-layer table of the wrapped copy
    assert "predicted signal per layer" in out
    for name in ("conv1", "conv2", "conv3", "pool", "classifier"):
        assert re.search(rf"^\d+\s+{name}\s", out, re.M), name
    assert "realized output variance of the last conv layer" in out
    # both training runs with one progress line per epoch
    for name in ("default init", "autoinit"):
        assert f"training {name} (2 epochs" in out
    assert len(re.findall(r"^  epoch [12]/2  loss ", out, re.M)) == 4
    # both learning curves side by side, one row per epoch
    assert re.search(r"^epoch\s+default init\s+autoinit$", out, re.M)
    rows = re.findall(r"^\s+([12])\s+([01]\.\d{3})\s+([01]\.\d{3})$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    # the one-line summary, last, with the best accuracy of each copy
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"summary: best validation accuracy  default init ([01]\.\d{3}) \(epoch ([12])\)  "
                     r"autoinit ([01]\.\d{3}) \(epoch ([12])\)  \[.*3 tanh conv layers, 2 epochs\]", last)
    assert m, last
    assert float(m.group(1)) == max(float(r[1]) for r in rows)
    assert float(m.group(3)) == max(float(r[2]) for r in rows)


def test_demo_calibrate_flag():
    out = _run("--depth", "2", "--epochs", "1", "--calibrate")
    assert "wrap (calibrate=probe):" in out
    assert out.strip().splitlines()[-1].startswith("summary: best validation accuracy")
