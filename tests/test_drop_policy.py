"""`MoE(drop_policy=...)`: which assignments an overflowing expert keeps.

`"position"` (default): first choices before second choices, then token
order. `"probability"`: the highest router weights keep the slots, first
and second choices pooled, ties in the `"position"` order. Both are
checked against the NumPy references in `tests/reference.py`.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_keras import MoE
from moe_keras import dispatch as dispatch_lib
from moe_keras import gates as gates_lib
from moe_keras import group_dispatch
from tests import reference
from tests.backend_marks import NO_JIT
from tests.backend_marks import derandomized
from tests.grad_utils import gradients
from tests.layer_test_utils import reload_keras_file

BACKEND = keras.backend.backend()
POLICIES = ["position", "probability"]


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _randomize(layer, seed=3):
    rng = np.random.RandomState(seed)
    for w in layer.trainable_weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))


def _keep(policy, order, weights, num_experts, capacity, valid=None):
    if policy == "probability":
        return reference.capacity_keep_by_probability(
            order, weights, num_experts, capacity, valid
        )
    return reference.capacity_keep(order, num_experts, capacity, valid)


def _plan_kept(order, weights, num_experts, capacity, valid, policy, method):
    plan = dispatch_lib.RoutePlan(
        keras.ops.convert_to_tensor(order.astype("int32")),
        num_experts,
        capacity,
        None if valid is None else keras.ops.convert_to_tensor(valid),
        method=method,
        priority=(
            keras.ops.convert_to_tensor(weights)
            if policy == "probability"
            else None
        ),
    )
    kept = keras.ops.convert_to_numpy(plan.kept).reshape(order.shape)
    return plan, kept


def _check_slots(plan, kept, order, capacity):
    """The inverse map holds exactly the kept assignments, each once, in
    its own expert's slots."""
    filled = keras.ops.convert_to_numpy(plan.slot_filled)
    held = keras.ops.convert_to_numpy(plan.slot_assignment)[filled]
    assert sorted(held.tolist()) == np.flatnonzero(kept.reshape(-1)).tolist()
    slots = np.flatnonzero(filled)
    np.testing.assert_array_equal(slots // capacity, order.reshape(-1)[held])


# --- the plan against NumPy ----------------------------------------------


@pytest.mark.parametrize("method", ["one_hot", "sort"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("masked", [False, True])
def test_plan_keeps_what_the_reference_keeps(method, policy, masked):
    rng = np.random.RandomState(0)
    tokens, k, experts, capacity = 12, 2, 3, 3
    order = np.stack(
        [rng.choice(experts, k, replace=False) for _ in range(tokens)]
    )
    # Few distinct weights: many ties, broken by the position order.
    weights = rng.choice([0.2, 0.3, 0.5], size=(tokens, k)).astype("float32")
    valid = rng.rand(tokens) > 0.3 if masked else None
    plan, kept = _plan_kept(
        order, weights, experts, capacity, valid, policy, method
    )
    expected = _keep(policy, order, weights, experts, capacity, valid)
    np.testing.assert_array_equal(kept, expected)
    _check_slots(plan, kept, order, capacity)
    if masked:
        assert not kept[~valid].any()
    # Either policy fills each expert up to its capacity: the same count.
    other = _keep(
        "position" if policy == "probability" else "probability",
        order,
        weights,
        experts,
        capacity,
        valid,
    )
    assert kept.sum() == other.sum()
    routed = tokens * k if valid is None else valid.sum() * k
    assert float(keras.ops.convert_to_numpy(plan.dropped)) == (
        routed - expected.sum()
    )


def test_probability_policy_keeps_the_heaviest():
    # One slot per expert. Expert 0: token 2's second choice (0.9)
    # outweighs the first choices of tokens 0 and 1, so it keeps the slot
    # under "probability", token 0 under "position"; expert 1: token 0's
    # second choice (0.4) beats token 2's first (0.1) by weight only.
    order = np.array([[0, 1], [0, 2], [1, 0]])
    weights = np.array([[0.6, 0.4], [0.55, 0.45], [0.1, 0.9]], "float32")
    _, by_position = _plan_kept(order, weights, 3, 1, None, "position", None)
    _, by_weight = _plan_kept(order, weights, 3, 1, None, "probability", None)
    assert by_position.tolist() == [[True, False], [False, True], [True, False]]
    assert by_weight.tolist() == [[False, True], [False, True], [False, True]]


@pytest.mark.parametrize("partitioned", [False, True])
def test_group_plan_keeps_what_the_reference_keeps(partitioned):
    rng = np.random.RandomState(1)
    groups, size, k, experts, capacity = 3, 8, 2, 4, 2
    order = np.stack(
        [
            np.stack(
                [rng.choice(experts, k, replace=False) for _ in range(size)]
            )
            for _ in range(groups)
        ]
    )
    weights = rng.choice([0.1, 0.4, 0.7], size=(groups, size, k))
    valid = rng.rand(groups, size) > 0.2
    plan = group_dispatch.GroupRoutePlan(
        keras.ops.convert_to_tensor(order.astype("int32")),
        experts,
        capacity,
        keras.ops.convert_to_tensor(valid),
        partitioned=partitioned,
        priority=keras.ops.convert_to_tensor(weights.astype("float32")),
    )
    kept = keras.ops.convert_to_numpy(plan.kept).reshape(order.shape)
    for g in range(groups):
        np.testing.assert_array_equal(
            kept[g],
            reference.capacity_keep_by_probability(
                order[g], weights[g], experts, capacity, valid[g]
            ),
        )
        filled = keras.ops.convert_to_numpy(plan.slot_filled)[g]
        held = keras.ops.convert_to_numpy(plan.slot_assignment)[g][filled]
        assert sorted(held.tolist()) == (
            np.flatnonzero(kept[g].reshape(-1)).tolist()
        )


# --- the layer against NumPy ---------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "num_experts, top_k",
    [(4, 2), (80, 6)],  # one-hot and sorting plans
)
def test_layer_matches_reference(policy, num_experts, top_k):
    layer = MoE(
        num_experts=num_experts,
        units=5,
        top_k=top_k,
        dispatch="sparse",
        capacity_factor=0.5,
        drop_policy=policy,
    )
    x = _x((2, 16, 3))
    mask = np.ones((2, 16), bool)
    mask[1, 11:] = False
    layer.build(x.shape)
    _randomize(layer)
    y = keras.ops.convert_to_numpy(layer(x, mask=mask, training=True))
    capacity = dispatch_lib.capacity(32, top_k, num_experts, 0.5)
    flat = x.reshape(-1, 3)
    valid = mask.reshape(-1)
    expected = reference.moe_forward(layer, flat, capacity, valid)
    np.testing.assert_allclose(y.reshape(-1, 5), expected, rtol=1e-4, atol=1e-4)
    assert np.all(y[~mask] == 0)

    # The dropped fraction: the reference's, and the same for both
    # policies (each fills every expert up to its capacity).
    probs, _ = reference.gate_forward(layer.gate, flat)
    weights, order = reference.top_k_weights(probs, top_k, normalize=top_k > 1)
    rows = np.arange(32)[:, None]
    keeps = [
        _keep(p, order, weights[rows, order], num_experts, capacity, valid)
        for p in POLICIES
    ]
    assert keeps[0].sum() == keeps[1].sum()
    dropped = 1 - keeps[0].sum() / (valid.sum() * top_k)
    assert dropped > 0  # the capacity overflows
    result = layer.statistics.result("train")["dropped_fraction"]
    assert result == pytest.approx(dropped)
    if policy == "probability":
        # The policies differ here, or the test would prove nothing.
        assert not np.array_equal(keeps[0], keeps[1])


def test_policies_differ_in_output_and_agree_without_capacity():
    kwargs = dict(num_experts=4, units=5, top_k=2, dispatch="sparse")
    layers = [
        MoE(capacity_factor=0.5, drop_policy=p, **kwargs) for p in POLICIES
    ]
    x = _x((32, 3))
    for layer in layers:
        layer.build(x.shape)
        _randomize(layer)
    trained = [
        keras.ops.convert_to_numpy(lyr(x, training=True)) for lyr in layers
    ]
    assert not np.allclose(trained[0], trained[1])
    # Inference is dropless by default: the policy plays no part.
    dropless = [keras.ops.convert_to_numpy(lyr(x)) for lyr in layers]
    np.testing.assert_array_equal(dropless[0], dropless[1])


def test_eval_capacity_factor_uses_the_policy():
    layer = MoE(
        num_experts=4,
        units=5,
        top_k=2,
        dispatch="sparse",
        capacity_factor=None,
        eval_capacity_factor=0.5,
        drop_policy="probability",
    )
    x = _x((32, 3))
    layer.build(x.shape)
    _randomize(layer)
    capacity = dispatch_lib.capacity(32, 2, 4, 0.5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        reference.moe_forward(layer, x, capacity),
        rtol=1e-4,
        atol=1e-4,
    )
    # Training is dropless here: the reference without capacity.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x, training=True)),
        reference.moe_forward(layer, x),
        rtol=1e-4,
        atol=1e-4,
    )


def test_tied_weights_keep_the_position_order():
    # A zero router ties every expert: all weights equal, so the
    # probability policy keeps exactly what the position policy keeps.
    layers = []
    for policy in POLICIES:
        layer = MoE(
            num_experts=4,
            units=5,
            top_k=2,
            dispatch="sparse",
            capacity_factor=0.5,
            drop_policy=policy,
        )
        layer.build((16, 3))
        _randomize(layer)
        layer.gate.kernel.assign(np.zeros((3, 4), "float32"))
        if layer.gate.bias is not None:
            layer.gate.bias.assign(np.zeros((4,), "float32"))
        layers.append(layer)
    layers[1].experts.set_weights(layers[0].experts.get_weights())
    x = _x((16, 3))
    ys = [keras.ops.convert_to_numpy(lyr(x, training=True)) for lyr in layers]
    np.testing.assert_array_equal(ys[0], ys[1])
    capacity = dispatch_lib.capacity(16, 2, 4, 0.5)
    np.testing.assert_allclose(
        ys[1], reference.moe_forward(layers[1], x, capacity), atol=1e-5
    )


def test_token_groups_match_the_reference_per_group():
    layer = MoE(
        num_experts=4,
        units=5,
        top_k=2,
        dispatch="sparse",
        capacity_factor=0.5,
        token_groups=2,
        drop_policy="probability",
    )
    x = _x((32, 3))
    layer.build(x.shape)
    _randomize(layer)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    capacity = dispatch_lib.capacity(16, 2, 4, 0.5)
    expected = np.concatenate(
        [reference.moe_forward(layer, x[:16], capacity)]
        + [reference.moe_forward(layer, x[16:], capacity)]
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


# --- training ---------------------------------------------------------------


@pytest.mark.parametrize(
    "jit_compile", [False, pytest.param(True, marks=NO_JIT)]
)
def test_fit_with_probability_drops(jit_compile):
    inputs = keras.Input((8, 3))
    layer = MoE(
        num_experts=4,
        units=2,
        top_k=2,
        dispatch="sparse",
        capacity_factor=0.5,
        drop_policy="probability",
    )
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse", jit_compile=jit_compile)
    # A partial last batch: the capacity follows the batch's tokens.
    history = model.fit(
        _x((10, 8, 3)), _x((10, 8, 2), 1), batch_size=4, epochs=2, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))
    for w in model.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(w)))


