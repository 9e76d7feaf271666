import math
from fractions import Fraction

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from moe_keras import dispatch
from tests import reference
from tests.grad_utils import gradients


def _routing(tokens, experts, k, seed=0):
    rng = np.random.RandomState(seed)
    # Skewed scores so that some experts overflow a tight capacity.
    scores = rng.normal(size=(tokens, experts)) + np.linspace(0, 2, experts)
    order = np.argsort(-scores, -1)[:, :k].astype("int32")
    weights = rng.uniform(0.1, 1.0, size=(tokens, k)).astype("float32")
    return order, weights


@pytest.mark.parametrize(
    "tokens, experts, k, capacity",
    [(12, 4, 1, 2), (12, 4, 2, 3), (16, 8, 3, 2), (5, 3, 3, 5)],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("method", dispatch.PLAN_METHODS)
def test_plan_keeps_what_fits_first_choices_first(
    tokens, experts, k, capacity, masked, method
):
    order, _ = _routing(tokens, experts, k)
    valid = (
        np.random.RandomState(1).uniform(size=tokens) > 0.3 if masked else None
    )
    plan = dispatch.RoutePlan(order, experts, capacity, valid, method=method)
    expected = reference.capacity_keep(order, experts, capacity, valid)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(plan.kept).reshape(tokens, k), expected
    )
    routed = (valid.sum() if masked else tokens) * k
    assert float(plan.routed) == routed
    assert float(plan.dropped) == routed - expected.sum()


@pytest.mark.parametrize("method", dispatch.PLAN_METHODS)
def test_dropless_blocks_hold_every_assignment_with_bounded_padding(method):
    tokens, experts, k = 300, 8, 2
    order, _ = _routing(tokens, experts, k)
    plan = dispatch.RoutePlan(order, experts, None, method=method)
    size = plan.group_size
    assert plan.num_groups * size <= tokens * k + experts * (size - 1)
    assert float(keras.ops.convert_to_numpy(plan.kept).sum()) == tokens * k
    slots = keras.ops.convert_to_numpy(plan.assignment_slot)
    assert len(np.unique(slots)) == tokens * k  # one slot each
    # Every assignment sits in a block of the expert it chose.
    group_expert = keras.ops.convert_to_numpy(plan.group_expert)
    np.testing.assert_array_equal(group_expert[slots // size], order.ravel())


def test_capacity_formula():
    assert dispatch.capacity(4096, 2, 8, 1.0) == 1024
    assert dispatch.capacity(4096, 2, 8, 1.25) == 1280
    assert dispatch.capacity(10, 2, 8, 1.0) == 3  # ceil(2.5)
    assert dispatch.capacity(3, 2, 8, 100.0) == 3  # never more than tokens
    assert dispatch.capacity(1, 1, 64, 1.0) == 1  # never zero
    assert dispatch.capacity(40, 2, 8, None) is None  # dropless


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    data=st.data(),
    top_k=st.integers(1, 8),
    capacity_factor=st.one_of(
        st.sampled_from([1.0, 1.25, 1.2345678, 0.1, 3.0, 1e-3, 1e3]),
        st.floats(1e-4, 1e4, allow_nan=False, allow_infinity=False),
    ),
)
def test_capacity_is_the_same_for_an_int_and_a_tensor_token_count(
    data, top_k, capacity_factor
):
    # A tensor count is what TensorFlow sees for an unknown batch size (a
    # partial last batch in `fit`); it must not change C, up to the largest
    # token count whose assignments an int32 can number.
    num_experts = data.draw(st.integers(top_k, 256), label="num_experts")
    limit = (2**31 - 1) // top_k
    tokens = data.draw(
        st.one_of(st.integers(0, 64), st.integers(0, limit)), label="tokens"
    )
    c = dispatch.capacity(tokens, top_k, num_experts, capacity_factor)
    as_tensor = dispatch.capacity(
        ops.convert_to_tensor(tokens, "int32"),
        top_k,
        num_experts,
        capacity_factor,
    )
    assert int(keras.ops.convert_to_numpy(as_tensor)) == c
    # And C is ceil(capacity_factor * tokens * k / E) clamped to
    # [1, tokens], up to the ratio's rounding to a 2**20 denominator.
    exact = math.ceil(Fraction(capacity_factor) * tokens * top_k / num_experts)
    exact = max(1, min(exact, tokens))
    bound = tokens // (1 << 20) + 1
    assert abs(c - exact) <= bound


def _numpy_dispatch_combine(x, order, weights, experts, capacity, expert_fn):
    keep = reference.capacity_keep(order, experts, capacity)
    out = np.zeros((x.shape[0], expert_fn(x, 0).shape[-1]), "float32")
    for t in range(x.shape[0]):
        for j in range(order.shape[1]):
            if keep[t, j]:
                out[t] += (
                    weights[t, j] * expert_fn(x[t : t + 1], order[t, j])[0]
                )
    return out


@pytest.mark.parametrize(
    "tokens, capacity",
    [(16, 2), (16, 6), (16, 16), (16, None), (64, None), (200, None)],
)
@pytest.mark.parametrize("method", dispatch.PLAN_METHODS)
def test_dispatch_combine_forward_and_gradients(tokens, capacity, method):
    """Capacity buffers, and (capacity=None) the dropless block layout."""
    experts, k, d, u = 4, 2, 5, 3
    order, weights = _routing(tokens, experts, k, seed=tokens)
    rng = np.random.RandomState(2)
    x = rng.normal(size=(tokens, d)).astype("float32")
    kernels = rng.normal(size=(experts, d, u)).astype("float32")
    plan = dispatch.RoutePlan(order, experts, capacity, method=method)
    if capacity is None:
        assert float(plan.dropped) == 0.0
        capacity = tokens * k  # the references then keep everything

    def sparse(x, weights, kernels):
        buffers = dispatch.dispatch(x, plan)
        if plan.group_expert is not None:
            kernels = ops.take(kernels, plan.group_expert, axis=0)
        outputs = ops.einsum("gcd,gdu->gcu", buffers, kernels)
        return dispatch.combine(outputs, weights, plan)

    expected = _numpy_dispatch_combine(
        x, order, weights, experts, capacity, lambda v, e: v @ kernels[e]
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sparse(x, weights, kernels)),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )

    # The hand-written gradients equal autodiff through a dense, masked
    # formulation of the same function.
    keep = reference.capacity_keep(order, experts, capacity).astype("float32")
    onehot = np.eye(experts, dtype="float32")[order]  # [T, k, E]

    def dense(x, weights, kernels):
        every = ops.einsum("td,edu->teu", x, kernels)
        kept = ops.multiply(weights, keep)
        combine = ops.einsum("tk,tke->te", kept, onehot)
        return ops.einsum("te,teu->tu", combine, every)

    for got, want in zip(
        gradients(sparse, x, weights, kernels),
        gradients(dense, x, weights, kernels),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens, capacity", [(16, 2), (16, 6), (40, None)])
def test_slot_weights_then_gather_sum_equals_weighted_combine(tokens, capacity):
    """Experts that scale their own rows by `slot_weights`, then a
    weightless combine: the same function, and gradients, as combining
    with the weights, drops included."""
    experts, k, d, u = 4, 2, 5, 3
    order, weights = _routing(tokens, experts, k, seed=tokens + 1)
    rng = np.random.RandomState(3)
    x = rng.normal(size=(tokens, d)).astype("float32")
    kernels = rng.normal(size=(experts, d, u)).astype("float32")
    plan = dispatch.RoutePlan(order, experts, capacity)

    def expert_outputs(x, kernels):
        buffers = dispatch.dispatch(x, plan)
        if plan.group_expert is not None:
            kernels = ops.take(kernels, plan.group_expert, axis=0)
        return ops.tanh(ops.einsum("gcd,gdu->gcu", buffers, kernels))

    def folded(x, weights, kernels):
        scale = dispatch.slot_weights(weights, plan)[..., None]
        return dispatch.combine(expert_outputs(x, kernels) * scale, None, plan)

    def weighted(x, weights, kernels):
        return dispatch.combine(expert_outputs(x, kernels), weights, plan)

    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded(x, weights, kernels)),
        keras.ops.convert_to_numpy(weighted(x, weights, kernels)),
        rtol=1e-5,
        atol=1e-6,
    )
    for got, want in zip(
        gradients(folded, x, weights, kernels),
        gradients(weighted, x, weights, kernels),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 255, 256, 300, 1024])
