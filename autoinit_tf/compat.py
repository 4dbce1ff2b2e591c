"""`AutoInit`: the reference package's public API on top of `wrap`, so users switch by an import.

    from autoinit_tf import AutoInit          # was: from autoinit import AutoInit
    model = AutoInit().initialize_model(model)

Differences from the reference, all deliberate: the model object is kept (weights are assigned in
place, compiled state and optimizer survive) when a Model is passed; propagation is exact
(quadrature, closed forms) instead of Monte Carlo, so `monte_carlo_samples` and
`recurrent_monte_carlo_samples` are accepted and ignored; unknown layers are measured on a probe
instead of passed through silently.
"""

from __future__ import annotations

import inspect
import json
import warnings

import keras

from autoinit_tf.engine import run_analytic_pass
from autoinit_tf.distributions import check_distribution
from autoinit_tf.moments import Moments

_KNOWN_KEYS = {"distribution", "constrain_weights", "monte_carlo_samples", "recurrent_monte_carlo_samples",
               "global_pooling_samples"}


def _estimator_rule(estimator):
    """Adapt a reference-style estimator (``estimate(means_in, vars_in) -> (mean, var)``) to a rule."""

    def rule(ctx):
        est = estimator
        if inspect.isclass(est):
            try:
                est = est(ctx.layer)
            except TypeError:
                est = est()
        means = [m.mean for m in ctx.inputs]
        variances = [m.var for m in ctx.inputs]
        fn = est.estimate if hasattr(est, "estimate") else est
        mean, var = fn(means, variances)
        return Moments(mean, var)

    rule.__name__ = f"estimator_{getattr(estimator, '__name__', type(estimator).__name__)}"
    return rule


class AutoInit:
    """Drop-in replacement for the reference `AutoInit` class.

    Args:
        weight_init_config: dict; ``distribution`` in truncated_normal | untruncated_normal |
            uniform | orthogonal. Other reference keys are accepted (Monte Carlo sizes are unused).
        input_data_mean, input_data_var: moments of the model inputs.
        custom_distribution_estimators: ``{LayerClass: estimator}``; an estimator is a class or
            object with ``estimate(means_in, vars_in) -> (mean, var)``, or a rule ``rule(ctx)``.
        signal_variance: target variance of every weighted layer's pre-activation output.
    """

    def __init__(self, weight_init_config=None, input_data_mean=0.0, input_data_var=1.0,
                 custom_distribution_estimators=None, signal_variance=1.0):
        config = dict(weight_init_config or {})
        unknown = set(config) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"Unknown weight_init_config keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}.")
        self.distribution = check_distribution(config.get("distribution", "truncated_normal"))
        if config.get("constrain_weights"):
            warnings.warn("constrain_weights is not supported and is ignored.", UserWarning, stacklevel=2)
        self.input_data_mean = input_data_mean
        self.input_data_var = input_data_var
        self.signal_variance = signal_variance
        self.rules = {}
        for cls, est in (custom_distribution_estimators or {}).items():
            is_rule = callable(est) and not inspect.isclass(est) and not hasattr(est, "estimate")
            self.rules[cls] = est if is_rule else _estimator_rule(est)

    def initialize_model(self, model, return_estimates=False, custom_objects=None):
        """Initialize `model` (a Model, a config dict or a JSON string); returns the model.

        With ``return_estimates=True`` returns ``(model, estimates)`` where ``estimates`` maps each
        node name to its predicted output ``(mean, var)``.
        """
        if isinstance(model, (str, bytes)):
            model = keras.models.model_from_json(model, custom_objects=custom_objects)
        elif isinstance(model, dict):
            if "class_name" in model:
                model = keras.models.model_from_json(json.dumps(model), custom_objects=custom_objects)
            else:
                model = keras.Model.from_config(model, custom_objects=custom_objects)
        if isinstance(self.input_data_mean, (list, tuple)):
            moments = list(zip(self.input_data_mean, self.input_data_var))
        else:
            moments = (self.input_data_mean, self.input_data_var)
        engine = run_analytic_pass(model, input_moments=moments, data=None, signal_variance=self.signal_variance,
                                   distribution=self.distribution, seed=None, strict=False, rules=self.rules,
                                   include_frozen=False, exact_draw=False)
        engine.apply()
        if return_estimates:
            estimates = {row.name: (row.outputs[0].mean, row.outputs[0].var) for row in engine.rows}
            return model, estimates
        return model
