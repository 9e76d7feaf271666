"""The routing family: each gate, expert form and signal against a NumPy
reference, round-tripped through `.keras`, and trained with XLA."""

import json
import os

import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import MoE
from moe_keras import losses
from tests import reference
from tests.backend_marks import NO_EXPORT
from tests.backend_marks import NO_JIT


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _randomize(layer, seed=3):
    rng = np.random.RandomState(seed)
    for w in layer.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))


def _experts_np(layer, x):
    return reference.experts_forward(layer.experts, x)  # [T, E, u]


# Every option, as MoE kwargs. Each must round-trip, train under XLA and
# agree between dense and sparse dispatch where both apply.
OPTIONS = {
    "noisy_top2": lambda: dict(gate=moe_keras.NoisyTopKGate(seed=1), top_k=2),
    "jitter": lambda: dict(
        gate=moe_keras.SoftmaxGate(jitter=0.1, seed=1), top_k=2
    ),
    "gate_dropout": lambda: dict(
        gate=moe_keras.SoftmaxGate(dropout=0.2, seed=1), top_k=2
    ),
    "aux_free_sigmoid": lambda: dict(
        gate=moe_keras.SigmoidGate(bias_update_rate=0.01), top_k=2
    ),
    "expert_choice": lambda: dict(
        gate=moe_keras.ExpertChoiceGate(), capacity_factor=2.0
    ),
    "round_robin": lambda: dict(gate=moe_keras.RoundRobinGate(), top_k=2),
    "random": lambda: dict(gate=moe_keras.RandomGate(seed=1), top_k=2),
    "uniform": lambda: dict(gate=moe_keras.UniformGate()),
    "static": lambda: dict(gate=moe_keras.StaticGate(), top_k=1),
    "per_feature": lambda: dict(gate=moe_keras.FeatureGate(), top_k=2),
    "drop_by_probability": lambda: dict(
        top_k=2, capacity_factor=0.5, drop_policy="probability"
    ),
    "spill": lambda: dict(top_k=2, capacity_factor=0.75, overflow="spill"),
    "deepseek_v3": lambda: dict(
        num_experts=4,
        gate=moe_keras.SigmoidGate(
            expert_groups=2,
            top_groups=1,
            routed_scaling_factor=2.5,
            normalize_top_k=True,
            bias_update_rate=0.01,
        ),
        top_k=2,
        sequence_balance_weight=0.01,
    ),
    "shared_experts": lambda: dict(
        top_k=2, num_shared_experts=1, shared_hidden_units=3
    ),
    "heterogeneous": lambda: dict(
        experts=[
            keras.layers.Dense(4),
            keras.Sequential(
                [keras.layers.Dense(7, "relu"), keras.layers.Dense(4)]
            ),
            keras.layers.Dense(4, activation="tanh"),
        ],
        top_k=2,
    ),
}


def _layer(option, **overrides):
    kwargs = dict(num_experts=3, units=4, hidden_units=5, activation="relu")
    kwargs.update(OPTIONS[option]())
    if "experts" in kwargs:
        for key in ("num_experts", "units", "hidden_units", "activation"):
            kwargs.pop(key)
    kwargs.update(overrides)
    return MoE(**kwargs)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_config_and_keras_file_round_trip(option, tmp_path):
    layer = _layer(option)
    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, layer(inputs))
    x = _x((2, 6, 3))
    config = layer.get_config()
    assert MoE.from_config(config).get_config() == config
    before = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert json.dumps(reloaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )
    if option != "random":  # RandomGate draws anew on every call
        np.testing.assert_array_equal(reloaded.predict(x, verbose=0), before)


@NO_JIT
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_jit_compiled_training(option):
    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, _layer(option)(inputs))
    model.compile(keras.optimizers.Adam(0.02), "mse", jit_compile=True)
    x, y = _x((32, 6, 3)), _x((32, 6, 4), 1)
    # One step an epoch on the whole batch: each epoch's loss is the loss
    # before its step, so the history compares the trained model with the
    # untrained one with a single XLA compile (the train step's).
    loss = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history["loss"]
    if option != "random":
        assert loss[-1] < loss[0], loss


