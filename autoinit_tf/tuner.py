"""keras-tuner plugin: AutoInit (and swap recipes) applied to every candidate of an architecture search.

    import keras_tuner as kt
    from autoinit_tf.tuner import AutoInitHyperModel, swap_space

    hm = AutoInitHyperModel(build_model,                                  # build_model(hp) -> compiled model
                            init=["autoinit", "autoinit+probe", "default"],  # searched: hp "autoinit/init"
                            swaps=swap_space(act=[None, "relu->elu", "act:relu->and_ail"]))
    tuner = kt.RandomSearch(hm, objective="val_accuracy", max_trials=20, directory=..., project_name=...)
    tuner.search(x, y, validation_data=(xv, yv), epochs=5)
    best = tuner.get_best_models(1)[0]     # rebuilt with the same swaps and the same (deterministic) init

or, for an existing tuner object, ``autoinit_tf.tuner.wrap_tuner(tuner)``.

Every build is deterministic: the seed used for the weights is derived from the trial's hyperparameter
values (and ``wrap_kwargs["seed"]``, default 0), so ``get_best_models()`` rebuilds exactly the architecture
and initialization of the trial before loading its checkpoint. keras-tuner is an optional dependency
(``pip install autoinit-tf[tuner]``); it is imported only when one of the classes below is used.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

logger = logging.getLogger("autoinit_tf")

__all__ = [
    "INIT_METHODS",
    "INIT_HP",
    "SWAP_HP_PREFIX",
    "AutoInitHyperModel",
    "SwapSpace",
    "init_choice",
    "stochastic_depth_swaps",
    "swap_space",
    "trial_seed",
    "wrap_tuner",
]

INIT_METHODS = ("autoinit", "autoinit+probe", "default")
INIT_HP = "autoinit/init"
SWAP_HP_PREFIX = "autoinit/swap/"
_NONE = "none"


def _import_keras_tuner():
    try:
        import keras_tuner
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "autoinit_tf.tuner needs keras-tuner (and tensorboard on the TensorFlow backend). Install the "
            "'tuner' extra: pip install 'autoinit-tf[tuner]'  (or: pip install keras-tuner tensorboard). "
            f"The import failed with: {exc}"
        ) from exc
    return keras_tuner


# -- hyperparameter helpers (usable in any build(hp), with or without AutoInitHyperModel) ------------


def _check_method(method):
    if method not in INIT_METHODS:
        raise ValueError(f"Unknown init method {method!r}; choose from {list(INIT_METHODS)}.")
    return method


def init_choice(hp, methods=INIT_METHODS, *, name=INIT_HP, default=None):
    """Register the init method as a hyperparameter (`hp.Choice`) and return this trial's value.

    ``methods`` are taken from ``("autoinit", "autoinit+probe", "default")``; one method is recorded as a
    `hp.Fixed` so that it still appears in the trial's hyperparameters.
    """
    methods = [_check_method(m) for m in ([methods] if isinstance(methods, str) else methods)]
    if not methods:
        raise ValueError("init_choice needs at least one method.")
    if len(methods) == 1:
        return hp.Fixed(name, methods[0])
    return hp.Choice(name, methods, default=default or methods[0])


class SwapSpace:
    """Swap recipes as hyperparameters: one `hp.Choice` per group, ``"none"`` meaning "no swap".

    ``SwapSpace({"act": [None, "relu->elu", "act:relu->and_ail"], "pool": [None, "maxpool->strided_conv"]})``
    registers ``autoinit/swap/act`` and ``autoinit/swap/pool``; calling it with ``hp`` returns this
    trial's list of swap strings (in group order), ready for ``autoinit_tf.wrap(model, swaps=...)``.
    """

    def __init__(self, groups, *, prefix=SWAP_HP_PREFIX):
        if not isinstance(groups, dict) or not groups:
            raise TypeError("SwapSpace needs a non-empty dict {group name: [swap spec or None, ...]}.")
        self.prefix = prefix
        self.groups = {}
        for group, options in groups.items():
            if isinstance(options, str) or options is None:
                options = [options]
            values = [_NONE if o is None else str(o) for o in options]
            if not values:
                raise ValueError(f"SwapSpace group {group!r} has no options.")
            if len(set(values)) != len(values):
                raise ValueError(f"SwapSpace group {group!r} has duplicate options: {values}.")
            for v in values:
                if v != _NONE:
                    _validate_swap(v)
            self.groups[str(group)] = values

    def declare(self, hp):
        return self(hp)

    def __call__(self, hp):
        swaps = []
        for group, values in self.groups.items():
            name = self.prefix + group
            v = hp.Fixed(name, values[0]) if len(values) == 1 else hp.Choice(name, values, default=values[0])
            if v != _NONE:
                swaps.append(v)
        return swaps

    def __repr__(self):
        return f"SwapSpace({self.groups!r})"


def swap_space(**groups):
    """``swap_space(act=[None, "relu->elu"], depth=stochastic_depth_swaps([0.5, 0.8]))`` -> `SwapSpace`."""
    return SwapSpace(groups)


def stochastic_depth_swaps(p_last_values, *, include_none=True):
    """Options for a stochastic-depth group: ``[None, "residual->stochastic_depth(p_last=0.5)", ...]``."""
    out = [None] if include_none else []
    out += [f"residual->stochastic_depth(p_last={float(p)!r})" for p in p_last_values]
    return out


def _validate_swap(spec):
    try:
        from autoinit_tf.rewrite import parse_swap
    except ImportError:  # rewrite not available: checked at build time instead
        return
    parse_swap(spec)


def trial_seed(hp, base_seed=0) -> int:
    """A 31-bit seed that depends only on the hyperparameter values (and `base_seed`)."""
    values = hp.values if hasattr(hp, "values") else dict(hp)
    text = json.dumps({str(k): values[k] for k in sorted(values)}, sort_keys=True, default=repr)
    return (zlib.crc32(text.encode("utf-8")) ^ (int(base_seed) * 2654435761)) & 0x7FFFFFFF


# -- the HyperModel -------------------------------------------------------------------------------------


def _as_hypermodel(kt, inner):
    """A `keras_tuner.HyperModel` as given, or one whose ``build`` is the given function."""
    if isinstance(inner, kt.HyperModel):
        return inner
    if not callable(inner):
        raise TypeError(
            "AutoInitHyperModel needs a keras_tuner.HyperModel or a build(hp) function, got "
            f"{type(inner).__name__}."
        )
    hypermodel = kt.HyperModel()
    hypermodel.build = inner  # HyperModel.fit (model.fit) is kept
    return hypermodel


def _split_wrap_kwargs(wrap_kwargs):
    """``(base seed, the other wrap arguments)``; the arguments AutoInitHyperModel sets itself refused."""
    wrap_kwargs = dict(wrap_kwargs or {})
    for bad in ("swaps", "calibrate", "return_report"):
        if bad in wrap_kwargs:
            raise ValueError(
                f"wrap_kwargs[{bad!r}] is set by AutoInitHyperModel (use swaps= / init=) and cannot be "
                "given in wrap_kwargs."
            )
    return int(wrap_kwargs.pop("seed", 0) or 0), wrap_kwargs


def _swap_setting(swaps):
    """None, a `SwapSpace`, a callable ``f(hp)``, or a checked list of swap specs."""
    if isinstance(swaps, dict):
        swaps = SwapSpace(swaps)
    if swaps is not None and not callable(swaps):
        swaps = [swaps] if isinstance(swaps, str) else list(swaps)
        for s in swaps:
            if isinstance(s, str):
                _validate_swap(s)
    return swaps


def _init_setting(init):
    """A checked method name, a callable ``f(hp)``, or a list of method names (searched)."""
    if isinstance(init, str):
        return _check_method(init)
    if callable(init):
        return init
    return [_check_method(m) for m in init]


def _make_hypermodel_class(kt):
    class AutoInitHyperModel(kt.HyperModel):
        """A `keras_tuner.HyperModel` that builds the user's model, applies swaps, then AutoInit.

        Args:
            hypermodel_or_build_fn: a `keras_tuner.HyperModel` or a ``build(hp) -> keras.Model`` function.
            swaps: None; a fixed list of swap specs; a `SwapSpace` (hp-driven); or a callable
                ``f(hp) -> list of specs``.
            wrap_kwargs: extra arguments for `autoinit_tf.wrap` (``input_moments``, ``data``,
                ``signal_variance``, ``distribution``, ``strict``...). ``seed`` is the base seed (default 0)
                combined with the trial's hyperparameters.
            init: ``"autoinit"`` (default), ``"autoinit+probe"``, ``"default"`` (Keras' own init, swaps only),
                a sequence of those (searched as the ``autoinit/init`` hyperparameter), or ``f(hp) -> method``.
            seed_build: also seed Keras/NumPy/Python RNGs (``keras.utils.set_random_seed``) with the trial
                seed before the user's build, so layers the AutoInit pass leaves alone (and the ``"default"``
                method) are reproducible too.

        Attributes:
            timings: one dict per build, ``{"build_s", "wrap_s", "init", "swaps", "seed"}``.
        """

        def __init__(self, hypermodel_or_build_fn, *, swaps=None, wrap_kwargs=None, init="autoinit",
                     seed_build=True, name=None, tunable=True):
            super().__init__(name=name, tunable=tunable)
            self.inner = _as_hypermodel(kt, hypermodel_or_build_fn)
            self.base_seed, self.wrap_kwargs = _split_wrap_kwargs(wrap_kwargs)
            self.swaps = _swap_setting(swaps)
            self.init = _init_setting(init)
            self.seed_build = seed_build
            self.timings = []

        # declared up front so the oracle knows the space before the first trial
        def declare_hyperparameters(self, hp):
            self.inner.declare_hyperparameters(hp)
            self._resolve(hp)

        def _resolve(self, hp):
            if callable(self.init):
                method = _check_method(self.init(hp))
            elif isinstance(self.init, str):
                method = self.init  # fixed: not a hyperparameter
            else:
                method = init_choice(hp, self.init)
            if self.swaps is None:
                swaps = []
            elif callable(self.swaps):
                swaps = list(self.swaps(hp) or [])
            else:
                swaps = list(self.swaps)
            return method, swaps

        def build(self, hp):
            method, swaps = self._resolve(hp)
            seed = trial_seed(hp, self.base_seed)
            if self.seed_build:
                import keras

                keras.utils.set_random_seed(seed)
            t0 = time.perf_counter()
            model = self.inner.build(hp)
            t1 = time.perf_counter()
            model = apply_init(model, method, swaps=swaps, seed=seed, wrap_kwargs=self.wrap_kwargs)
            t2 = time.perf_counter()
            self.timings.append(
                {"build_s": t1 - t0, "wrap_s": t2 - t1, "init": method, "swaps": list(swaps), "seed": seed}
            )
            logger.debug("autoinit tuner: built '%s' (%s, swaps=%s, seed=%d) in %.2fs + %.2fs",
                         model.name, method, swaps, seed, t1 - t0, t2 - t1)
            return model

        def fit(self, hp, model, *args, **kwargs):
            return self.inner.fit(hp, model, *args, **kwargs)

    return AutoInitHyperModel


def apply_init(model, method, *, swaps=(), seed=0, wrap_kwargs=None):
    """Apply one init method (and swaps) to a built model; the building block of `AutoInitHyperModel`."""
    _check_method(method)
    wrap_kwargs = dict(wrap_kwargs or {})
    swaps = list(swaps or [])
    if method == "default":
        if swaps:
            from autoinit_tf.rewrite import rewrite

            model = rewrite(model, swaps=swaps)
        return model
    from autoinit_tf.autoinit import wrap

    calibrate = "probe" if method == "autoinit+probe" else "auto"  # auto: nothing extra for exact models
    return wrap(model, swaps=swaps or None, seed=seed, calibrate=calibrate, **wrap_kwargs)


def wrap_tuner(tuner, *, swaps=None, wrap_kwargs=None, init="autoinit", seed_build=True):
    """Make an existing `keras_tuner` Tuner initialize every candidate with AutoInit.

    Replaces ``tuner.hypermodel`` by an `AutoInitHyperModel` around it and registers the new
    hyperparameters (init method, swap groups) with the tuner's oracle. Returns the same tuner.
    Call it before ``search()`` (in every process of a distributed search).
    """
    kt = _import_keras_tuner()
    if not isinstance(tuner, kt.engine.base_tuner.BaseTuner):
        raise TypeError(f"wrap_tuner expects a keras_tuner Tuner, got {type(tuner).__name__}.")
    cls = _hypermodel_class()
    if getattr(tuner, "hypermodel", None) is None:
        raise ValueError(
            "This tuner has no hypermodel (a subclass overriding run_trial?); wrap the model-building code "
            "with autoinit_tf.wrap directly."
        )
    if isinstance(tuner.hypermodel, cls):
        return tuner
    hm = cls(tuner.hypermodel, swaps=swaps, wrap_kwargs=wrap_kwargs, init=init, seed_build=seed_build)
    tuner.hypermodel = hm
    hp = tuner.oracle.get_space()
    hm._resolve(hp)
    tuner.oracle.update_space(hp)
    return tuner


_CLASSES = {}


def _hypermodel_class():
    if "AutoInitHyperModel" not in _CLASSES:
        _CLASSES["AutoInitHyperModel"] = _make_hypermodel_class(_import_keras_tuner())
    return _CLASSES["AutoInitHyperModel"]


def __getattr__(name):  # PEP 562: keras_tuner is imported on first use only
    if name == "AutoInitHyperModel":
        return _hypermodel_class()
    raise AttributeError(f"module 'autoinit_tf.tuner' has no attribute {name!r}")
