"""Graph rewriting and swap recipes (backend-agnostic; run also with KERAS_BACKEND=jax -m core)."""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import autoinit_tf
from autoinit_tf.rewrite import SwapError, SwapRule, SwapWarning, list_recipes, parse_swap, plan_swaps, rewrite

pytestmark = pytest.mark.core


def _x(shape=(2, 16, 16, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def cnn(bn=True, pool=True, residual=True, gap=True, fused="relu", name="cnn"):
    i = keras.Input((16, 16, 3), name="img")
    x = L.Conv2D(12, 3, padding="same", activation=fused, name="c1")(i)
    if pool:
        x = L.MaxPooling2D(2, name="mp1")(x)
    x = L.Conv2D(12, 3, padding="same", name="c2")(x)
    if bn:
        x = L.BatchNormalization(name="bn2")(x)
    x = L.Activation("relu", name="a2")(x)
    if residual:
        y = L.Conv2D(12, 3, padding="same", name="c3")(x)
        y = keras.ops.relu(y)
        x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D(name="gap")(x) if gap else L.Flatten(name="flat")(x)
    o = L.Dense(4, name="out")(x)
    return keras.Model(i, o, name=name)


def plain():
    """A model no built-in recipe (except act:tanh->*) touches."""
    i = keras.Input((16, 16, 3), name="img")
    x = L.Conv2D(6, 3, activation="tanh", name="c1")(i)
    x = L.Flatten(name="flat")(x)
    return keras.Model(i, L.Dense(3, name="out")(x), name="plain")


def all_layers(model):
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(all_layers(layer))
    return out


def by_name(model):
    return {layer.name: layer for layer in all_layers(model)}


CASES = [
    # swap, expected new layer classes, removed layer names, output shape
    ("relu->elu", {"a2_elu": "Activation"}, ["a2"]),
    ("act:relu->ail_dup", {"a2_ail_dup": "LogitGate", "c1_ail_dup": "LogitGate"}, ["a2"]),
    ("act:relu->and_ail(keep=params)", {"a2_and_ail": "LogitGate"}, ["a2"]),
    ("act:relu->xnor_ail", {"a2_xnor_ail": "LogitGate"}, ["a2"]),
    ("act:relu->ail_part", {"a2_ail_part": "LogitGate"}, ["a2"]),
    ("maxpool->strided_conv", {"mp1_conv": "Conv2D"}, ["mp1"]),
    ("pool->strided", {}, ["mp1"]),
    ("gap->logavgexp(learnable=True)", {"gap_logavgexp": "LogAvgExpPooling2D"}, ["gap"]),
    ("bn->proxynorm", {"bn2_groupnorm": "GroupNormalization", "a2_proxynorm": "ProxyNormalization"}, ["bn2", "a2"]),
    ("bn->proxynorm(norm=layer)", {"bn2_layernorm": "LayerNormalization", "a2_proxynorm": "ProxyNormalization"},
     ["bn2"]),
    ("bn->groupnorm(groups=4)", {"bn2_groupnorm": "GroupNormalization"}, ["bn2"]),
    ("bn->layernorm", {"bn2_layernorm": "LayerNormalization"}, ["bn2"]),
    ("conv_unit->whitening(group_size=4)", {"c2_whitening": "IterNormWhitening"}, ["bn2"]),
    ("residual->stochastic_depth(p_last=0.5)", {"add_stochastic_depth": "StochasticDepth"}, ["add"]),
    ("residual->scaled(mode=idshort)", {"add_scaled": "ScaledResidual"}, ["add"]),
    ("residual->scaled(mode=skipinit)", {"add_scaled": "ScaledResidual"}, ["add"]),
    ("bn->remove", {}, ["bn2"]),
]


@pytest.mark.parametrize("swap,created,removed", CASES, ids=[c[0] for c in CASES])
def test_recipe_changes_model(swap, created, removed):
    m = cnn()
    before = [w.copy() for w in m.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)
        new = rewrite(m, [swap])
    names = by_name(new)
    for n, cls in created.items():
        assert n in names and type(names[n]).__name__ == cls, (n, sorted(names))
    for n in removed:
        assert n not in names
    assert new.output_shape == (None, 4)
    y = keras.ops.convert_to_numpy(new(_x()))
    assert y.shape == (2, 4) and np.isfinite(y).all()
    # the input model is untouched
    assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))
    assert "mp1" in by_name(m) and "bn2" in by_name(m)
    # untouched layers keep identity where their input is unchanged
    assert names["img"] is not by_name(m)["img"]
    if "c1" in names and swap not in ("pool->strided",) and "relu->" not in swap:
        assert names["c1"] is by_name(m)["c1"]