@pytest.mark.parametrize(
    "option",
    sorted(
        set(OPTIONS)
        - {"random", "noisy_top2", "gate_dropout", "jitter", "uniform"}
    ),
)
def test_sparse_equals_dense(option):
    """In inference (no randomness), buffered dispatch with room for every
    assignment equals computing every expert."""
    sparse = _layer(option, dispatch="sparse", capacity_factor=3.0)
    dense = _layer(option, dispatch="dense", capacity_factor=3.0)
    x = _x((2, 6, 3))
    sparse(x)
    dense(x)
    dense.set_weights(sparse.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sparse(x)),
        keras.ops.convert_to_numpy(dense(x)),
        rtol=1e-5,
        atol=1e-5,
    )


@NO_EXPORT
@pytest.mark.parametrize("option", sorted(set(OPTIONS) - {"random"}))
def test_saved_model_export(option, tmp_path):
    # RandomGate is left out: it draws anew on every call, by design.
    import tensorflow as tf

    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, _layer(option)(inputs))
    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    for batch in (1, 7):
        x = _x((batch, 6, 3), batch)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(served.serve(tf.constant(x))),
            model.predict(x, batch_size=batch, verbose=0),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(option, training):
    layer = _layer(option)
    y = layer(np.zeros((0, 6, 3), "float32"), training=training)
    assert tuple(y.shape) == (0, 6, 4)
    for loss in layer.losses:
        assert float(loss) == 0.0


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_nan_sample_leaves_other_samples_finite(option):
    layer = _layer(option)
    x = _x((3, 6, 3))
    x[0, 2] = np.nan
    for training in (True, False):
        y = keras.ops.convert_to_numpy(layer(x, training=training))
        assert np.all(np.isfinite(y[1:])), option


# --- forward passes against NumPy -------------------------------------------


def _combine_np(weights_te, outs):
    if weights_te.ndim == 3:
        return (weights_te * outs).sum(1)
    return np.einsum("te,teu->tu", weights_te, outs)


def test_noisy_gate_is_clean_top_k_softmax_in_inference_and_noisy_in_training():
    layer = MoE(
        3, 4, gate=moe_keras.NoisyTopKGate(seed=2), top_k=2, dispatch="dense"
    )
    x = _x((10, 3))
    layer(x)
    _randomize(layer)
    logits = x @ keras.ops.convert_to_numpy(layer.gate.kernel)
    weights, _ = reference.top_k_weights(reference.softmax(logits), 2, True)
    expected = _combine_np(weights, _experts_np(layer, x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5
    )
    trained = keras.ops.convert_to_numpy(layer(x, training=True))
    assert not np.allclose(trained, expected)
    names = [float(v) for v in layer.losses]
    assert len(names) == 4  # balance, z-loss, importance, noisy load


def test_noisy_gate_losses_match_numpy():
    rng = np.random.RandomState(0)
    clean = rng.normal(size=(12, 5)).astype("float32")
    std = np.abs(rng.normal(size=(12, 5))).astype("float32") + 0.1
    noisy = clean + std * rng.normal(size=(12, 5)).astype("float32")
    mask = rng.uniform(size=12) > 0.3
    k = 2
    # Importance: CV^2 of summed top-k softmax gates.
    gates, _ = reference.top_k_weights(reference.softmax(noisy), k, True)
    importance = (gates * mask[:, None]).sum(0)
    cv2 = importance.var() / importance.mean() ** 2
    np.testing.assert_allclose(
        float(losses.importance_loss(gates, mask)), cv2, rtol=1e-4
    )
    # Load: P(expert stays in top-k) under fresh noise, from the paper.
    from math import erf
    from math import sqrt

    prob = np.zeros_like(clean)
    for t in range(12):
        for i in range(5):
            others = np.delete(noisy[t], i)
            threshold = np.sort(others)[::-1][k - 1]
            z = (clean[t, i] - threshold) / std[t, i]
            prob[t, i] = 0.5 * (1 + erf(z / sqrt(2)))
    load = (prob * mask[:, None]).sum(0)
    np.testing.assert_allclose(
        float(losses.noisy_load_loss(clean, noisy, std, k, mask)),
        load.var() / load.mean() ** 2,
        rtol=1e-4,
    )


def test_jitter_only_in_training():
    layer = MoE(3, 4, gate=moe_keras.SoftmaxGate(jitter=0.3, seed=0), top_k=2)
    plain = MoE(3, 4, top_k=2)
    x = _x((10, 3))
    layer(x)
    plain(x)
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        keras.ops.convert_to_numpy(plain(x)),
        atol=1e-6,
    )
    assert not np.allclose(
        keras.ops.convert_to_numpy(layer(x, training=True)),
        keras.ops.convert_to_numpy(plain(x, training=True)),
    )


