"""`SignalReport`: what a pass predicted (and, when measured, observed) at every node."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from dataclasses import dataclass, field

from autoinit_tf.moments import Moments


@dataclass
class NodeRow:
    """One call of one layer or op.

    Attributes:
        name: the layer/op name, prefixed by enclosing model names (``block/dense``); a layer
            called several times gets ``#k`` for its k-th call (k >= 1).
        type: the class name.
        inputs, outputs: lists of predicted `Moments`.
        weight_scale: the variance chosen for the main weight tensor, if the rule set one.
        rule: the name of the rule used (``fallback`` when the empirical fallback ran).
        notes: free text (fallback used, frozen weights kept, ...).
        measured: list of measured `Moments` per output, beside the predicted ones (filled by
            `compare`/`with_measurement` and by calibration). In a report of `measure` itself
            (``source == "measured"``) the measured values are the `outputs`.
        weighted: the pass (re)initialized or can calibrate this layer's weights.
        channel: per output, the Signal Propagation Plot quantities measured on the batch:
            ``{"mean_sq": average squared channel mean, "var": average channel variance}``
            (channels = last axis).
        preactivation: measured moments before a fused activation (``Dense(..., activation=...)``).
        target: the variance this node's output is aimed at where it is not the pass's signal variance
            (a position table added to a projection's output is a per-position bias of it, drawn at
            ``provenance.POSITION_BIAS_STD``^2 of the signal's); None: the signal variance. Calibration
            aims at it too.
    """

    name: str
    type: str
    inputs: list
    outputs: list
    weight_scale: float | None = None
    rule: str = ""
    notes: list = field(default_factory=list)
    measured: list | None = None
    weighted: bool = False
    channel: list | None = None
    preactivation: Moments | None = None
    target: float | None = None

    def to_dict(self) -> dict:
        def mm(ms):
            return None if ms is None else [{"mean": m.mean, "var": m.var} for m in ms]

        return {
            "name": self.name,
            "type": self.type,
            "inputs": mm(self.inputs),
            "outputs": mm(self.outputs),
            "measured": mm(self.measured),
            "weight_scale": self.weight_scale,
            "weighted": self.weighted,
            "channel": None if self.channel is None else [dict(c) for c in self.channel],
            "preactivation": None if self.preactivation is None else {
                "mean": self.preactivation.mean, "var": self.preactivation.var},
            "rule": self.rule,
            "target": self.target,
            "notes": list(self.notes),
        }


class SignalReport:
    """Per-node signal statistics of one pass over a model, in topological order.

    Attributes:
        model_name: the model's name.
        rows: one `NodeRow` per call of each layer or op.
        assigned: variable paths this pass (re)initialized.
        source: ``"predicted"`` (the analytic pass; measured values, when present, are in
            ``row.measured``) or ``"measured"`` (a report of `autoinit_tf.measure`: ``row.outputs`` are
            measured).
        calibration: ``{row name: kernel scale factor}`` applied by calibration (empty if none ran); for a
            recurrent layer a tuple of scales, one per gate (and direction) of its input kernel.
        calibration_error: ``{row name: relative standard error}`` of the variance each calibrated layer
            was fitted to (the calibration batch's own sampling error: a fresh batch of the same
            distribution lands within about +-2 of these of the target).
        calibration_batch: the number of examples calibration used (None if none ran).
        auto_calibrated: ``{row name: reason}``: the weighted layers ``wrap(calibrate="auto")`` calibrated
            because the analytic pass knew their prediction was not exact (empty: none, or not auto).
        amplification: ``(factor, node name)``: the largest factor by which the analytic pass's signal
            amplifies a relative deviation of the variance along any path (the product of the activations'
            variance elasticities, see `autoinit_tf.stability`), and where. Above
            `stability.AMPLIFICATION_LIMIT` the prediction of one drawn network is unreliable.
    """

    def __init__(self, model_name: str, rows: list, assigned: list | None = None, source: str = "predicted"):
        self.model_name = model_name
        self.rows = rows
        self.assigned = list(assigned or [])  # variable paths this pass (re)initialized
        self.source = source
        self.calibration: dict = {}
        self.calibration_error: dict = {}
        self.calibration_batch: int | None = None
        self.amplification: tuple = (1.0, None)
        self.calibrated_on: str | None = None
        self.auto_calibrated: dict = {}
        # wrap: {weight path: reason} for the trainable weights of 2+ dimensions it left as they were
        self.untouched: dict = {}

    def __len__(self):
        return len(self.rows)

    def targets(self) -> dict:
        """``{row name: target variance}`` of the rows aimed elsewhere than the signal variance
        (`NodeRow.target`: a position table drawn as a per-position bias), for calibration."""
        return {r.name: r.target for r in self.rows if r.target is not None}

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, name_or_index):
        if isinstance(name_or_index, int):
            return self.rows[name_or_index]
        for r in self.rows:
            if r.name == name_or_index:
                return r
        raise KeyError(f"No node named {name_or_index!r} in the report of '{self.model_name}'.")

    @property
    def fallbacks(self) -> list:
        """Rows for which the empirical fallback rule was used."""
        return [r for r in self.rows if r.rule == "fallback"]

    @property
    def output(self) -> Moments:
        """Moments of the last node's first output (predicted, or measured for a measured report)."""
        return self.rows[-1].outputs[0]

    @property
    def has_measurement(self) -> bool:
        return self.source == "measured" or any(r.measured for r in self.rows)

    def measured_moments(self, row) -> Moments | None:
        """The measured moments of `row`'s first output, or None."""
        if self.source == "measured":
            return row.outputs[0] if row.outputs else None
        return row.measured[0] if row.measured else None

    def with_measurement(self, measured: "SignalReport") -> "SignalReport":
        """A copy of this (predicted) report with the outputs of `measured` (a report of
        `autoinit_tf.measure` on the same model) beside the predictions, matched by row name."""
        if measured.source != "measured":
            raise ValueError("with_measurement expects a report of autoinit_tf.measure (source='measured').")
        out = copy.copy(self)
        out.rows = [copy.copy(r) for r in self.rows]
        out.calibration = dict(self.calibration)
        out.calibration_error = dict(self.calibration_error)
        by_name = {r.name: r for r in measured.rows}
        for r in out.rows:
            r.notes = list(r.notes)
            got = by_name.get(r.name)
            if got is None:
                r.measured = None
                continue
            r.measured = list(got.outputs)
            r.channel = got.channel
            r.preactivation = got.preactivation
        return out

    def log_errors(self, weighted_only: bool = False) -> list:
        """Per row with both values: ``(name, |log(predicted var / measured var)|)`` (first output)."""
        out = []
        for r in self.rows:
            if weighted_only and not r.weighted:
                continue
            if not r.outputs or not r.measured:
                continue
            p, m = r.outputs[0].var, r.measured[0].var
            if p > 0 and m > 0 and math.isfinite(p) and math.isfinite(m):
                out.append((r.name, abs(math.log(p / m))))
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "source": self.source,
            "assigned": self.assigned,
            "calibration": dict(self.calibration),
            "calibration_error": dict(self.calibration_error),
            "calibration_batch": self.calibration_batch,
            "auto_calibrated": dict(self.auto_calibrated),
            "untouched": dict(self.untouched),
            "amplification": {"factor": self.amplification[0], "node": self.amplification[1]},
            "nodes": [r.to_dict() for r in self.rows],
        }

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            from autoinit_tf.io_utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    def table(self, color: bool | None = None) -> str:
        """An aligned plain-text table (one line per node).

        Args:
            color: colour rows by |log(predicted var / measured var)| (green < 0.1, yellow < 0.5,
                red otherwise) when both are present. None: only when standard output is a terminal
                that supports colour (``NO_COLOR`` unset, ``TERM`` not ``dumb``; ``FORCE_COLOR`` forces).
        """
        if color is None:
            color = supports_color()
        measured_only = self.source == "measured"
        has_measured = not measured_only and any(r.measured for r in self.rows)
        if measured_only:
            head = ["#", "node", "type", "in mean", "in var", "meas mean", "meas var", "ch mean^2", "ch var"]
        else:
            head = ["#", "node", "type", "in mean", "in var", "pred mean", "pred var"]
            if has_measured:
                head += ["meas mean", "meas var", "|log ratio|"]
        head += ["w var", "notes"]
        lines = []
        errs = []
        for i, r in enumerate(self.rows):
            ins = r.inputs[0] if r.inputs else None
            out = r.outputs[0] if r.outputs else None
            cells = [str(i), r.name, r.type, _f(ins and ins.mean), _f(ins and ins.var), _f(out and out.mean),
                     _f(out and out.var)]
            err = None
            if measured_only:
                ch = r.channel[0] if r.channel else None
                cells += [_f(ch and ch["mean_sq"]), _f(ch and ch["var"])]
            elif has_measured:
                meas = r.measured[0] if r.measured else None
                if meas is not None and out is not None and out.var > 0 and meas.var > 0:
                    err = abs(math.log(meas.var / out.var)) if math.isfinite(meas.var / out.var) else None
                cells += [_f(meas and meas.mean), _f(meas and meas.var), _f(err)]
            cells += [_f(r.weight_scale), "; ".join(r.notes)]
            lines.append(cells)
            errs.append(err)
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
        out = [_row(head, widths), _row(["-" * w for w in widths], widths)]
        for cells, err in zip(lines, errs):
            text = _row(cells, widths)
            if color and err is not None:
                text = _colorize(text, err)
            out.append(text)
        return "\n".join(out)

    def plot(self, path, default_init: "SignalReport | None" = None, title: str | None = None):
        """Write a PNG: per node in topological order, the variance (log scale) and the mean.

        Draws the predicted values, the measured ones when present (``source == "measured"`` or
        `compare`/`with_measurement`), and optionally ``default_init``: a report of
        `autoinit_tf.measure` on the same architecture with its default initialization. Needs
        matplotlib (``pip install autoinit-tf[plot]``); uses the Agg canvas, no display. Returns `path`.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SignalReport.plot needs matplotlib. Install it with: pip install 'autoinit-tf[plot]' "
                "(or pip install matplotlib)."
            ) from exc
        names = [r.name for r in self.rows]
        xs = list(range(len(self.rows)))

        def series(rows, pick):
            return [_nan_if_none(pick(r)) for r in rows]

        fig = Figure(figsize=(max(6.0, min(0.12 * len(xs) + 4.0, 24.0)), 6.5))
        FigureCanvasAgg(fig)
        ax_v, ax_m = fig.subplots(2, 1, sharex=True)
        if self.source == "measured":
            ax_v.plot(xs, series(self.rows, lambda r: r.outputs[0].var if r.outputs else None), "o-", ms=3,
                      label="measured", color="tab:orange")
            ax_m.plot(xs, series(self.rows, lambda r: r.outputs[0].mean if r.outputs else None), "o-", ms=3,
                      color="tab:orange")
        else:
            ax_v.plot(xs, series(self.rows, lambda r: r.outputs[0].var if r.outputs else None), "s-", ms=3,
                      label="predicted", color="tab:blue")
            ax_m.plot(xs, series(self.rows, lambda r: r.outputs[0].mean if r.outputs else None), "s-", ms=3,
                      color="tab:blue")
            if any(r.measured for r in self.rows):
                ax_v.plot(xs, series(self.rows, lambda r: r.measured[0].var if r.measured else None), "o--", ms=3,
                          label="measured", color="tab:orange")
                ax_m.plot(xs, series(self.rows, lambda r: r.measured[0].mean if r.measured else None), "o--",
                          ms=3, color="tab:orange")
        if default_init is not None:
            by_name = {r.name: default_init.measured_moments(r) for r in default_init.rows}
            dv = [_nan_if_none(by_name.get(n) and by_name[n].var) for n in names]
            dm = [_nan_if_none(by_name.get(n) and by_name[n].mean) for n in names]
            ax_v.plot(xs, dv, "^:", ms=3, label="default init (measured)", color="tab:gray")
            ax_m.plot(xs, dm, "^:", ms=3, color="tab:gray")
        weighted = [x for x, r in zip(xs, self.rows) if r.weighted]
        for ax in (ax_v, ax_m):
            for x in weighted:
                ax.axvline(x, color="0.9", lw=0.6, zorder=0)
            ax.grid(True, which="major", alpha=0.3)
        if any(v > 0 for v in _finite(series(self.rows, lambda r: r.outputs[0].var if r.outputs else None))):
            ax_v.set_yscale("log")
        ax_v.set_ylabel("variance (log)")
        ax_m.set_ylabel("mean")
        ax_v.legend(loc="best", fontsize=8)
        ax_v.set_title(title or f"Signal of '{self.model_name}' (grey lines: weighted layers)")
        if len(xs) <= 60:
            ax_m.set_xticks(xs)
            ax_m.set_xticklabels(names, rotation=90, fontsize=6)
        else:
            ax_m.set_xlabel("node (topological order)")
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png", dpi=100)
        return path

    def __str__(self):
        return self.table(color=False)

    def __repr__(self):
        return (f"SignalReport(model={self.model_name!r}, nodes={len(self.rows)}, assigned={len(self.assigned)}, "
                f"source={self.source!r})")


def supports_color(stream=None) -> bool:
    """Whether `stream` (default stdout) is a terminal that shows ANSI colours."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = sys.stdout if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and os.environ.get("TERM", "") != "dumb"


def _nan_if_none(v):
    return float("nan") if v is None else float(v)


def _finite(values):
    return [v for v in values if math.isfinite(v)]


def _f(x) -> str:
    if x is None or x == "":
        return ""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _row(cells, widths):
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _colorize(text, err):
    code = "32" if err < 0.1 else "33" if err < 0.5 else "31"
    return f"\x1b[{code}m{text}\x1b[0m"
