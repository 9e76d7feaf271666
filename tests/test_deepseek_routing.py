"""DeepSeek-V3 routing: group-limited top-k, the routed scaling factor and
the sequence-wise balance loss, each against a NumPy reference written
from the formulas, through `MoE` (dense and dropless sparse dispatch),
`.keras` files and XLA."""

import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import MoE
from moe_keras import losses
from tests import reference
from tests.backend_marks import NO_JIT
from tests.layer_test_utils import reload_keras_file

GATES = [moe_keras.SoftmaxGate, moe_keras.SigmoidGate]


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _np(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _built_gate(gate_class, bias=None, seed=3, **kwargs):
    """A gate of 8 experts on 3 features, its kernel (and selection bias)
    random."""
    gate = gate_class(num_experts=8, **kwargs)
    gate.build((None, 3))
    rng = np.random.RandomState(seed)
    gate.kernel.assign(rng.normal(size=(3, 8)).astype("float32"))
    if bias is not None:
        gate.selection_bias.assign(bias)
    return gate


def _distribution(gate_class, probs):
    """The router's scores as a distribution, as the balance losses read
    them: softmax probabilities as they are, sigmoid scores over their
    sum."""
    if gate_class is moe_keras.SoftmaxGate:
        return probs
    return probs / probs.sum(-1, keepdims=True)


# --- group-limited top-k -----------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_group_limited_routing_matches_numpy(gate_class, with_bias):
    bias = None
    kwargs = dict(expert_groups=4, top_groups=2, routed_scaling_factor=2.5)
    if with_bias:
        # Aux-loss-free balancing: the bias steers the groups and the
        # choice, not the weights.
        kwargs["bias_update_rate"] = 0.1
        bias = np.random.RandomState(5).normal(size=8).astype("float32")
    gate = _built_gate(gate_class, bias, **kwargs)
    x = _x((16, 3))
    probs, _ = reference.gate_forward(gate, x)
    scores = probs + (bias if with_bias else 0.0)
    scores = scores.astype("float32")
    expected = reference.group_limited_top_k(scores, probs, 3, 4, 2)
    group_scores, eligible, order, chosen = expected

    np.testing.assert_allclose(
        _np(gate.group_scores(scores)), group_scores, rtol=1e-6
    )
    limited = _np(gate.limit_to_groups(scores))
    np.testing.assert_array_equal(np.isfinite(limited), eligible)
    np.testing.assert_array_equal(limited[eligible], scores[eligible])
    # Grouping changes the choice somewhere, or this would test nothing.
    plain_order = np.argsort(-scores, axis=-1, kind="stable")[:, :3]
    assert not np.array_equal(np.sort(order), np.sort(plain_order))

    routing = gate(x, routing=True, top_k=3)
    np.testing.assert_array_equal(_np(routing["indices"]), order)
    if gate_class is moe_keras.SoftmaxGate:  # renormalised for k > 1
        chosen = chosen / chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        _np(routing["weights"]), 2.5 * chosen, rtol=1e-5, atol=1e-6
    )
    # The probabilities are the gate's, unscaled.
    np.testing.assert_allclose(_np(routing["probs"]), probs, rtol=1e-5)


