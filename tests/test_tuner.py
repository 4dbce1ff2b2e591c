"""keras-tuner plugin: AutoInitHyperModel, search-space helpers, wrap_tuner."""

import numpy as np
import pytest

kt = pytest.importorskip("keras_tuner")
pytest.importorskip("tensorboard")  # keras-tuner's TF backend fails every trial without it

import keras  # noqa: E402

from autoinit_tf import tuner as at  # noqa: E402


def _data(n=64, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x[:, :1] + 0.5 * x[:, 1:2] > 0).astype("float32")
    return x, y


class TinyHyperModel(kt.HyperModel):
    """Records the trained weights of each trial so the test can compare with get_best_models()."""

    def __init__(self):
        super().__init__()
        self.final = {}

    def build(self, hp):
        units = hp.Choice("units", [4, 8])
        inp = keras.Input((6,))
        h = keras.layers.Dense(units, activation="relu")(inp)
        h = keras.layers.Dense(units, activation="relu")(h)
        out = keras.layers.Dense(1, activation="sigmoid")(h)
        model = keras.Model(inp, out)
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        history = model.fit(*args, **kwargs)
        self.final[at.trial_seed(hp)] = [w.copy() for w in model.get_weights()]
        return history


def _weights_equal(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def test_random_search_with_plugin(tmp_path):
    x, y = _data()
    inner = TinyHyperModel()
    hm = at.AutoInitHyperModel(
        inner,
        init=["autoinit", "autoinit+probe", "default"],
        swaps=at.swap_space(act=[None, "relu->elu", "relu->tanh"]),
        wrap_kwargs={"input_moments": (0.0, 1.0)},
    )
    tuner = kt.RandomSearch(hm, objective="val_loss", max_trials=3, directory=str(tmp_path),
                            project_name="p", seed=1, overwrite=True)
    tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=32, verbose=0)
    trials = list(tuner.oracle.trials.values())
    assert len(trials) == 3
    assert all(t.status == "COMPLETED" for t in trials), [t.status for t in trials]
    for t in trials:  # the init method and swap groups are hyperparameters of every trial
        assert t.hyperparameters.values[at.INIT_HP] in at.INIT_METHODS
        assert t.hyperparameters.values[at.SWAP_HP_PREFIX + "act"] in ("none", "relu->elu", "relu->tanh")
    best_hp = tuner.get_best_hyperparameters(1)[0]
    best = tuner.get_best_models(1)[0]
    trained = inner.final[at.trial_seed(best_hp)]
    assert _weights_equal(best.get_weights(), trained)
    # the swap recorded in the hp is the one in the rebuilt model
    act = best_hp.values[at.SWAP_HP_PREFIX + "act"]
    acts = {l.activation.__name__ for l in best.layers if isinstance(l, keras.layers.Dense)}
    expected = {"none": "relu", "relu->elu": "elu", "relu->tanh": "tanh"}[act]
    assert expected in acts and (expected == "relu" or "relu" not in acts)


def test_build_is_deterministic_and_hp_driven():
    hm = at.AutoInitHyperModel(TinyHyperModel(), init=["autoinit", "default"],
                               swaps={"act": [None, "relu->elu"]})
    hp = kt.HyperParameters()
    hm.declare_hyperparameters(hp)
    assert set(hp.values) == {at.INIT_HP, at.SWAP_HP_PREFIX + "act"}
    hm.build(hp)  # registers the user's own hyperparameters
    assert set(hp.values) == {"units", at.INIT_HP, at.SWAP_HP_PREFIX + "act"}
    hp.values[at.SWAP_HP_PREFIX + "act"] = "relu->elu"
    keras.backend.clear_session()
    w1 = hm.build(hp).get_weights()
    keras.backend.clear_session()
    m2 = hm.build(hp)
    assert _weights_equal(w1, m2.get_weights())
    assert m2.layers[1].activation.__name__ == "elu"
    assert hm.timings[-1]["swaps"] == ["relu->elu"] and hm.timings[-1]["init"] == "autoinit"
    hp2 = hp.copy()
    hp2.values["units"] = 4 if hp.values["units"] == 8 else 8
    assert at.trial_seed(hp2) != at.trial_seed(hp)


def test_wrap_tuner_existing_object(tmp_path):
    x, y = _data()

    def build(hp):
        inp = keras.Input((6,))
        h = keras.layers.Dense(hp.Int("units", 4, 8, step=4), activation="relu")(inp)
        model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return model

    tuner = kt.RandomSearch(build, objective="val_loss", max_trials=2, directory=str(tmp_path),
                            project_name="w", overwrite=True)
    assert at.wrap_tuner(tuner, init=["autoinit", "default"]) is tuner
    assert at.INIT_HP in tuner.oracle.get_space().values
    tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    trials = list(tuner.oracle.trials.values())
    assert trials and all(t.status == "COMPLETED" for t in trials)
    assert all(at.INIT_HP in t.hyperparameters.values for t in trials)
    assert tuner.hypermodel.timings


def test_helpers_validate():
    with pytest.raises(ValueError, match="Unknown init method"):
        at.init_choice(kt.HyperParameters(), ["lsuv"])
    assert at.stochastic_depth_swaps([0.5]) == [None, "residual->stochastic_depth(p_last=0.5)"]
    with pytest.raises(Exception):
        at.swap_space(act=["not_a_recipe->???"])
    with pytest.raises(ValueError, match="wrap_kwargs"):
        at.AutoInitHyperModel(lambda hp: None, wrap_kwargs={"calibrate": "probe"})


def test_keras_tuner_import_is_lazy_with_clear_message(monkeypatch):
    import subprocess
    import sys

    code = ("import sys, autoinit_tf.tuner as t; assert 'keras_tuner' not in sys.modules; "
            "sys.modules['keras_tuner'] = None\n"
            "try:\n    t.AutoInitHyperModel\nexcept ImportError as e:\n    assert \"autoinit-tf[tuner]\" in str(e); print('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip().endswith("OK"), out.stderr[-2000:]