@pytest.mark.parametrize("swap", [c[0] for c in CASES if not c[0].startswith(("act:", "relu"))])
def test_recipe_leaves_other_model_alone(swap):
    m = plain()
    with pytest.warns(SwapWarning, match=swap.split("(")[0].replace(">", ".").replace("-", ".")):
        new = rewrite(m, [swap])
    assert [type(layer) for layer in new.layers] == [type(layer) for layer in m.layers]
    assert all(a is b for a, b in zip(new.layers[1:], m.layers[1:]))


def test_act_recipes_leave_tanh_model_alone_and_change_it():
    m = plain()
    with pytest.warns(SwapWarning, match="relu->elu"):
        rewrite(m, ["relu->elu"])
    new = rewrite(m, ["tanh->ail_dup"])
    assert new.get_layer("c1").filters == 4 and new.get_layer("c1_ail_dup").output.shape[-1] == 6


def test_untouched_weights_bit_identical_and_recreated_copied():
    m = cnn()
    new = rewrite(m, ["relu->elu"])
    old = by_name(m)
    for layer in new.layers:
        if layer.name in old and layer.weights:
            for a, b in zip(old[layer.name].get_weights(), layer.get_weights()):
                assert np.array_equal(a, b)
    assert new.get_layer("c1") is not m.get_layer("c1")  # recreated (fused activation changed)
    assert new.get_layer("c1").activation.__name__ == "elu"
    assert m.get_layer("c1").activation.__name__ == "relu"
    assert new.get_layer("c2") is m.get_layer("c2")


def test_downstream_rebuilt_on_shape_change():
    m = cnn()
    new = rewrite(m, ["act:relu->or_ail(keep=params)"])
    # c2 sees 6 channels instead of 12: recreated, fresh kernel of the new shape
    assert new.get_layer("c2") is not m.get_layer("c2")
    assert new.get_layer("c2").kernel.shape == (3, 3, 6, 12)
    assert new.output_shape == (None, 4)


def test_shared_layers_stay_shared():
    i = keras.Input((8,), name="i")
    d = L.Dense(8, activation="relu", name="shared")
    a = L.Activation("relu", name="act")
    h = a(d(i))
    h = a(d(h))
    m = keras.Model(i, L.Dense(2, name="out")(h))
    new = rewrite(m, ["relu->selu"])
    names = [layer.name for layer in new.layers]
    assert names.count("shared") == 1 and names.count("act_selu") == 1
    assert len(new.get_layer("shared")._inbound_nodes) == 2
    np.testing.assert_allclose(new.get_layer("shared").kernel.numpy() if hasattr(new.get_layer("shared").kernel, "numpy")
                               else keras.ops.convert_to_numpy(new.get_layer("shared").kernel),
                               keras.ops.convert_to_numpy(m.get_layer("shared").kernel))