def test_gate_dropout_only_in_training():
    layer = MoE(3, 4, gate=moe_keras.SoftmaxGate(dropout=0.5, seed=0), top_k=2)
    x = _x((40, 3))
    layer(x)
    probs = keras.ops.convert_to_numpy(layer.gate(x))
    weights, _ = reference.top_k_weights(probs, 2, True)
    outs = _experts_np(layer, x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        _combine_np(weights, outs),
        rtol=1e-4,
        atol=1e-5,
    )
    trained = keras.ops.convert_to_numpy(layer(x, training=True))
    assert not np.allclose(trained, _combine_np(weights, outs), atol=1e-4)


def test_aux_free_bias_steers_selection_not_weights():
    gate = moe_keras.SigmoidGate(bias_update_rate=0.1)
    layer = MoE(4, 4, gate=gate, top_k=1, dispatch="dense")
    x = np.abs(_x((16, 3)))
    layer(x)
    gate.kernel.assign(np.array([[1.0, 0.5, 0.0, -0.5]] * 3, "float32"))
    # Everyone picks expert 0: a training call moves its bias down by the
    # rate and every other expert's up.
    layer(x, training=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gate.selection_bias),
        [-0.1, 0.1, 0.1, 0.1],
        atol=1e-6,
    )
    gate.selection_bias.assign(np.array([0.0, 0.0, 0.0, 5.0], "float32"))
    probs = reference.sigmoid(x @ keras.ops.convert_to_numpy(gate.kernel))
    weights = np.zeros_like(probs)
    weights[:, 3] = probs[:, 3]  # chosen by the bias, weighted by the score
    expected = _combine_np(weights, _experts_np(layer, x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5
    )


def test_expert_choice_forward():
    layer = MoE(
        3,
        4,
        gate=moe_keras.ExpertChoiceGate(),
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
    )
    x = _x((9, 3))
    layer(x)
    _randomize(layer)
    probs = reference.softmax(x @ keras.ops.convert_to_numpy(layer.gate.kernel))
    capacity = 3  # ceil(1.0 * 9 / 3)
    weights = np.zeros_like(probs)
    for e in range(3):
        top = np.argsort(-probs[:, e], kind="stable")[:capacity]
        weights[top, e] = probs[top, e]
    expected = _combine_np(weights, _experts_np(layer, x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5
    )


def test_hash_gate_routes_by_id():
    inputs = keras.Input((5, 3))
    ids = keras.Input((5,), dtype="int32")
    layer = MoE(
        4, 4, gate=moe_keras.HashGate(seed=7), top_k=2, dispatch="dense"
    )
    model = keras.Model([inputs, ids], layer(inputs, routing_ids=ids))
    x = _x((2, 5, 3))
    id_values = np.array([[3, 9, 3, 100, 2], [9, 9, 1, 0, 3]], "int32")
    y = model.predict([x, id_values], verbose=0).reshape(-1, 4)
    flat_ids = id_values.reshape(-1)
    first = ((flat_ids % 32749) * 7703 + 7) % 32749 % 4
    weights = np.zeros((10, 4), "float32")
    for t in range(10):
        for j in range(2):
            weights[t, (first[t] + j) % 4] = 0.5
    expected = _combine_np(weights, _experts_np(layer, x.reshape(-1, 3)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="routing_ids"):
        layer(x)


def test_round_robin_and_uniform_and_static():
    x = _x((7, 3))
    rr = MoE(3, 4, gate=moe_keras.RoundRobinGate(), top_k=1, dispatch="dense")
    rr(x)
    weights = np.eye(3, dtype="float32")[np.arange(7) % 3]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rr(x)),
        _combine_np(weights, _experts_np(rr, x)),
        atol=1e-5,
    )
    uniform = MoE(3, 4, gate=moe_keras.UniformGate())
    uniform(x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(uniform(x)),
        _experts_np(uniform, x).mean(1),
        rtol=1e-5,
        atol=1e-6,
    )
    static = MoE(3, 4, gate=moe_keras.StaticGate())
    static(x)
    static.gate.kernel.assign(np.array([0.0, 1.0, 2.0], "float32"))
    weights = np.tile(reference.softmax(np.array([[0.0, 1.0, 2.0]])), (7, 1))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(static(x)),
        _combine_np(weights, _experts_np(static, x)),
        atol=1e-5,
    )