@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_group_limited_selection_breaks_ties_like_numpy(gate_class):
    gate = _built_gate(gate_class, expert_groups=4, top_groups=2)
    # Exact binary fractions, so that the ties are ties in float32.
    probs = np.array(
        [
            # Groups 0, 1 and 2 tie at 0.75: groups 0 and 1; then experts
            # 2 and 3 tie at 0.375: expert 2.
            [0.5, 0.25, 0.375, 0.375, 0.25, 0.5, 0.0, 0.0],
            # Group 0 (a tie for its first, counted twice) scores 0.5 and
            # beats groups 1 and 2 (0.4375, tied: group 1); expert 4, the
            # best score of all, is out; experts 0 and 1 tie: expert 0.
            [0.25, 0.25, 0.375, 0.0625, 0.4375, 0.0, 0.0, 0.0],
            # Every score equal: the first two groups, the first experts.
            [0.125] * 8,
        ],
        "float32",
    )
    _, eligible, order, _ = reference.group_limited_top_k(probs, probs, 2, 4, 2)
    np.testing.assert_array_equal(order, [[0, 2], [2, 0], [0, 1]])
    np.testing.assert_array_equal(
        eligible[1], [True, True, True, True, False, False, False, False]
    )
    np.testing.assert_array_equal(
        _np(gate.group_scores(probs)),
        [[0.75, 0.75, 0.75, 0.0], [0.5, 0.4375, 0.4375, 0.0], [0.25] * 4],
    )
    weights, indices = gate.select(probs, 2)
    np.testing.assert_array_equal(_np(indices), order)
    chosen = probs[np.arange(3)[:, None], order]
    if gate.normalizes(2):
        chosen = chosen / chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(weights), chosen, rtol=1e-6)


def test_groups_of_one_expert_score_by_that_expert():
    gate = _built_gate(moe_keras.SigmoidGate, expert_groups=8, top_groups=3)
    scores = _x((6, 8), 2)
    np.testing.assert_allclose(_np(gate.group_scores(scores)), scores)
    _, eligible, order, _ = reference.group_limited_top_k(
        scores, scores, 3, 8, 3
    )
    _, indices = gate.select(scores, 3)
    np.testing.assert_array_equal(_np(indices), order)
    # With one expert a group, the group limit is the plain top-k.
    plain = np.argsort(-scores, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(order, plain)


def test_top_k_may_take_every_eligible_expert():
    gate = _built_gate(moe_keras.SigmoidGate, expert_groups=4, top_groups=2)
    scores = _x((5, 8), 4)
    _, eligible, order, _ = reference.group_limited_top_k(
        scores, scores, 4, 4, 2
    )
    _, indices = gate.select(scores, 4)
    np.testing.assert_array_equal(_np(indices), order)
    chosen = np.zeros_like(eligible)
    chosen[np.arange(5)[:, None], order] = True
    np.testing.assert_array_equal(chosen, eligible)


# --- routed scaling factor ------------------------------------------------------


@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_routed_scaling_factor_scales_combine_weights_only(gate_class):
    gate = _built_gate(gate_class, routed_scaling_factor=2.5)
    x = _x((10, 3))
    probs, _ = reference.gate_forward(gate, x)
    normalize = gate_class is moe_keras.SoftmaxGate
    expected, order = reference.top_k_weights(probs, 2, normalize)
    routing = gate(x, routing=True, top_k=2)
    np.testing.assert_array_equal(_np(routing["indices"]), order)
    rows = np.arange(10)[:, None]
    np.testing.assert_allclose(
        _np(routing["weights"]), 2.5 * expected[rows, order], rtol=1e-5
    )
    np.testing.assert_allclose(_np(routing["probs"]), probs, rtol=1e-5)
    np.testing.assert_allclose(_np(gate(x)), probs, rtol=1e-5)
    # The dense mixture's weights are scaled too.
    dense = gate(x, routing=True, top_k=None)
    np.testing.assert_allclose(_np(dense["weights"]), 2.5 * probs, rtol=1e-5)


def test_routed_scaling_factor_leaves_the_balance_losses_alone():
    x = _x((2, 5, 3))
    layers = [
        MoE(8, 4, top_k=2, gate=moe_keras.SigmoidGate(routed_scaling_factor=s))
        for s in (1.0, 2.5)
    ]
    for layer in layers:
        layer(x)
    layers[1].set_weights(layers[0].get_weights())
    outputs = [_np(layer(x, training=True)) for layer in layers]
    first, second = ([float(_np(v)) for v in layer.losses] for layer in layers)
    assert len(first) == 2  # load balance, z-loss
    np.testing.assert_allclose(first, second, rtol=1e-6)
    # Without shared experts or biases the output scales with the weights.
    assert not np.allclose(outputs[0], outputs[1])


# --- through the MoE layer ---------------------------------------------------------


@pytest.mark.parametrize(
    "dispatch",
    [dict(dispatch="dense"), dict(dispatch="sparse", capacity_factor=None)],
    ids=["dense", "dropless"],
)
@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_moe_forward_with_groups_and_scaling_matches_numpy(
    gate_class, dispatch
):
    gate = gate_class(expert_groups=4, top_groups=2, routed_scaling_factor=1.5)
    layer = MoE(8, 4, hidden_units=5, activation="relu", gate=gate, top_k=3)
    layer = MoE.from_config({**layer.get_config(), **dispatch})
    x = _x((2, 5, 3))
    layer(x)
    rng = np.random.RandomState(9)
    for w in layer.weights:
        if w.trainable:
            w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))
    tokens = x.reshape(-1, 3)
    probs, _ = reference.gate_forward(layer.gate, tokens)
    _, _, order, chosen = reference.group_limited_top_k(probs, probs, 3, 4, 2)
    if gate_class is moe_keras.SoftmaxGate:
        chosen = chosen / chosen.sum(-1, keepdims=True)
    weights = np.zeros_like(probs)
    weights[np.arange(10)[:, None], order] = 1.5 * chosen
    expected = np.einsum(
        "te,teu->tu", weights, reference.experts_forward(layer.experts, tokens)
    )
    np.testing.assert_allclose(
        _np(layer(x)).reshape(-1, 4), expected, rtol=1e-4, atol=1e-5
    )