def test_nested_models_rewritten_inside():
    bi = keras.Input((8,), name="bi")
    block = keras.Model(bi, L.Activation("relu", name="inner_act")(L.Dense(8, name="inner")(bi)), name="block")
    ti = keras.Input((8,), name="ti")
    tail = keras.Model(ti, L.Dense(8, name="tail_d")(ti), name="tail")
    i = keras.Input((8,), name="i")
    h = tail(block(block(i)))
    m = keras.Model(i, L.Dense(2, name="out")(h))
    new = rewrite(m, ["relu->gelu"])
    nb = new.get_layer("block")
    assert nb is not block and "inner_act_gelu" in [layer.name for layer in nb.layers]
    assert nb.get_layer("inner") is block.get_layer("inner")
    assert new.get_layer("tail") is tail  # nothing inside changed
    assert len([layer for layer in new.layers if layer.name == "block"]) == 1
    assert keras.ops.convert_to_numpy(new(np.ones((3, 8), "float32"))).shape == (3, 2)
    assert "inner_act" in [layer.name for layer in block.layers]


def test_sequential_input():
    m = keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(),
                          L.Flatten(), L.Dense(2)], name="seq")
    new = rewrite(m, ["relu->elu", "maxpool->strided_conv"])
    assert isinstance(new, keras.Model) and new.name == "seq"
    assert [type(layer).__name__ for layer in new.layers] == ["InputLayer", "Conv2D", "Conv2D", "Flatten", "Dense"]
    assert new.layers[2].activation.__name__ == "elu"  # the preceding conv's (new) activation
    assert new.output_shape == (None, 2)


def test_compiled_input_trains_and_roundtrips(tmp_path):
    m = cnn()
    m.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3), loss="mse", metrics=["mae"])
    swaps = ["act:relu->ail_dup", "maxpool->strided_conv", "gap->logavgexp(learnable=True)", "bn->proxynorm",
             "residual->stochastic_depth"]
    with pytest.raises(SwapError, match="both change node"):
        rewrite(m, swaps)  # bn->proxynorm and the gate both want 'a2'
    swaps = ["act:relu->ail_dup", "maxpool->strided_conv", "gap->logavgexp(learnable=True)",
             "residual->stochastic_depth"]
    new = rewrite(m, swaps)
    assert new.compiled and new.optimizer is not m.optimizer
    assert float(new.optimizer.learning_rate) == pytest.approx(3e-3)
    assert new.get_compile_config()["loss"] == m.get_compile_config()["loss"]
    x, y = _x((4, 16, 16, 3)), np.zeros((4, 4), "float32")
    hist = new.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0]) and "mae" in hist.history
    path = os.path.join(tmp_path, "rw.keras")
    new.save(path)
    back = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(new.predict(x, verbose=0)), rtol=1e-5, atol=1e-5)


def test_plan_matches_rewrite():
    m = cnn()
    swaps = ["act:relu->ail_dup", "maxpool->strided_conv", "gap->logavgexp", "bn->layernorm",
             "residual->scaled(mode=learnscalar)"]
    plan = plan_swaps(m, swaps)
    text = str(plan)
    for e in plan:
        assert e.target in text and e.recipe in text
    new, plan2 = rewrite(m, swaps, return_plan=True)
    assert str(plan2) == text
    names = by_name(new)
    for n, cls in plan.new_layers:
        assert type(names[n]).__name__ == cls
    for n in plan.removed_layers:
        assert n not in names
    for e in plan:
        if e.kind == "override":
            cfg = names[e.op.name].get_config()
            for k, v in e.changes.items():
                assert cfg[k] == v or tuple(np.atleast_1d(cfg[k])) == tuple(np.atleast_1d(v)) or \
                    (k == "activation" and cfg[k] == v)
    added = set(names) - set(by_name(m))
    assert added == {n for n, _ in plan.new_layers}