def test_gradients_are_finite_and_reach_the_router():
    layer = MoE(
        num_experts=4,
        units=2,
        top_k=2,
        dispatch="sparse",
        capacity_factor=0.5,
        drop_policy="probability",
    )
    x = _x((16, 3))
    layer.build(x.shape)
    _randomize(layer)
    values = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]

    def fn(x, *values):
        out, _ = layer.stateless_call(
            list(values),
            [v.value for v in layer.non_trainable_variables],
            x,
            training=True,
        )
        return out

    grads = gradients(fn, x, *values)
    for g in grads:
        assert np.all(np.isfinite(g))
    names = [w.path for w in layer.trainable_weights]
    router = next(i for i, n in enumerate(names) if "gate" in n)
    assert np.any(grads[router] != 0)


# --- config and validation --------------------------------------------------


def test_config_and_keras_file_round_trip(tmp_path):
    inputs = keras.Input((8, 3))
    layer = MoE(
        num_experts=4,
        units=2,
        top_k=2,
        dispatch="sparse",
        capacity_factor=0.5,
        eval_capacity_factor=0.5,
        drop_policy="probability",
    )
    model = keras.Model(inputs, layer(inputs))
    config = layer.get_config()
    assert config["drop_policy"] == "probability"
    revived = MoE.from_config(config)
    assert revived.drop_policy == "probability"
    assert revived.get_config() == config
    assert MoE(num_experts=4, units=2, top_k=2).drop_policy == "position"

    reloaded = reload_keras_file(model, _x((4, 8, 3)), tmp_path)
    assert reloaded.layers[-1].drop_policy == "probability"


