"""Every classic MoE form of issue #15 as one line of moe_keras, each
against a NumPy reference computed from the layer's own weights, saved and
reloaded through `.keras`, and with its bad arguments rejected by name."""

import json
import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import moe_keras
from moe_keras import MoE
from moe_keras.callbacks import ExpertPerformanceCallback
from moe_keras.gates import ActivationGate
from moe_keras.gates import ClusterGate
from moe_keras.gates import FeatureGate
from moe_keras.gates import NoisyTopKGate
from moe_keras.gates import PerformanceGate
from moe_keras.gates import RandomGate
from moe_keras.gates import RoundRobinGate
from moe_keras.gates import SigmoidGate
from moe_keras.gates import SoftmaxGate
from moe_keras.gates import UniformGate
from tests import reference
from tests.layer_test_utils import run_layer_test

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _np(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _randomize(layer, seed=3):
    rng = np.random.RandomState(seed)
    for w in layer.trainable_weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))


def _combine(weights, layer, x):
    """`y = sum_e w_e * h_e(x)`, with `w` `[T, E]` or `[T, E, units]`."""
    outs = reference.experts_forward(layer.experts, x)  # [T, E, units]
    if weights.ndim == 3:
        return (weights * outs).sum(1)
    return np.einsum("te,teu->tu", weights, outs)


def _dense(weights, indices, num_experts):
    """Top-k weights `[T, k]` at `indices` as `[T, E]`."""
    out = np.zeros((weights.shape[0], num_experts), "float32")
    np.put_along_axis(out, indices, weights, axis=1)
    return out


def _close(actual, expected):
    np.testing.assert_allclose(_np(actual), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Performance-based weights: W_e = p_e / sum(p)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_performance_gate_weights_are_scores_over_their_sum(top_k):
    scores = np.array([0.9, 0.2, 0.6], "float32")
    layer = MoE(
        3, 4, gate=PerformanceGate(scores=scores), top_k=top_k, dispatch="dense"
    )
    x = _x((8, 5))
    layer(x)
    if top_k is None:
        weights = np.tile(scores / scores.sum(), (8, 1))
    else:
        best = np.argsort(-scores, kind="stable")[:top_k]
        weights = np.zeros((8, 3), "float32")
        weights[:, best] = scores[best] / scores[best].sum()
    _close(layer(x), _combine(weights, layer, x))
    # New scores take effect at once; nothing is trained or penalised.
    layer.gate.set_scores([1.0, 3.0, 0.0])
    if top_k is None:
        weights = np.tile([0.25, 0.75, 0.0], (8, 1))
        _close(layer(x), _combine(weights, layer, x))
    layer(x, training=True)
    assert not layer.losses and not layer.gate.trainable_weights


@given(
    scores=st.lists(
        st.floats(0.0, 100.0, allow_nan=False), min_size=2, max_size=6
    ).filter(lambda s: sum(s) > 1e-3)
)
@SETTINGS
def test_performance_gate_property(scores):
    gate = PerformanceGate(scores=scores)
    probs = _np(gate(np.ones((2, 3), "float32")))
    expected = np.asarray(scores, "float32") / np.sum(scores, dtype="float32")
    np.testing.assert_allclose(probs, np.tile(expected, (2, 1)), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scores=[1.0, -1.0]), ValueError, "non-negative"),
        (dict(scores=[0.0, 0.0]), ValueError, "all zero"),
        (dict(scores=[1.0, float("nan")]), ValueError, "finite"),
        (dict(scores="high"), TypeError, "scores"),
        (dict(scores=[1.0, 2.0], num_experts=3), ValueError, "one entry"),
        (dict(hidden_units=4), ValueError, "hidden_units"),
    ],
)
def test_performance_gate_rejects_bad_scores(kwargs, error, match):
    with pytest.raises(error, match=match):
        PerformanceGate(**kwargs)