def test_errors():
    m = cnn()
    with pytest.raises(SwapError, match="Known recipes"):
        rewrite(m, ["relu->notanactivation"])
    with pytest.raises(SwapError, match="(?s)unknown swap recipe 'foo->bar'.*maxpool->strided_conv"):
        plan_swaps(m, ["foo->bar"])
    with pytest.raises(SwapError, match="(?s)unknown argument.*Known recipes"):
        plan_swaps(m, ["residual->stochastic_depth(p_first=0.1)"])
    with pytest.raises(SwapError, match="p_last"):
        plan_swaps(m, ["residual->stochastic_depth(p_last=2)"])
    i = keras.Input((8,), name="i")
    h = L.Dense(4, name="d4")(i)
    bad = keras.Model(i, L.Activation("relu", name="act4")(h))
    with pytest.raises(SwapError, match="act4"):
        plan_swaps(bad, ["act:relu->ail_part(keep=params)"])  # 4 channels, part needs 6 | C
    with pytest.raises(SwapError, match="act4"):
        plan_swaps(bad, ["act:relu->ail_dup"])  # keep=width needs 3 | C


def test_parse_forms_and_list():
    r = parse_swap("residual->stochastic_depth(p_last=0.8, mode='drop_path')")
    assert r.p_last == 0.8 and r.mode == "drop_path"
    assert parse_swap(("bn->proxynorm", {"norm": "layer"})).norm == "layer"
    assert parse_swap("bn->proxynorm(norm=layer, groups=8)").groups == 8
    assert parse_swap({"name": "relu->elu"}).target == "elu"
    names = [r["name"] for r in list_recipes()]
    for n in ("act:<a>-><b>", "maxpool->strided_conv", "pool->strided", "gap->logavgexp", "bn->proxynorm",
              "bn->groupnorm", "bn->layernorm", "conv_unit->whitening", "residual->stochastic_depth",
              "residual->scaled", "bn->remove"):
        assert n in names
    assert all(r["doc"] for r in list_recipes())


def test_stochastic_depth_linear_decay():
    i = keras.Input((8,), name="i")
    x = i
    for b in range(4):
        x = L.Add(name=f"add{b}")([x, L.Dense(8, name=f"d{b}")(x)])
    m = keras.Model(i, x)
    new = rewrite(m, ["residual->stochastic_depth(p_last=0.5)"])
    ps = [new.get_layer(f"add{b}_stochastic_depth").survival_probability for b in range(4)]
    np.testing.assert_allclose(ps, [0.875, 0.75, 0.625, 0.5])


def test_user_swap_rule_layer_and_subgraph():
    m = cnn()
    rule = SwapRule(match=lambda n: isinstance(n.op, L.Dense), replace=lambda n: L.Dense(4, name="out"))
    new = rewrite(m, [rule])
    assert new.get_layer("out") is not m.get_layer("out") and new.output_shape == (None, 4)

    def sub(n):
        def build(x):
            return L.Dense(4, name="head2")(L.Dense(16, name="head1")(x))
        return build

    rule2 = SwapRule(match=lambda n: n.op.name == "out", replace=sub, name="two_heads")
    plan = plan_swaps(m, [rule2])
    assert "two_heads" in str(plan)
    new = rewrite(m, [rule2])
    assert [layer.name for layer in new.layers][-2:] == ["head1", "head2"]
    seen = []
    with pytest.warns(SwapWarning):
        plan_swaps(m, [SwapRule(match=lambda n: seen.append((n.op.name, [c.op.name for c in n.consumers])) or False,
                                replace=lambda n: None, name="probe")])
    assert ("c2", ["bn2"]) in seen


def test_wrap_with_swaps_end_to_end():
    m = cnn()
    plain_rw = rewrite(m, ["relu->elu", "maxpool->strided_conv"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", autoinit_tf.FallbackRuleWarning)  # every new layer has a rule
        new = autoinit_tf.wrap(m, swaps=["relu->elu", "maxpool->strided_conv"], seed=1)
    assert new is not m and "mp1_conv" in [layer.name for layer in new.layers]
    k_wrap = keras.ops.convert_to_numpy(new.get_layer("mp1_conv").kernel)
    k_plain = keras.ops.convert_to_numpy(plain_rw.get_layer("mp1_conv").kernel)
    assert k_wrap.shape == k_plain.shape and not np.allclose(k_wrap, k_plain)
    y = keras.ops.convert_to_numpy(new(_x((8, 16, 16, 3))))
    assert np.isfinite(y).all()
