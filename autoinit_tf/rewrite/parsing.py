"""Swap specifications: ``"name"``, ``"name(arg=value, ...)"``, ``(name, {args})``, or rule objects."""

from __future__ import annotations

import ast
import re

import keras

from autoinit_tf.rewrite.recipes import GATES, RECIPES, ActivationSwap, Recipe
from autoinit_tf.rewrite.replay import SwapError

__all__ = ["parse_swap", "parse_swaps", "known_recipes_text"]

_SPEC = re.compile(r"^\s*([^()\s]+)\s*(?:\((.*)\))?\s*$", re.S)


def known_recipes_text():
    lines = []
    for name, (_, args, _doc) in RECIPES.items():
        arg_text = ", ".join(f"{k}={v!r}" for k, v in args.items())
        lines.append(f"  {name}" + (f"({arg_text})" if arg_text else ""))
    lines.append("  (act:<a>-><b> may be written <a>-><b>, e.g. relu->elu; gates: " + ", ".join(GATES) + ")")
    return "Known recipes:\n" + "\n".join(lines)


def _parse_args(name, text):
    if text is None or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as exc:
        raise SwapError(f"swap '{name}({text})': cannot parse the arguments ({exc.msg}).\n"
                        + known_recipes_text()) from exc
    if call.args:
        raise SwapError(f"swap '{name}({text})': arguments must be given as name=value.\n" + known_recipes_text())
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            if isinstance(kw.value, ast.Name):  # bare word: norm=group
                out[kw.arg] = kw.value.id
            else:
                raise SwapError(f"swap '{name}({text})': the value of '{kw.arg}' is not a literal.\n"
                                + known_recipes_text()) from None
    return out


def _is_activation(name):
    if name in GATES:
        return True
    try:
        keras.activations.get(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _make(name, kwargs):
    if name in RECIPES:
        factory, defaults, _ = RECIPES[name]
        bad = [k for k in kwargs if k not in defaults]
        if bad:
            raise SwapError(f"swap '{name}': unknown argument(s) {bad}; it takes {sorted(defaults) or 'none'}.\n"
                            + known_recipes_text())
        try:
            return factory(**kwargs)
        except SwapError as exc:
            raise SwapError(f"{exc}\n" + known_recipes_text()) from None
        except (TypeError, ValueError) as exc:
            raise SwapError(f"swap '{name}': bad argument ({exc}).\n" + known_recipes_text()) from None
    body = name[4:] if name.startswith("act:") else name
    if "->" in body:
        source, target = (s.strip() for s in body.split("->", 1))
        if (name.startswith("act:") or _is_activation(source)) and source and target:
            if not _is_activation(source) or not _is_activation(target):
                bad = source if not _is_activation(source) else target
                raise SwapError(f"swap '{name}': '{bad}' is not a Keras activation or a gate.\n"
                                + known_recipes_text())
            bad = [k for k in kwargs if k != "keep"]
            if bad:
                raise SwapError(f"swap '{name}': unknown argument(s) {bad}; act:<a>-><b> takes ['keep'].\n"
                                + known_recipes_text())
            return ActivationSwap(source, target, **kwargs)
    raise SwapError(f"unknown swap recipe '{name}'.\n" + known_recipes_text())


def parse_swap(spec):
    """One swap specification -> a rule object (`Recipe` / `SwapRule`).

    Accepted: a rule object; a string ``"name"`` or ``"name(arg=value, ...)"`` (values are Python
    literals or bare words); a tuple ``(name, {arg: value})``; a dict ``{"name": ..., "args": {...}}``.
    """
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, str):
        m = _SPEC.match(spec)
        if not m:
            raise SwapError(f"cannot parse swap {spec!r}.\n" + known_recipes_text())
        name, text = m.group(1), m.group(2)
        return _make(name, _parse_args(name, text))
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return _make(spec[0], dict(spec[1]))
    if isinstance(spec, dict) and "name" in spec:
        return _make(spec["name"], dict(spec.get("args") or {}))
    raise SwapError(f"a swap must be a recipe string, (name, args), a dict or a SwapRule; got {spec!r}.\n"
                    + known_recipes_text())


def parse_swaps(swaps):
    if swaps is None:
        return []
    if isinstance(swaps, (str, Recipe)) or (isinstance(swaps, tuple) and len(swaps) == 2 and isinstance(swaps[1], dict)):
        swaps = [swaps]
    return [parse_swap(s) for s in swaps]