def test_performance_callback_measures_each_expert_alone():
    """The callback's scores are each expert's accuracy when the layer
    sends everything to it alone, recomputed here in NumPy."""
    x, y = _x((8, 5)), np.random.RandomState(1).randint(0, 4, 8)
    moe = MoE(3, 4, gate=PerformanceGate(), name="moe")
    model = keras.Sequential([keras.Input((5,)), moe, keras.layers.Softmax()])
    model.compile("sgd", "sparse_categorical_crossentropy")
    _randomize(model)
    callback = ExpertPerformanceCallback(validation_data=(x, y))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    outs = reference.experts_forward(moe.experts, x)  # [T, E, classes]
    expected = (outs.argmax(-1) == y[:, None]).mean(0)
    np.testing.assert_allclose(callback.history["moe"][-1], expected)
    np.testing.assert_allclose(_np(moe.gate.scores), expected)
    with pytest.raises(ValueError, match="PerformanceGate"):
        ExpertPerformanceCallback((x, y)).measure(
            keras.Sequential([keras.Input((5,)), MoE(3, 4)])
        )
    with pytest.raises(TypeError, match="metric"):
        ExpertPerformanceCallback((x, y), metric="f1")


def test_performance_callback_is_reusable_and_ignores_capacity():
    # An inference capacity would drop most tokens when all go to one
    # expert; the callback measures each expert on every token.
    x, y = _x((12, 5)), np.random.RandomState(2).randint(0, 4, 12)
    moe = MoE(
        3,
        4,
        gate=PerformanceGate(),
        top_k=2,
        eval_capacity_factor=0.5,
        name="moe",
    )
    model = keras.Sequential([keras.Input((5,)), moe])
    model.compile("sgd", "sparse_categorical_crossentropy")
    _randomize(model)
    callback = ExpertPerformanceCallback(validation_data=(x, y), batch_size=4)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    expected = (
        reference.experts_forward(moe.experts, x).argmax(-1) == y[:, None]
    ).mean(0)
    np.testing.assert_allclose(callback.history["moe"][-1], expected)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert callback.history["moe"].shape == (3, 3)
    assert moe.dispatch == "auto" and moe.sparse  # restored
    with pytest.raises(ValueError, match="needs a model"):
        ExpertPerformanceCallback((x, y)).measure()
    with pytest.raises(TypeError, match="batch_size"):
        ExpertPerformanceCallback((x, y), batch_size="a")
    # A model without a PerformanceGate fails before it trains.
    plain = keras.Sequential([keras.Input((5,)), MoE(3, 4)])
    plain.compile("sgd", "mse")
    before = [_np(w) for w in plain.weights]
    with pytest.raises(ValueError, match="PerformanceGate"):
        plain.fit(x, _x((12, 4)), verbose=0, callbacks=[callback])
    for w, b in zip(plain.weights, before):
        np.testing.assert_array_equal(_np(w), b)


def test_options_that_cannot_act_are_errors():
    for gate_cls, kwargs in [
        (PerformanceGate, dict(use_bias=True)),
        (PerformanceGate, dict(jitter=0.1)),
        (UniformGate, dict(use_bias=True)),
        (FeatureGate, dict(input_dependent=False, jitter=0.1)),
    ]:
        option = next(iter(set(kwargs) - {"input_dependent"}))
        with pytest.raises(ValueError, match=option):
            gate_cls(**kwargs)
    # A file saved when they were accepted (and ignored) still loads.
    config = PerformanceGate(num_experts=3).get_config()
    gate = PerformanceGate.from_config({**config, "use_bias": True})
    assert gate.use_bias is False
    with pytest.raises(TypeError, match=r"SoftmaxGate\(\)"):
        MoE(3, 4, gate=SoftmaxGate)


# --------------------------------------------------------------------------
# Voting fusion
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(gate=UniformGate()), dict(top_k=2), dict(gate="sigmoid")],
    ids=["majority", "top2", "weighted"],
)
def test_vote_is_weighted_majority_of_expert_argmax(kwargs):
    layer = MoE(3, 4, combine="vote", **kwargs)
    x = _x((8, 5))
    layer(x)
    _randomize(layer)
    routing = layer.gate(x, routing=True, top_k=layer.top_k)
    weights = _np(routing["weights"])
    if "indices" in routing:
        weights = _dense(weights, _np(routing["indices"]), 3)
    outs = reference.experts_forward(layer.experts, x)
    ballots = np.eye(4)[outs.argmax(-1)]  # [T, E, classes]
    tally = np.einsum("te,tec->tc", weights, ballots)
    expected = tally / tally.sum(-1, keepdims=True)
    _close(layer(x), expected)
    np.testing.assert_array_equal(_np(layer(x)).argmax(-1), tally.argmax(-1))


