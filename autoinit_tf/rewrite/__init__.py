"""Graph rewriting and named swap recipes.

    new = autoinit_tf.rewrite(model, swaps=["relu->elu", "maxpool->strided_conv"])
    plan = autoinit_tf.plan_swaps(model, swaps=[...]); print(plan)   # dry run

`rewrite` builds a NEW functional model (the input model is not modified): untouched layers are the same
objects (same weights); layers whose input shape changes are recreated from their config; replacements
get generated unique names. Note that kept layers are shared with the input model, so re-initializing the
new model (as `autoinit_tf.wrap(model, swaps=...)` does) also changes those layers' weights in the old one.
"""

from __future__ import annotations

import warnings

from autoinit_tf.rewrite.parsing import known_recipes_text, parse_swap, parse_swaps
from autoinit_tf.rewrite.recipes import RECIPES, Recipe, SwapRule, activation_of, list_recipes
from autoinit_tf.rewrite.recipes import PlanState as _PlanState
from autoinit_tf.rewrite.replay import (
    GraphIndex,
    NodeInfo,
    PlanEntry,
    SwapError,
    SwapPlan,
    SwapWarning,
    replay,
)

__all__ = [
    "RECIPES",
    "NodeInfo",
    "PlanEntry",
    "Recipe",
    "SwapError",
    "SwapPlan",
    "SwapRule",
    "SwapWarning",
    "activation_of",
    "known_recipes_text",
    "list_recipes",
    "parse_swap",
    "plan_swaps",
    "rewrite",
]


def _plan(model, swaps, warn=True):
    rules = parse_swaps(swaps)
    index = GraphIndex(model)
    plan = SwapPlan(model.name, [r.name for r in rules])
    state = _PlanState(plan, index)
    for rule in rules:
        if not rule.plan(state):
            plan.unmatched.append(rule.name)
            if warn:
                warnings.warn(f"swap '{rule.name}' matched nothing in model '{model.name}'.", SwapWarning,
                              stacklevel=3)
    return plan, index


def plan_swaps(model, swaps):
    """Dry run: the `SwapPlan` listing every match and its replacement. Nothing is built."""
    return _plan(model, swaps)[0]


def rewrite(model, swaps, *, return_plan=False):
    """A new model with the swaps applied (compiled like `model`, with a fresh optimizer, if it was)."""
    plan, index = _plan(model, swaps)
    new = replay(model, plan, index)
    return (new, plan) if return_plan else new