@pytest.mark.parametrize("value", ["probs", "Position", None, 1])
def test_unknown_policy_is_an_error(value):
    with pytest.raises(ValueError, match="drop_policy"):
        MoE(num_experts=4, units=2, top_k=2, drop_policy=value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=None),
        dict(top_k=None, dispatch="dense"),
        dict(gate=gates_lib.ExpertChoiceGate(), capacity_factor=1.0),
    ],
)
def test_policy_needs_token_choice_top_k(kwargs):
    with pytest.raises(ValueError, match="drop_policy"):
        MoE(num_experts=4, units=2, drop_policy="probability", **kwargs)
    # The default is accepted everywhere.
    MoE(num_experts=4, units=2, drop_policy="position", **kwargs)


# --- property ---------------------------------------------------------------

SETTINGS = derandomized(25, jax_examples=4)


@st.composite
def routings(draw):
    experts = draw(st.integers(1, 6), label="E")
    k = draw(st.integers(1, experts), label="k")
    tokens = draw(st.integers(0, 12), label="tokens")
    capacity = draw(st.integers(1, max(tokens, 1)), label="capacity")
    rng = np.random.RandomState(draw(st.integers(0, 2**16), label="seed"))
    order = np.array(
        [rng.choice(experts, k, replace=False) for _ in range(tokens)],
        dtype="int32",
    ).reshape(tokens, k)
    # A coarse grid of weights makes ties common.
    levels = draw(st.sampled_from([2, 5, 1000]), label="levels")
    weights = (rng.randint(0, levels, (tokens, k)) / levels).astype("float32")
    valid = None
    if draw(st.booleans(), label="masked"):
        valid = rng.rand(tokens) > 0.3
    method = draw(st.sampled_from(["one_hot", "sort"]), label="method")
    return order, weights, experts, capacity, valid, method


@SETTINGS
@given(routings())
def test_probability_policy_property(routing):
    order, weights, experts, capacity, valid, method = routing
    plan, kept = _plan_kept(
        order, weights, experts, capacity, valid, "probability", method
    )
    expected = reference.capacity_keep_by_probability(
        order, weights, experts, capacity, valid
    )
    np.testing.assert_array_equal(kept, expected)
    _check_slots(plan, kept, order, capacity)
    # The same number kept as by position.
    assert expected.sum() == (
        reference.capacity_keep(order, experts, capacity, valid).sum()
    )
