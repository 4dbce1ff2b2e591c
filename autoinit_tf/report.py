"""`SignalReport`: what a pass predicted (and, when measured, observed) at every node."""

from __future__ import annotations

import json
import math
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
        measured: list of measured `Moments` per output (filled by measurement passes).
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
            "rule": self.rule,
            "notes": list(self.notes),
        }


class SignalReport:
    """Per-node signal statistics of one pass over a model, in topological order."""

    def __init__(self, model_name: str, rows: list, assigned: list | None = None):
        self.model_name = model_name
        self.rows = rows
        self.assigned = list(assigned or [])  # variable paths this pass (re)initialized

    def __len__(self):
        return len(self.rows)

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
        """Predicted moments of the last node's first output."""
        return self.rows[-1].outputs[0]

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "assigned": self.assigned,
            "nodes": [r.to_dict() for r in self.rows],
        }

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            from autoinit_tf.io_utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    def table(self, color: bool = False) -> str:
        """An aligned plain-text table (one line per node)."""
        has_measured = any(r.measured for r in self.rows)
        head = ["#", "node", "type", "in mean", "in var", "out mean", "out var"]
        if has_measured:
            head += ["meas mean", "meas var"]
        head += ["w var", "notes"]
        lines = []
        for i, r in enumerate(self.rows):
            ins = r.inputs[0] if r.inputs else None
            out = r.outputs[0] if r.outputs else None
            cells = [str(i), r.name, r.type, _f(ins and ins.mean), _f(ins and ins.var), _f(out and out.mean),
                     _f(out and out.var)]
            if has_measured:
                meas = r.measured[0] if r.measured else None
                cells += [_f(meas and meas.mean), _f(meas and meas.var)]
            cells += [_f(r.weight_scale), "; ".join(r.notes)]
            lines.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
        out = [_row(head, widths), _row(["-" * w for w in widths], widths)]
        for cells in lines:
            text = _row(cells, widths)
            if color and has_measured:
                text = _colorize(text, cells, head)
            out.append(text)
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"SignalReport(model={self.model_name!r}, nodes={len(self.rows)}, assigned={len(self.assigned)})"


def _f(x) -> str:
    if x is None or x == "":
        return ""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _row(cells, widths):
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _colorize(text, cells, head):
    try:
        pred = float(cells[head.index("out var")])
        meas = float(cells[head.index("meas var")])
    except (ValueError, IndexError):
        return text
    if pred <= 0 or meas <= 0:
        return text
    err = abs(math.log(meas / pred))
    code = "32" if err < 0.1 else "33" if err < 0.5 else "31"
    return f"\x1b[{code}m{text}\x1b[0m"