def test_random_gate_picks_distinct_experts():
    gate = moe_keras.RandomGate(num_experts=5, seed=3)
    routing = gate(_x((50, 3)), routing=True, top_k=3)
    indices = keras.ops.convert_to_numpy(routing["indices"])
    assert all(len(set(row)) == 3 for row in indices)
    assert set(indices.ravel()) == set(range(5))


def test_per_feature_gate_forward():
    layer = MoE(3, 4, gate=moe_keras.FeatureGate(), top_k=2, dispatch="dense")
    x = _x((8, 3))
    layer(x)
    _randomize(layer)
    probs = reference.softmax(x @ keras.ops.convert_to_numpy(layer.gate.kernel))
    weights, _ = reference.top_k_weights(probs, 2, True)
    per_feature = reference.sigmoid(
        x @ keras.ops.convert_to_numpy(layer.gate.feature_kernel)
    )
    weights = weights[..., None] * per_feature.reshape(8, 3, 4)
    expected = _combine_np(weights, _experts_np(layer, x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5
    )


def test_shared_experts_are_added_for_every_position():
    layer = MoE(
        3,
        4,
        top_k=1,
        num_shared_experts=2,
        shared_hidden_units=6,
        activation="relu",
        hidden_units=5,
    )
    x = _x((8, 3))
    layer(x)
    _randomize(layer)
    routed = reference.moe_forward(layer, x)
    shared = reference.experts_forward(layer.shared_experts, x).sum(1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        routed + shared,
        rtol=1e-4,
        atol=1e-4,
    )


def test_heterogeneous_experts_forward():
    layer = _layer("heterogeneous", dispatch="dense")
    x = _x((8, 3))
    layer(x)
    assert layer.units == 4
    probs = keras.ops.convert_to_numpy(layer.gate(x))
    weights, _ = reference.top_k_weights(probs, 2, True)
    outs = np.stack(
        [keras.ops.convert_to_numpy(e(x)) for e in layer.experts.expert_layers],
        axis=1,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        _combine_np(weights, outs),
        rtol=1e-5,
        atol=1e-6,
    )


def test_heterogeneous_experts_must_agree_on_units():
    with pytest.raises(ValueError, match="same units"):
        MoE(experts=[keras.layers.Dense(3), keras.layers.Dense(4)])(_x((2, 3)))
    with pytest.raises(ValueError, match="Dropless"):
        MoE(experts=[keras.layers.Dense(3)] * 2, top_k=1, capacity_factor=None)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dict(gate=moe_keras.ExpertChoiceGate(), top_k=2), "top_k"),
        (
            lambda: dict(
                gate=moe_keras.ExpertChoiceGate(), capacity_factor=None
            ),
            "capacity_factor",
        ),
        (lambda: dict(gate=moe_keras.UniformGate(), top_k=1), "top_k"),
        (lambda: dict(gate=moe_keras.SoftmaxGate(jitter=1.5)), "jitter"),
        (lambda: dict(gate=moe_keras.SoftmaxGate(dropout=-0.1)), "dropout"),
        (lambda: dict(num_shared_experts=-1), "num_shared_experts"),
    ],
)
def test_bad_routing_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoE(3, 4, **make())