# --- sequence-wise balance loss -------------------------------------------------


def test_sequence_balance_loss_matches_numpy():
    rng = np.random.RandomState(0)
    probs = reference.softmax(rng.normal(size=(12, 6)))
    order = np.stack([rng.permutation(6)[:2] for _ in range(12)])
    # Three sequences of four tokens; the second is all padding.
    valid = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1], bool)
    for mask in (None, valid):
        expected = reference.sequence_balance_loss(
            probs, order, 6, 4, np.ones(12, bool) if mask is None else mask
        )
        got = losses.sequence_balance_loss(
            probs.astype("float32"), order, 6, 4, mask=mask
        )
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Garbage at padding counts for nothing; no token at all gives 0.
    garbage = probs.astype("float32").copy()
    garbage[~valid] = np.nan
    got = losses.sequence_balance_loss(garbage, order, 6, 4, mask=valid)
    np.testing.assert_allclose(
        float(got),
        reference.sequence_balance_loss(probs, order, 6, 4, valid),
        rtol=1e-5,
    )
    nothing = losses.sequence_balance_loss(
        probs, order, 6, 4, mask=np.zeros(12, bool)
    )
    assert float(nothing) == 0.0


@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_moe_adds_the_sequence_balance_loss(gate_class):
    layer = MoE(
        8,
        4,
        gate=gate_class(expert_groups=4, top_groups=2),
        top_k=2,
        load_balance_weight=0.0,
        z_loss_weight=0.0,
        sequence_balance_weight=0.3,
    )
    x = _x((3, 4, 3))
    mask = np.ones((3, 4), bool)
    mask[0, 2:] = False
    mask[2] = False  # a sequence of padding only
    x[~mask] = 50.0  # garbage the loss must not see
    layer(x)
    assert layer.losses == []  # inference adds no loss
    layer(x, mask=mask, training=True)
    (loss,) = layer.losses
    tokens = x.reshape(-1, 3)
    probs, _ = reference.gate_forward(layer.gate, tokens)
    _, _, order, _ = reference.group_limited_top_k(probs, probs, 2, 4, 2)
    expected = 0.3 * reference.sequence_balance_loss(
        _distribution(gate_class, probs), order, 8, 4, mask.reshape(-1)
    )
    np.testing.assert_allclose(float(_np(loss)), expected, rtol=1e-5)
    # The routing record keeps it, alone and in the total.
    result = layer.statistics.result("train")
    assert result["sequence_balance_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["aux_loss"] == pytest.approx(expected, rel=1e-5)


def test_sequence_balance_loss_gradient_reaches_the_router():
    """One SGD step on the sequence loss alone moves the router kernel by
    -lr times its gradient, taken here by finite differences of the NumPy
    loss (the choices held, as `f` is a count)."""
    inputs = keras.Input((4, 3))
    layer = MoE(
        8,
        4,
        gate=moe_keras.SigmoidGate(expert_groups=4, top_groups=2),
        top_k=2,
        load_balance_weight=0.0,
        z_loss_weight=0.0,
        sequence_balance_weight=1.0,
    )
    model = keras.Model(inputs, layer(inputs))
    model.compile(
        keras.optimizers.SGD(1.0),
        lambda y, p: 0.0 * keras.ops.mean(p),  # the added loss alone
    )
    x = _x((2, 4, 3))
    tokens = x.reshape(-1, 3).astype("float64")
    kernel = _np(layer.gate.kernel).astype("float64")
    _, _, order, _ = reference.group_limited_top_k(
        reference.sigmoid(tokens @ kernel).astype("float32"),
        reference.sigmoid(tokens @ kernel),
        2,
        4,
        2,
    )

    def loss(k):
        scores = reference.sigmoid(tokens @ k)
        return reference.sequence_balance_loss(
            _distribution(moe_keras.SigmoidGate, scores),
            order,
            8,
            4,
            np.ones(8, bool),
        )

    grad = np.zeros_like(kernel)
    eps = 1e-5
    for i in np.ndindex(kernel.shape):
        step = np.zeros_like(kernel)
        step[i] = eps
        grad[i] = (loss(kernel + step) - loss(kernel - step)) / (2 * eps)
    assert np.abs(grad).max() > 1e-3
    model.train_on_batch(x, np.zeros((2, 4, 4), "float32"))
    np.testing.assert_allclose(
        kernel - _np(layer.gate.kernel), grad, rtol=1e-3, atol=1e-6
    )


# --- validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expert_groups=4), "top_groups"),
        (dict(top_groups=2), "expert_groups"),
        (dict(expert_groups=0, top_groups=1), "expert_groups"),
        (dict(expert_groups=4, top_groups=0), "top_groups"),
        (dict(expert_groups=4.0, top_groups=2), "expert_groups"),
        (dict(expert_groups=2, top_groups=3), "top_groups=3"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
        (dict(routed_scaling_factor="2"), "routed_scaling_factor"),
    ],
)
@pytest.mark.parametrize("gate_class", GATES, ids=lambda c: c.__name__)
def test_bad_gate_options(gate_class, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gate_class(**kwargs)


def test_groups_must_divide_the_experts():
    message = "expert_groups=4.*num_experts=6"
    with pytest.raises(ValueError, match=message):
        moe_keras.SoftmaxGate(num_experts=6, expert_groups=4, top_groups=1)
    with pytest.raises(ValueError, match=message):
        MoE(6, 4, gate=moe_keras.SoftmaxGate(expert_groups=4, top_groups=1))
    gate = moe_keras.SigmoidGate(expert_groups=4, top_groups=1)
    gate.num_experts = 6  # learned at build
    with pytest.raises(ValueError, match=message):
        gate(_x((2, 3)))


def test_top_k_must_fit_in_the_top_groups():
    # 8 experts in 4 groups, 1 group a position: 2 experts to choose from.
    message = r"top_k=3.*top_groups=1.*expert_groups=4.*1 \* 8 / 4 = 2"
    with pytest.raises(ValueError, match=message):
        MoE(
            8,
            4,
            top_k=3,
            gate=moe_keras.SoftmaxGate(expert_groups=4, top_groups=1),
        )
    gate = _built_gate(moe_keras.SigmoidGate, expert_groups=4, top_groups=1)
    with pytest.raises(ValueError, match=message):
        gate(_x((2, 3)), routing=True, top_k=3)
    # Groups choose among experts: the dense mixture has no choice.
    with pytest.raises(ValueError, match="top_k=None"):
        gate(_x((2, 3)), routing=True, top_k=None)
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 4, gate=moe_keras.SoftmaxGate(expert_groups=4, top_groups=1))