def test_vote_counts_positive_weights_and_falls_back_to_majority():
    # tanh weights can be negative: they count as 0, never against a
    # class; where no voter has a positive weight, each counts once.
    layer = MoE(4, 3, gate=keras.activations.tanh, combine="vote")
    x = _x((16, 5))
    layer(x)
    _randomize(layer)
    kernel = _np(layer.gate.kernel)
    kernel = -np.abs(kernel)
    layer.gate.kernel.assign(kernel)
    x[:8] = np.abs(x[:8])  # rows 0-7: every logit, so every weight, < 0
    weights = np.maximum(np.tanh(x @ kernel), 0.0)
    ballots = np.eye(3)[reference.experts_forward(layer.experts, x).argmax(-1)]
    tally = np.einsum("te,tec->tc", weights, ballots)
    majority = ballots.sum(1)
    tally = np.where(tally.sum(-1, keepdims=True) > 0, tally, majority)
    assert (weights.sum(-1) == 0).any() and (weights.sum(-1) > 0).any()
    _close(layer(x), tally / tally.sum(-1, keepdims=True))


def test_combine_is_checked_when_set():
    layer = MoE(3, 4, top_k=2)
    with pytest.raises(ValueError, match="combine"):
        layer.combine = "votes"
    regression = MoE(3, 1)
    regression.build((None, 5))
    with pytest.raises(ValueError, match="regression"):
        regression.combine = "vote"
    assert regression.combine == "weighted"


def test_vote_errors_where_it_cannot_apply():
    x = _x((8, 5))
    with pytest.raises(ValueError, match="inference only"):
        MoE(3, 4, combine="vote")(x, training=True)
    with pytest.raises(ValueError, match="regression"):
        MoE(3, 1, combine="vote")(x)
    # Known when the model is built, before any data.
    with pytest.raises(ValueError, match="regression"):
        keras.Sequential([keras.Input((5,)), MoE(3, 1, combine="vote")])
    with pytest.raises(ValueError, match="shared experts"):
        keras.Sequential(
            [keras.Input((5,)), MoE(3, 4, combine="vote", num_shared_experts=1)]
        )
    with pytest.raises(ValueError, match="combine"):
        MoE(3, 4, combine="majority")
    with pytest.raises(ValueError, match="per-feature"):
        keras.Sequential(
            [
                keras.Input((5,)),
                MoE(3, 4, combine="vote", gate=FeatureGate(), top_k=2),
            ]
        )


# --------------------------------------------------------------------------
# Learned weights per cluster
# --------------------------------------------------------------------------


@pytest.mark.parametrize("input_dependent", [True, False])
def test_cluster_gate_matches_numpy(input_dependent):
    gate = ClusterGate(
        num_clusters=4, input_dependent=input_dependent, use_bias=True
    )
    layer = MoE(3, 4, gate=gate, top_k=2, dispatch="dense")
    x, ids = _x((8, 5)), np.array([0, 1, 2, 3, 3, 2, 1, 9])
    layer(x, routing_ids=ids)
    _randomize(layer)
    clipped = np.minimum(ids, 3)  # ids past the last cluster are clipped
    if input_dependent:
        kernel, bias = _np(gate.kernel), _np(gate.bias)
        logits = np.einsum("td,tde->te", x, kernel[clipped]) + bias[clipped]
    else:
        logits = _np(gate.kernel)[clipped]
    weights, _ = reference.top_k_weights(reference.softmax(logits), 2, True)
    _close(layer(x, routing_ids=ids), _combine(weights, layer, x))
    with pytest.raises(ValueError, match="routing_ids"):
        layer(x)
    with pytest.raises(ValueError, match="hidden_units"):
        ClusterGate(num_clusters=2, hidden_units=3)
    with pytest.raises(TypeError, match="num_clusters"):
        ClusterGate(num_clusters=None)


# --------------------------------------------------------------------------
# A gate function given as a callable; sigmoid with a bias; MLP router
# --------------------------------------------------------------------------


def _relu_gate(logits):
    return keras.ops.relu(logits)