# --- signals -------------------------------------------------------------------


def test_routing_statistics_match_numpy():
    layer = MoE(4, 3, top_k=2)
    x = _x((20, 3))
    layer(x, training=True)
    result = layer.statistics.result("train")
    probs = keras.ops.convert_to_numpy(layer.gate(x))
    _, order = reference.top_k_weights(probs, 2, True)
    load = np.bincount(order.ravel(), minlength=4) / order.size
    np.testing.assert_allclose(result["expert_load"], load, atol=1e-6)
    assert result["load_imbalance"] == pytest.approx(load.max() * 4, rel=1e-5)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    assert result["router_entropy"] == pytest.approx(entropy, rel=1e-4)
    total = sum(float(v) for v in layer.losses)
    assert result["aux_loss"] == pytest.approx(total, rel=1e-5)
    # Inference keeps its own record, without losses.
    layer(x)
    assert "aux_loss" not in layer.statistics.result("eval")


def test_expert_load_callback_writes_tensorboard_and_heatmap(tmp_path):
    # A layer without statistics: `data` is probed by the gates alone.
    model = keras.Sequential(
        [
            keras.Input((3,)),
            MoE(4, 2, top_k=1),
            MoE(3, 2, routing_statistics=False),
        ]
    )
    model.compile("adam", "mse")
    x = _x((32, 3))
    callback = moe_keras.ExpertLoadCallback(
        data=x,
        log_dir=str(tmp_path / "tb"),
        heatmap_path=str(tmp_path / "load.png"),
    )
    model.fit(x, _x((32, 2), 1), epochs=3, verbose=0, callbacks=[callback])
    assert (tmp_path / "load.png").stat().st_size > 1000
    assert any((tmp_path / "tb").iterdir())
    for layer in model.layers:
        load = callback.history[layer.name]
        assert load.shape == (3, layer.num_experts)
        np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-5)
    # The last epoch's top-1 load of the first layer, recomputed by hand.
    probs = keras.ops.convert_to_numpy(model.layers[0].gate(x))
    expected = np.bincount(probs.argmax(1), minlength=4) / 32
    np.testing.assert_allclose(
        callback.history[model.layers[0].name][-1], expected
    )


def test_losses_ignore_masked_positions_for_noisy_gate():
    """Two identical layers (same weights, same seed) see the same real
    positions and different garbage in the padding: same losses."""
    x = _x((2, 6, 3))
    mask = np.ones((2, 6), bool)
    mask[:, 4:] = False
    x_garbage = x.copy()
    x_garbage[~mask] = 50.0
    layers = [
        MoE(3, 2, gate=moe_keras.NoisyTopKGate(seed=0), top_k=1)
        for _ in range(2)
    ]
    for layer in layers:
        layer(x)
    layers[1].set_weights(layers[0].get_weights())
    layers[0](x, mask=mask, training=True)
    layers[1](x_garbage, mask=mask, training=True)
    first, second = ([float(v) for v in layer.losses] for layer in layers)
    assert len(first) == 4
    np.testing.assert_allclose(first, second, rtol=1e-5)