def test_exclusive_cumsum_matches_numpy(rows):
    values = np.random.RandomState(rows).randint(0, 2, size=(rows, 7))
    values = values.astype("int32")
    expected = np.cumsum(values, axis=0) - values
    got = keras.ops.convert_to_numpy(dispatch._exclusive_cumsum(values))
    np.testing.assert_array_equal(got, expected)


def test_exclusive_cumsum_is_exact_past_float32_integers():
    # A running count past 2**24 (float32's last exact integer): every
    # assignment of a huge batch to one expert.
    rows = 2**24 + 300
    got = dispatch._exclusive_cumsum(np.ones((rows, 1), "int32"))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(got[-300:, 0]), np.arange(rows - 300, rows)
    )


@settings(
    # JAX compiles each new shape of an eager op: fewer draws there.
    max_examples=5 if keras.backend.backend() == "jax" else 60,
    deadline=None,
    derandomize=True,
)
@given(
    experts=st.integers(1, 9),
    tokens=st.sampled_from([0, 1, 2, 5, 17, 40]),
    data=st.data(),
)
def test_sorting_and_one_hot_plans_are_the_same_plan(experts, tokens, data):
    k = data.draw(st.integers(1, experts), label="k")
    capacity_factor = data.draw(
        st.sampled_from([None, 0.5, 1.0, 1.25]), label="capacity_factor"
    )
    masked = data.draw(st.booleans(), label="masked")
    rng = np.random.default_rng(tokens * 10 + experts)
    order = np.array(
        [rng.permutation(experts)[:k] for _ in range(tokens)], "int32"
    ).reshape(tokens, k)
    valid = rng.random(tokens) > 0.3 if masked else None
    capacity = dispatch.capacity(tokens, k, experts, capacity_factor)
    one_hot, by_sort = (
        dispatch.RoutePlan(order, experts, capacity, valid, method=method)
        for method in ("one_hot", "sort")
    )
    for name in ("kept", "assignment_slot", "slot_filled", "expert_counts"):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(getattr(by_sort, name)),
            ops.convert_to_numpy(getattr(one_hot, name)),
            err_msg=name,
        )
    filled = ops.convert_to_numpy(one_hot.slot_filled)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(by_sort.slot_assignment)[filled],
        ops.convert_to_numpy(one_hot.slot_assignment)[filled],
    )
    assert float(by_sort.dropped) == float(one_hot.dropped)


def test_plan_method_is_checked_and_sorts_for_many_experts():
    assert dispatch.plan_method(32) == "one_hot"
    assert dispatch.plan_method(129) == "sort"
    with pytest.raises(ValueError, match="method"):
        dispatch.RoutePlan(np.zeros((2, 1), "int32"), 2, 1, method="scan")