@pytest.mark.parametrize(
    "make",
    [
        lambda kw: moe_keras.StaticGate(**kw),
        lambda kw: moe_keras.PerformanceGate(**kw),
        lambda kw: moe_keras.HashGate(**kw),
        lambda kw: moe_keras.RoundRobinGate(**kw),
        lambda kw: moe_keras.FeatureGate(input_dependent=False, **kw),
        lambda kw: moe_keras.ExpertChoiceGate(**kw),
    ],
    ids=["static", "performance", "hash", "round_robin", "feature", "ec"],
)
@pytest.mark.parametrize(
    "kwargs",
    [dict(expert_groups=2, top_groups=1), dict(routed_scaling_factor=2.0)],
    ids=["groups", "scaling"],
)
def test_gates_without_a_top_k_of_their_inputs_reject_the_options(make, kwargs):
    option = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{option}`"):
        make(kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sequence_balance_weight=-0.1, top_k=2), "sequence_balance"),
        (dict(sequence_balance_weight=0.1), "top_k=None"),
        (
            dict(
                sequence_balance_weight=0.1,
                gate=moe_keras.ExpertChoiceGate(),
            ),
            "ExpertChoiceGate",
        ),
        (
            dict(
                sequence_balance_weight=0.1,
                gate=moe_keras.HashGate(),
                top_k=2,
            ),
            "HashGate",
        ),
    ],
)
def test_bad_sequence_balance_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 4, **kwargs)


def test_sequence_balance_needs_a_sequence_axis():
    layer = MoE(8, 4, top_k=2, sequence_balance_weight=0.1)
    with pytest.raises(ValueError, match="sequence axis"):
        layer(_x((5, 3)))
    layer = MoE(8, 4, top_k=2, sequence_balance_weight=0.1)
    with pytest.raises(ValueError, match="sequence axis"):
        keras.Sequential([keras.Input((3,)), layer])


# --- saving and compiling ------------------------------------------------------------


def _deepseek_layer(**overrides):
    kwargs = dict(
        num_experts=8,
        units=4,
        hidden_units=5,
        activation="relu",
        gate=moe_keras.SigmoidGate(
            expert_groups=4,
            top_groups=2,
            routed_scaling_factor=2.5,
            normalize_top_k=True,
            bias_update_rate=0.01,
        ),
        top_k=3,
        capacity_factor=None,
        load_balance_weight=0.0,
        sequence_balance_weight=0.01,
        num_shared_experts=1,
    )
    kwargs.update(overrides)
    return MoE(**kwargs)


def test_config_and_keras_file_round_trip(tmp_path):
    layer = _deepseek_layer()
    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, layer(inputs))
    x = _x((2, 6, 3))
    config = layer.get_config()
    assert config["sequence_balance_weight"] == 0.01
    gate_config = config["gate"]["config"]
    assert (
        gate_config["expert_groups"],
        gate_config["top_groups"],
        gate_config["routed_scaling_factor"],
    ) == (4, 2, 2.5)
    assert MoE.from_config(config).get_config() == config
    # A trained selection bias is saved with the model.
    model.compile("adam", "mse")
    model.train_on_batch(x, _x((2, 6, 4), 1))
    reload_keras_file(model, x, tmp_path)
    # A gate config from before these options loads with them off.
    old = {
        k: v
        for k, v in gate_config.items()
        if k not in ("expert_groups", "top_groups", "routed_scaling_factor")
    }
    gate = moe_keras.SigmoidGate.from_config(old)
    assert (gate.expert_groups, gate.top_groups) == (None, None)
    assert gate.routed_scaling_factor == 1.0


@NO_JIT
def test_jit_compiled_training():
    inputs = keras.Input((None, 3))  # a sequence length known per batch
    layer = _deepseek_layer(load_balance_weight=0.01)
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.Adam(0.02), "mse", jit_compile=True)
    x, y = _x((16, 6, 3)), _x((16, 6, 4), 1)
    first = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.evaluate(x, y, verbose=0) < first
    assert np.abs(_np(layer.gate.selection_bias)).max() > 0