@pytest.mark.parametrize(
    "gate, fn",
    [
        (keras.activations.relu, lambda z: np.maximum(z, 0.0)),
        (keras.activations.tanh, np.tanh),
        (_relu_gate, lambda z: np.maximum(z, 0.0)),
        (
            ActivationGate(activation="sigmoid", use_bias=True),
            reference.sigmoid,
        ),
        (SigmoidGate(use_bias=True), reference.sigmoid),
    ],
    ids=["relu", "tanh", "own-callable", "activation", "sigmoid"],
)
def test_gate_function_matches_numpy(gate, fn):
    layer = MoE(3, 4, gate=gate, dispatch="dense")
    x = _x((8, 5))
    layer(x)
    _randomize(layer)
    logits = x @ _np(layer.gate.kernel)
    if layer.gate.bias is not None:
        logits = logits + _np(layer.gate.bias)
    _close(layer(x), _combine(fn(logits), layer, x))


@keras.saving.register_keras_serializable(package="test_forms")
def _doubled_relu(logits):
    return keras.ops.relu(logits) * 2.0


@pytest.mark.filterwarnings("ignore:The object being serialized includes")
@pytest.mark.parametrize("own", ["registered", "lambda"])
def test_own_gate_function_saves_and_loads(own, tmp_path):
    fn = _doubled_relu if own == "registered" else (lambda z: z * z - 0.5)
    model = keras.Sequential([keras.Input((5,)), MoE(3, 4, gate=fn)])
    x = _x((6, 5))
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "own.keras")
    model.save(path)
    safe_mode = own == "registered"
    reloaded = keras.saving.load_model(path, safe_mode=safe_mode)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), expected)
    if own == "lambda":  # Keras' rule for code in a file
        with pytest.raises((TypeError, ValueError), match="safe_mode"):
            keras.saving.load_model(path)


def test_bad_gate_is_a_clear_error():
    with pytest.raises(ValueError, match="gate function"):
        MoE(3, 4, gate="relu")  # a name is not a gate function; relu is
    with pytest.raises(TypeError, match="gate"):
        MoE(3, 4, gate=3)
    with pytest.raises(TypeError, match="activation"):
        ActivationGate(activation=None)
    with pytest.raises(TypeError, match="normalize_top_k"):
        SoftmaxGate(normalize_top_k="yes")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_router_matches_numpy(activation):
    gate = SoftmaxGate(hidden_units=6, hidden_activation=activation)
    layer = MoE(3, 4, gate=gate, top_k=2, dispatch="dense")
    x = _x((8, 5))
    layer(x)
    _randomize(layer)
    hidden = x @ _np(gate.hidden_kernel) + _np(gate.hidden_bias)
    hidden = (
        np.maximum(hidden, 0.0) if activation == "relu" else np.tanh(hidden)
    )
    probs = reference.softmax(hidden @ _np(gate.kernel))
    weights, _ = reference.top_k_weights(probs, 2, True)
    _close(layer(x), _combine(weights, layer, x))
    with pytest.raises(ValueError, match="hidden_units"):
        moe_keras.StaticGate(hidden_units=4)
    with pytest.raises(ValueError, match="hidden_units"):
        SoftmaxGate(hidden_units=0)


# --------------------------------------------------------------------------
# Per-feature gates, with and without the input
# --------------------------------------------------------------------------


