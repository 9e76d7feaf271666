"""`MoE(overflow="spill")`: an assignment that finds its expert full moves
to the token's next-ranked expert with room, checked against the NumPy
reference `reference.capacity_spill`."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moe_keras
from moe_keras import MoE
from moe_keras import _spill
from moe_keras import dispatch as dispatch_lib
from tests import reference
from tests.backend_marks import NO_JIT
from tests.backend_marks import derandomized
from tests.grad_utils import gradients
from tests.layer_test_utils import reload_keras_file

BACKEND = keras.backend.backend()


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _layer(x, seed=3, **kwargs):
    options = dict(num_experts=4, units=5, top_k=2, capacity_factor=0.75)
    options.update(kwargs)
    layer = MoE(dispatch="sparse", overflow="spill", **options)
    layer.build(x.shape)
    rng = np.random.RandomState(seed)
    for w in layer.trainable_weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))
    return layer


def _expected(layer, flat, tokens, valid=None):
    capacity = dispatch_lib.capacity(
        tokens, layer.top_k, layer.num_experts, layer.capacity_factor
    )
    return reference.moe_forward(layer, flat, capacity, valid), capacity


# --- the layer against NumPy ---------------------------------------------


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("num_experts, top_k, rounds", [(4, 2, 2), (5, 1, 1)])
def test_layer_matches_reference(policy, num_experts, top_k, rounds):
    x = _x((2, 12, 3))
    mask = np.ones((2, 12), bool)
    mask[1, 8:] = False
    layer = _layer(
        x,
        num_experts=num_experts,
        top_k=top_k,
        drop_policy=policy,
        spill_rounds=rounds,
    )
    y = _np(layer(x, mask=mask, training=True))
    flat, valid = x.reshape(-1, 3), mask.reshape(-1)
    expected, capacity = _expected(layer, flat, 24, valid)
    np.testing.assert_allclose(y.reshape(-1, 5), expected, atol=1e-4)
    assert np.all(y[~mask] == 0)

    # Spilling moved something and dropped less than dropping does.
    probs, _ = reference.gate_forward(layer.gate, flat)
    weights, order = reference.top_k_weights(probs, top_k, top_k > 1)
    rows = np.arange(24)[:, None]
    priority = weights[rows, order] if policy == "probability" else None
    final, placed = reference.capacity_spill(
        order, probs, num_experts, capacity, rounds, valid, priority
    )
    kept = reference.capacity_keep(order, num_experts, capacity, valid)
    assert (final != order).any()
    assert placed.sum() > kept.sum()
    assert not placed[~valid].any()
    dropped = 1 - placed.sum() / (valid.sum() * top_k)
    result = layer.statistics.result("train")["dropped_fraction"]
    assert result == pytest.approx(dropped)


def test_token_groups_spill_within_each_group():
    x = _x((24, 3), 1)
    layer = _layer(x, token_groups=2)
    y = _np(layer(x, training=True))
    capacity = dispatch_lib.capacity(12, 2, 4, 0.75)
    expected = np.concatenate(
        [reference.moe_forward(layer, x[i : i + 12], capacity) for i in (0, 12)]
    )
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_spill_ranks_by_the_selection_scores_before_the_bias_moves():
    # Group-limited routing with a selection bias: the spill stays in each
    # position's groups and ranks by probs + the bias the top-k used.
    x = _x((16, 3), 2)
    gate = moe_keras.SigmoidGate(
        expert_groups=3, top_groups=2, bias_update_rate=0.5
    )
    layer = _layer(x, num_experts=6, gate=gate)
    bias = np.array([0.3, -0.2, 0.0, 0.4, -0.1, 0.2], "float32")
    gate.selection_bias.assign(bias)
    y = _np(layer(x, training=True))
    assert not np.allclose(_np(gate.selection_bias), bias)  # it moved

    probs, _ = reference.gate_forward(gate, x)
    scores = probs + bias
    _, eligible, order, _ = reference.group_limited_top_k(
        scores, probs, 2, 3, 2
    )
    capacity = dispatch_lib.capacity(16, 2, 6, 0.75)
    final, placed = reference.capacity_spill(
        order, np.where(eligible, scores, -np.inf), 6, capacity, 2
    )
    assert (final != order).any()
    rows = np.arange(16)[:, None]
    assert eligible[rows, final].all()
    weights = np.zeros_like(probs)
    weights[rows, final] = probs[rows, final] * placed  # sigmoid: no norm
    outs = reference.experts_forward(layer.experts, x)
    expected = np.einsum("te,teu->tu", weights, outs)
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_nothing_to_spill_changes_nothing():
    # Dropless (inference by default, or capacity_factor=None) and dense
    # dispatch have no overflow: spill and drop give the same output.
    x = _x((16, 3))
    spill = _layer(x, capacity_factor=None)
    drop = MoE(num_experts=4, units=5, top_k=2, capacity_factor=None)
    drop.build(x.shape)
    drop.set_weights(spill.get_weights())
    for training in (True, False):
        np.testing.assert_array_equal(
            _np(spill(x, training=training)), _np(drop(x, training=training))
        )
    dense = MoE(
        num_experts=4, units=5, top_k=2, dispatch="dense", overflow="spill"
    )
    dense.build(x.shape)
    dense.set_weights(spill.get_weights())
    np.testing.assert_allclose(
        _np(dense(x, training=True)), _np(drop(x, training=True)), atol=1e-5
    )


@pytest.mark.parametrize("method", ["one_hot", "sort"])
def test_plan_routes_assignments_given_one_by_one(method):
    order = np.array([[0, 1], [0, 2], [1, 0], [2, 1]], "int32")
    placed = np.array([[True, False], [True, True], [False, True], [1, 1]])
    plan = dispatch_lib.RoutePlan(
        keras.ops.convert_to_tensor(order),
        3,
        4,
        keras.ops.convert_to_tensor(placed.astype(bool)),
        method=method,
    )
    kept = _np(plan.kept).reshape(4, 2)
    np.testing.assert_array_equal(kept, placed.astype(bool))
    filled = _np(plan.slot_filled)
    held = _np(plan.slot_assignment)[filled]
    assert sorted(held.tolist()) == np.flatnonzero(kept.reshape(-1)).tolist()
    assert float(_np(plan.routed)) == placed.sum()


@NO_JIT
@pytest.mark.parametrize("token_groups", [None, 3])
def test_jit_fit_with_a_partial_last_batch(token_groups):
    # The last batch has fewer tokens: the capacity and the spill rounds
    # run on a batch size known only at run time (and, with groups,
    # padding tokens that must not spill).
    inputs = keras.Input((5, 3))
    layer = MoE(
        num_experts=4,
        units=2,
        top_k=2,
        capacity_factor=0.75,
        eval_capacity_factor=0.75,
        overflow="spill",
        token_groups=token_groups,
    )
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(
        _x((10, 5, 3)), _x((10, 5, 2), 1), batch_size=4, epochs=2, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(model.predict(_x((3, 5, 3)), verbose=0)))


# --- gradients --------------------------------------------------------------


def test_router_gradient_matches_the_dense_equivalent():
    """The gradient of the sparse spill equals that of a dense mixture
    with the same final experts and weights, where the final assignment
    (a step function of the router) is held fixed."""
    x = _x((16, 3))
    layer = _layer(x)
    capacity = dispatch_lib.capacity(16, 2, 4, 0.75)
    probs, _ = reference.gate_forward(layer.gate, x)
    _, order = reference.top_k_weights(probs, 2, True)
    final, placed = reference.capacity_spill(order, probs, 4, capacity, 2)
    assert (final != order).any()
    outs = reference.experts_forward(layer.experts, x)  # [T, E, u]
    kernel = _np(layer.gate.kernel)
    others = [_np(w) for w in layer.non_trainable_weights]
    trainable = [_np(w) for w in layer.trainable_weights]
    index = next(
        i
        for i, w in enumerate(layer.trainable_weights)
        if w is layer.gate.kernel
    )

    def sparse(kernel):
        values = list(trainable)
        values[index] = kernel
        y, _ = layer.stateless_call(values, others, x, training=True)
        return y

    final_t = keras.ops.convert_to_tensor(final.astype("int32"))
    kept = keras.ops.convert_to_tensor(placed.astype("float32"))
    choice = keras.ops.one_hot(final_t, 4)  # [T, k, E]

    def dense(kernel):
        p = keras.ops.softmax(keras.ops.matmul(x, kernel), axis=-1)
        w = keras.ops.take_along_axis(p, final_t, axis=-1)  # [T, k]
        w = w / keras.ops.sum(w, axis=-1, keepdims=True) * kept
        w = keras.ops.einsum("tk,tke->te", w, choice)
        return keras.ops.einsum("te,teu->tu", w, outs)

    np.testing.assert_allclose(
        _np(sparse(kernel)), _np(dense(kernel)), atol=1e-4
    )
    (g_sparse,) = gradients(sparse, kernel)
    (g_dense,) = gradients(dense, kernel)
    assert np.abs(g_sparse).max() > 0
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-3, atol=1e-5)


# --- config and validation --------------------------------------------------


def test_config_and_keras_file_round_trip(tmp_path):
    inputs = keras.Input((8, 3))
    layer = MoE(
        num_experts=4,
        units=2,
        top_k=2,
        capacity_factor=0.5,
        eval_capacity_factor=0.5,
        overflow="spill",
        spill_rounds=1,
    )
    model = keras.Model(inputs, layer(inputs))
    config = layer.get_config()
    assert (config["overflow"], config["spill_rounds"]) == ("spill", 1)
    assert MoE.from_config(config).get_config() == config
    default = MoE(num_experts=4, units=2, top_k=2)
    assert (default.overflow, default.spill_rounds) == ("drop", 2)

    reloaded = reload_keras_file(model, _x((4, 8, 3)), tmp_path)
    assert reloaded.layers[-1].overflow == "spill"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(overflow="Spill"), "overflow"),
        (dict(overflow=None), "overflow"),
        (dict(overflow="spill", spill_rounds=0), "spill_rounds"),
        (dict(overflow="spill", spill_rounds=1.5), "spill_rounds"),
        (dict(spill_rounds=3), "spill_rounds"),
        (dict(overflow="spill", top_k=None), "top_k"),
        (
            dict(
                overflow="spill",
                top_k=None,
                gate=moe_keras.ExpertChoiceGate(),
            ),
            "token-choice",
        ),
        (
            dict(overflow="spill", gate=moe_keras.RoundRobinGate()),
            "by rule",
        ),
        (dict(overflow="spill", gate=moe_keras.FeatureGate()), "per-feature"),
        (
            dict(overflow="spill", gate=moe_keras.SoftmaxGate(dropout=0.1)),
            "dropout",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    options = dict(num_experts=4, units=2, top_k=2)
    options.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        MoE(**options)


# --- property ---------------------------------------------------------------

SETTINGS = derandomized(25, jax_examples=4)


@st.composite
def overflows(draw):
    experts = draw(st.integers(2, 6), label="E")
    k = draw(st.integers(1, experts - 1), label="k")
    rounds = draw(st.integers(1, experts - k), label="rounds")
    tokens = draw(st.integers(0, 10), label="tokens")
    capacity = draw(st.integers(1, max(tokens, 1)), label="capacity")
    rng = np.random.RandomState(draw(st.integers(0, 2**16), label="seed"))
    # A coarse grid of scores makes ties common; some experts ruled out.
    levels = draw(st.sampled_from([2, 5, 1000]), label="levels")
    scores = (rng.randint(0, levels, (tokens, experts)) / levels).astype(
        "float32"
    )
    scores[rng.rand(tokens, experts) < 0.15] = -np.inf
    valid = None
    if draw(st.booleans(), label="masked"):
        valid = rng.rand(tokens) > 0.3
    by_probability = draw(st.booleans(), label="probability")
    return scores, k, capacity, rounds, valid, by_probability


@SETTINGS
@given(overflows())
def test_spill_property(case):
    scores, k, capacity, rounds, valid, by_probability = case
    tokens, experts = scores.shape
    # The top-k by a stable sort (lower index first among ties); a row
    # with fewer than k finite scores still takes k experts.
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    rng = np.random.RandomState(tokens)
    priority = None
    if by_probability:
        priority = rng.choice([0.2, 0.5], size=(tokens, k)).astype("float32")
    final, placed = reference.capacity_spill(
        order, scores, experts, capacity, rounds, valid, priority
    )

    def tensor(a, dtype):
        return keras.ops.convert_to_tensor(np.asarray(a).astype(dtype))

    indices = tensor(order, "int32")
    plan = dispatch_lib.RoutePlan(
        indices,
        experts,
        capacity,
        None if valid is None else tensor(valid, "bool"),
        priority=None if priority is None else tensor(priority, "float32"),
    )
    ranked, usable = _spill.candidates(
        tensor(scores, "float32"), indices, rounds
    )
    routed = np.ones((tokens, k), bool)
    if valid is not None:
        routed &= valid[:, None]
    got, got_placed = _spill.spill(
        indices[None],
        keras.ops.reshape(plan.kept, (1, -1, k)),
        tensor(routed[None], "bool"),
        ranked[None],
        usable[None],
        capacity,
        experts,
        None if priority is None else tensor(priority[None], "float32"),
    )
    got, got_placed = _np(got)[0], _np(got_placed)[0]
    np.testing.assert_array_equal(got_placed, placed)
    np.testing.assert_array_equal(got[placed], final[placed])
    np.testing.assert_array_equal(got[~placed], order[~placed])
    # Invariants: no expert past its capacity, no token twice at one
    # expert, nothing placed before is lost, nothing masked is routed.
    counts = np.bincount(got[got_placed], minlength=experts)
    assert counts.max(initial=0) <= capacity
    for t in range(tokens):
        assert len(set(got[t])) == k
    kept = _np(plan.kept).reshape(tokens, k)
    assert (got_placed >= kept).all()
    assert not (got_placed & ~routed).any()