def test_input_independent_feature_gate_matches_numpy():
    gate = FeatureGate(input_dependent=False)
    layer = MoE(3, 4, gate=gate, dispatch="dense")
    x = _x((8, 5))
    layer(x)
    _randomize(layer)
    p = reference.softmax(_np(gate.kernel)[None])[0]  # [E]
    w = p[:, None] * reference.sigmoid(_np(gate.feature_kernel))  # [E, u]
    _close(layer(x), _combine(np.tile(w, (8, 1, 1)), layer, x))
    # The same weights for every input: w_i * h_i, element-wise.
    routing = gate(x, routing=True)
    np.testing.assert_allclose(_np(routing["weights"])[3], w, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden_units"):
        FeatureGate(input_dependent=False, hidden_units=3)
    with pytest.raises(TypeError, match="input_dependent"):
        FeatureGate(input_dependent="no")


# --------------------------------------------------------------------------
# Deterministic inference for random and round-robin assignment
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gate_cls", [RandomGate, RoundRobinGate])
def test_hash_inference_depends_on_the_input_only(gate_cls):
    gate = gate_cls(inference="hash", seed=4)
    layer = MoE(3, 4, gate=gate, top_k=2, dispatch="dense")
    x = _x((8, 5))
    y = _np(layer(x))
    # Reordered, or alone: each row's prediction is the same.
    order = np.random.RandomState(0).permutation(8)
    np.testing.assert_allclose(_np(layer(x[order])), y[order], atol=1e-6)
    np.testing.assert_allclose(_np(layer(x[3:4])), y[3:4], atol=1e-6)
    # NumPy: the top 2 of x @ R, weighted 1/2 each.
    _, order = reference.top_k_weights(x @ _np(gate.projection), 2, False)
    weights = np.zeros((8, 3), "float32")
    np.put_along_axis(weights, order, 0.5, axis=1)
    _close(y, _combine(weights, layer, x))
    with pytest.raises(ValueError, match="inference"):
        gate_cls(inference="sometimes")
    with pytest.raises(ValueError, match="inference"):
        UniformGate(inference="hash")


def test_default_inference_modes_are_unchanged():
    x = _x((8, 5))
    rr = MoE(3, 4, gate=RoundRobinGate(), top_k=1, dispatch="dense")
    weights = np.eye(3, dtype="float32")[np.arange(8) % 3]
    _close(rr(x), _combine(weights, rr, x))
    assert RandomGate().inference == "random"


# --------------------------------------------------------------------------
# Noisy top-k at k = 1: the docstring's weights and the paper's form
# --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_weights_follow_normalize_top_k(normalize, top_k):
    gate = NoisyTopKGate(num_experts=3, normalize_top_k=normalize, seed=0)
    x = _x((8, 5))
    gate(x)
    _randomize(gate)
    probs = reference.softmax(x @ _np(gate.kernel))
    renormalise = normalize if normalize is not None else top_k > 1
    expected, _ = reference.top_k_weights(probs, top_k, renormalise)
    routing = gate(x, routing=True, top_k=top_k)
    got = _dense(_np(routing["weights"]), _np(routing["indices"]), 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # While training: a softmax over the k selected noisy logits.
    routing = gate(x, routing=True, top_k=top_k, training=True)
    if renormalise:
        np.testing.assert_allclose(
            _np(routing["weights"]).sum(-1), 1.0, rtol=1e-5
        )


# --------------------------------------------------------------------------
# The contract: config and `.keras` round trips, training, on every backend
# --------------------------------------------------------------------------

FORMS = {
    "performance": lambda: dict(gate=PerformanceGate(scores=[3.0, 1.0, 2.0])),
    "performance_top1": lambda: dict(gate=PerformanceGate(), top_k=1),
    "vote": lambda: dict(gate=UniformGate(), combine="vote"),
    "cluster": lambda: dict(gate=ClusterGate(num_clusters=3), top_k=2),
    "cluster_static": lambda: dict(
        gate=ClusterGate(num_clusters=3, input_dependent=False)
    ),
    "gate_fn_name": lambda: dict(gate=ActivationGate(activation="relu")),
    "gate_fn_callable": lambda: dict(gate=keras.activations.tanh, top_k=2),
    "sigmoid_bias": lambda: dict(gate=SigmoidGate(use_bias=True), top_k=2),
    "mlp_router": lambda: dict(gate=SoftmaxGate(hidden_units=5), top_k=2),
    "feature_static": lambda: dict(
        gate=FeatureGate(input_dependent=False), top_k=2
    ),
    "random_hash": lambda: dict(
        gate=RandomGate(seed=2, inference="hash"), top_k=2
    ),
    "round_robin_hash": lambda: dict(
        gate=RoundRobinGate(inference="hash"), top_k=1
    ),
    "noisy_paper_k1": lambda: dict(
        gate=NoisyTopKGate(normalize_top_k=True, seed=1), top_k=1
    ),
}


def _layer(form):
    # The dense dispatch keeps this quick on JAX, whose eager ops compile
    # once per shape; the sparse dispatch gets the same routing dict from
    # every gate and is checked against the dense one in
    # `tests/test_routing_family.py` and `tests/test_properties.py`.
    kwargs = dict(hidden_units=5, activation="relu", dispatch="dense")
    kwargs.update(FORMS[form]())
    return MoE(3, 5, name=form, **kwargs)


def _chain(forms):
    """One model with every form's MoE layer in a row, `(2, 4, 5)` inputs
    and one cluster id per position: one save, one compiled step for all
    (each parametrised model of its own costs a compile per backend)."""
    inputs = keras.Input((4, 5))
    ids = keras.Input((4,), dtype="int32")
    h = inputs
    for form in forms:
        layer = _layer(form)
        h = layer(h, routing_ids=ids) if layer.gate.needs_ids else layer(h)
    return keras.Model([inputs, ids], h)


def _chain_inputs():
    return [_x((2, 4, 5)), np.arange(8).reshape(2, 4) % 3]


def _round_trip(model, tmp_path):
    x = _chain_inputs()
    for layer in model.layers:
        if not isinstance(layer, MoE):
            continue
        config = layer.get_config()
        assert MoE.from_config(config).get_config() == config, layer.name
    before = _np(model(x, training=False))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert json.dumps(reloaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )
    np.testing.assert_array_equal(_np(reloaded(x, training=False)), before)


TRAINED_FORMS = sorted(set(FORMS) - {"vote"})


def test_forms_round_trip_and_train(tmp_path):
    model = _chain(TRAINED_FORMS)
    _round_trip(model, tmp_path)
    # One compiled step on JAX (its eager ops compile one by one), eager
    # steps elsewhere; `tests/test_routing_family.py` trains the gate
    # families under `jit_compile=True`.
    model.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        run_eagerly=keras.backend.backend() != "jax",
    )
    x, y = _chain_inputs(), _x((2, 4, 5), 1)
    before = {w.path: _np(w) for w in model.trainable_weights}
    first = model.evaluate(x, y, verbose=0)
    for _ in range(3):
        model.train_on_batch(x, y)
    assert model.evaluate(x, y, verbose=0) < first
    # Every layer learns (a ReLU gate may leave an expert idle on this
    # batch, so not necessarily every weight).
    for layer in model.layers:
        if isinstance(layer, MoE):
            assert any(
                not np.allclose(_np(w), before[w.path])
                for w in layer.trainable_weights
            ), layer.name


def test_vote_round_trips(tmp_path):
    # A vote has no gradient: training it is an error (tested above).
    _round_trip(_chain(["gate_fn_name", "vote"]), tmp_path)


@pytest.mark.parametrize(
    "gate_cls, kwargs, trainable",
    [
        (ActivationGate, dict(activation="relu", use_bias=True), 2),
        (SoftmaxGate, dict(hidden_units=6), 3),
    ],
)
def test_gate_layer_contract(gate_cls, kwargs, trainable, tmp_path):
    run_layer_test(
        gate_cls,
        dict(num_experts=5, **kwargs),
        input_shape=(8, 4),
        expected_output_shape=(8, 5),
        expected_num_trainable_weights=trainable,
        tmp_path=tmp_path,
        mixed_precision_output_dtype="float32",
    )


def test_performance_gate_layer_contract(tmp_path):
    run_layer_test(
        PerformanceGate,
        dict(scores=[1.0, 2.0, 3.0]),
        input_shape=(8, 4),
        expected_output_shape=(8, 3),
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=1,
        tmp_path=tmp_path,
        check_training=False,
        mixed_precision_output_dtype="float32",
    )


# --------------------------------------------------------------------------
# The gates' docstring examples run and print what they say
# --------------------------------------------------------------------------


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="JAX compiles each eager op per shape: slow for a docs check; "
    "the same code runs on JAX in the tests above",
)
def test_gate_docstring_examples():
    import doctest
    import importlib

    from moe_keras import gates

    names = {name: getattr(gates, name) for name in gates.__all__}
    globs = dict(np=np, keras=keras, MoE=MoE, **names)
    for family in (
        "base", "learned", "feature", "static", "cluster", "rule",
        "expert_choice",
    ):  # fmt: skip
        module = importlib.import_module(f"moe_keras.gates.{family}")
        result = doctest.testmod(
            module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE
        )
        assert result.failed == 0, family
