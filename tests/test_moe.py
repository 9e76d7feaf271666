import json
import os

import keras
import numpy as np
import pytest

from moe_keras import DenseExperts
from moe_keras import HashGate
from moe_keras import MoE
from moe_keras import NoisyTopKGate
from moe_keras import RandomGate
from moe_keras import RoutingMetrics
from moe_keras import SigmoidGate
from moe_keras import SoftmaxGate
from moe_keras import dispatch as dispatch_lib
from tests import reference
from tests.backend_marks import BACKEND
from tests.backend_marks import NO_EXPORT
from tests.backend_marks import NO_JIT
from tests.grad_utils import gradients
from tests.layer_test_utils import run_layer_test

EXPERT_FORMS = [
    dict(),
    dict(hidden_units=6, activation="relu"),
    dict(hidden_units=6, activation="silu", gated=True),
]


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _randomize(layer):
    """Non-trivial weights everywhere, biases included."""
    rng = np.random.RandomState(3)
    for w in layer.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32"))


@pytest.mark.parametrize(
    "kwargs, num_weights",
    [
        (dict(num_experts=4, units=5), 3),
        (dict(num_experts=4, units=5, top_k=2, dispatch="sparse"), 3),
        (
            dict(
                num_experts=4,
                units=5,
                top_k=1,
                gate="sigmoid",
                hidden_units=6,
                gated=True,
            ),
            5,
        ),
    ],
)
def test_layer_contract(kwargs, num_weights, tmp_path):
    run_layer_test(
        MoE,
        kwargs,
        input_shape=(8, 3),
        expected_output_shape=(8, 5),
        expected_num_trainable_weights=num_weights,
        expected_num_losses=2,
        # The routing statistics: sums, counts, load, batches and
        # co-selection, for training and for inference.
        expected_num_non_trainable_weights=10,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("form", EXPERT_FORMS)
def test_forward_matches_numpy_reference(gate, top_k, form):
    layer = MoE(
        num_experts=4, units=5, gate=gate, top_k=top_k, dispatch="dense", **form
    )
    x = _x((16, 3))
    layer.build(x.shape)
    _randomize(layer)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        reference.moe_forward(layer, x),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("form", EXPERT_FORMS)
@pytest.mark.parametrize("dropless", [False, True])
def test_sparse_equals_dense_when_nothing_is_dropped(
    gate, top_k, form, dropless
):
    common = dict(num_experts=4, units=5, gate=gate, top_k=top_k, **form)
    dense = MoE(dispatch="dense", **common)
    # capacity_factor=E/k gives every expert room for every token.
    capacity_factor = None if dropless else 4.0 / top_k
    sparse = MoE(dispatch="sparse", capacity_factor=capacity_factor, **common)
    x = _x((2, 7, 3))
    dense.build(x.shape)
    sparse.build(x.shape)
    _randomize(dense)
    sparse.set_weights(dense.get_weights())
    for training in (False, True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(sparse(x, training=training)),
            keras.ops.convert_to_numpy(dense(x, training=training)),
            rtol=1e-5,
            atol=1e-5,
        )


def _weight_gradients(layer, x, training=None):
    weights = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]

    def fn(x, *values):
        outputs, _ = layer.stateless_call(
            list(values),
            [v.value for v in layer.non_trainable_variables],
            x,
            training=training,
        )
        return outputs

    return gradients(fn, x, *weights)


@pytest.mark.parametrize(
    "capacity_factor, experts_config",
    [
        (2.0, dict(hidden_units=6, gated=True, activation="silu")),
        (None, dict(hidden_units=6, gated=True, activation="silu")),
        # Experts that scale their hidden rows through autodiff'd GLUs and
        # plain activations, and single-projection experts, which leave
        # the weighting to the combine.
        (2.0, dict(hidden_units=6, gated=True, activation="gelu")),
        (None, dict(hidden_units=6, activation="relu")),
        (2.0, dict(activation="tanh")),
    ],
)
@pytest.mark.parametrize("training", [True, None])
def test_sparse_gradients_equal_dense_gradients(
    capacity_factor, experts_config, training
):
    # Training takes the hand-written gradients; an inference call on JAX
    # leaves them to autodiff (see `dispatch.custom_gradients`).
    common = dict(num_experts=4, units=5, top_k=2, **experts_config)
    dense = MoE(dispatch="dense", **common)
    sparse = MoE(
        dispatch="sparse",
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        **common,
    )
    x = _x((12, 3))
    dense.build(x.shape)
    sparse.build(x.shape)
    _randomize(dense)
    sparse.set_weights(dense.get_weights())
    for got, want in zip(
        _weight_gradients(sparse, x, training),
        _weight_gradients(dense, x, training),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "num_experts, top_k",
    [(4, 2), (80, 6)],  # one-hot and sorting plans
)
def test_sparse_drops_what_exceeds_capacity(num_experts, top_k):
    layer = MoE(
        num_experts=num_experts,
        units=5,
        top_k=top_k,
        dispatch="sparse",
        capacity_factor=0.5,
    )
    x = _x((32, 3))
    layer.build(x.shape)
    _randomize(layer)
    capacity = dispatch_lib.capacity(32, top_k, num_experts, 0.5)
    expected = reference.moe_forward(layer, x, capacity=capacity)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x, training=True)),
        expected,
        rtol=1e-4,
        atol=1e-4,
    )
    # Inference is dropless by default: the reference without capacity.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        reference.moe_forward(layer, x),
        rtol=1e-4,
        atol=1e-4,
    )


def test_dropped_fraction_statistic():
    layer = MoE(
        num_experts=4, units=5, top_k=1, dispatch="sparse", capacity_factor=1.0
    )
    x = _x((32, 3))
    layer.build(x.shape)
    # A router that ties all experts sends everything to expert 0, which
    # has C = 32 / 4 = 8 slots: 8 of 32 fit.
    layer.gate.kernel.assign(np.zeros((3, 4), "float32"))
    layer(np.abs(x), training=True)
    result = layer.statistics.result("train")["dropped_fraction"]
    assert result == pytest.approx(1 - 8 / 32)


def test_dropped_fraction_in_fit_logs():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            MoE(num_experts=4, units=2, top_k=1, capacity_factor=0.5),
        ]
    )
    model.compile("sgd", "mse")
    history = model.fit(
        _x((64, 3)),
        _x((64, 2), 1),
        epochs=1,
        verbose=0,
        callbacks=[RoutingMetrics()],
    )
    keys = [k for k in history.history if "drop" in k]
    assert keys and 0.0 < history.history[keys[0]][0] <= 1.0


@pytest.mark.parametrize("rank_shape", [(6, 3), (2, 5, 3), (2, 3, 4, 3)])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_any_input_rank_routes_per_position(rank_shape, dispatch):
    layer = MoE(
        num_experts=3, units=4, top_k=2, dispatch=dispatch, capacity_factor=2.0
    )
    x = _x(rank_shape)
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == rank_shape[:-1] + (4,)
    flat = keras.ops.convert_to_numpy(layer(x.reshape(-1, 3)))
    np.testing.assert_allclose(y.reshape(-1, 4), flat, rtol=1e-5, atol=1e-6)


def test_training_step_changes_router_and_experts():
    layer = MoE(num_experts=4, units=2, top_k=2, hidden_units=4)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.5), "mse")
    gate_before = np.array(layer.gate.kernel)
    experts_before = [np.array(w) for w in layer.experts.weights]
    model.fit(_x((32, 3)), _x((32, 2), 1), epochs=2, verbose=0)
    assert not np.allclose(np.array(layer.gate.kernel), gate_before)
    for w, before in zip(layer.experts.weights, experts_before):
        assert not np.allclose(np.array(w), before)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_auxiliary_losses_match_numpy(gate, top_k):
    layer = MoE(
        num_experts=4,
        units=2,
        gate=gate,
        top_k=top_k,
        load_balance_weight=0.5,
        z_loss_weight=0.25,
    )
    x = _x((20, 3))
    layer(x)
    assert layer.losses == []  # inference adds no loss
    layer(x, training=True)
    balance, z_loss = (float(v) for v in layer.losses)
    probs, logits = reference.gate_forward(layer.gate, x)
    k = top_k or 1
    _, order = reference.top_k_weights(probs, k, False)
    distribution = probs / probs.sum(-1, keepdims=True)
    fraction = np.bincount(order.ravel(), minlength=4) / order.size
    expected_balance = 4 * np.sum(fraction * distribution.mean(0))
    m = logits.max(-1)
    expected_z = np.mean((m + np.log(np.exp(logits - m[:, None]).sum(-1))) ** 2)
    assert balance == pytest.approx(0.5 * expected_balance, rel=1e-4)
    assert z_loss == pytest.approx(0.25 * expected_z, rel=1e-4)


def test_loss_weights_of_zero_add_no_loss():
    layer = MoE(
        num_experts=4, units=2, load_balance_weight=0.0, z_loss_weight=0.0
    )
    layer(_x((4, 3)), training=True)
    assert layer.losses == []


# --- serialization -----------------------------------------------------------


def _functional_model(**kwargs):
    inputs = keras.Input((5, 3))
    options = dict(top_k=2, hidden_units=8, gated=True, activation="silu")
    x = MoE(num_experts=4, units=6, **{**options, **kwargs})(inputs)
    outputs = MoE(num_experts=3, units=2, gate="sigmoid")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid", "instance"])
def test_config_round_trip(gate):
    if gate == "instance":
        gate = SoftmaxGate(
            num_experts=4, use_bias=True, kernel_initializer="zeros"
        )
    layer = MoE(
        num_experts=4,
        units=3,
        gate=gate,
        top_k=2,
        hidden_units=5,
        gated=True,
        activation="silu",
        capacity_factor=1.5,
        eval_capacity_factor=3.0,
        kernel_regularizer="l2",
    )
    config = layer.get_config()
    revived = MoE.from_config(config)
    assert revived.get_config() == config
    assert type(revived.gate) is type(layer.gate)


def test_keras_file_round_trip(tmp_path):
    model = _functional_model()
    model.compile("adam", "mse")
    x = _x((4, 5, 3))
    model.fit(x, _x((4, 5, 2), 1), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # Keras turns tuples into lists on the way through JSON; compare as JSON.
    assert json.dumps(reloaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )
    # A reloaded model keeps training.
    reloaded.fit(x, _x((4, 5, 2), 1), epochs=1, verbose=0)


@NO_EXPORT
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(eval_capacity_factor=1.0),
        dict(dispatch="dense"),
        dict(gate="sigmoid", top_k=1, num_shared_experts=1),
    ],
    ids=["dropless", "capacity", "dense", "sigmoid-shared"],
)
def test_saved_model_export_serves_the_same_numbers(kwargs, tmp_path):
    # From either backend: TensorFlow loads the SavedModel and serves it
    # at batch sizes other than any the model has seen.
    import tensorflow as tf

    model = _functional_model(**kwargs)
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    served_model = tf.saved_model.load(path)
    for batch in (1, 7, 64):
        x = _x((batch, 5, 3), batch)
        served = served_model.serve(tf.constant(x))
        # One batch, as served (a capacity depends on the batch).
        expected = model.predict(x, batch_size=batch, verbose=0)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(served), expected, rtol=1e-5, atol=1e-6
        )


# --- compilation and precision -------------------------------------------------


@NO_JIT
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dispatch="dense"),
        dict(dispatch="sparse"),
        dict(dispatch="sparse", capacity_factor=None),
    ],
)
def test_jit_compiled_training(kwargs):
    model = _functional_model(**kwargs)
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    x, y = _x((64, 5, 3)), _x((64, 5, 2), 1)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_mixed_precision(policy, dispatch, activation):
    keras.config.set_dtype_policy(policy)
    layer = MoE(
        num_experts=4,
        units=3,
        top_k=2,
        dispatch=dispatch,
        hidden_units=4,
        gated=activation is not None,
        activation=activation,
    )
    compute = policy.split("_")[1]
    y = layer(_x((6, 3)))
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert layer.gate.compute_dtype == "float32"
    assert layer.experts.compute_dtype == compute
    assert all(
        keras.backend.standardize_dtype(w.dtype) == "float32"
        for w in layer.weights
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("adam", "mse")
    router = keras.ops.convert_to_numpy(layer.gate.kernel)
    # Several steps: float16's loss scaling skips the first updates while
    # it finds its scale.
    model.fit(_x((16, 3)), _x((16, 3), 1), epochs=2, batch_size=2, verbose=0)
    # The router trains (its gradient comes back through the experts'
    # weighting) and every weight stays finite.
    assert not np.allclose(
        keras.ops.convert_to_numpy(layer.gate.kernel), router
    )
    for weight in layer.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(weight)))


# --- masks ---------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_masked_positions(dispatch):
    layer = MoE(
        num_experts=4, units=3, top_k=1, dispatch=dispatch, capacity_factor=0.5
    )
    x = _x((2, 8, 3))
    mask = np.ones((2, 8), bool)
    mask[:, 5:] = False
    y = keras.ops.convert_to_numpy(layer(x, mask=mask, training=True))
    assert np.all(y[~mask] == 0)
    # The real positions come out as if the padding were not there at all.
    valid = mask.reshape(-1)
    capacity = (
        dispatch_lib.capacity(16, 1, 4, 0.5) if dispatch == "sparse" else None
    )
    expected = reference.moe_forward(
        layer, x.reshape(-1, 3), capacity=capacity, valid=valid
    )
    np.testing.assert_allclose(y.reshape(-1, 3), expected, rtol=1e-4, atol=1e-5)
    # Losses ignore padding: garbage in padded positions changes nothing.
    losses = [float(v) for v in layer.losses]
    x_noisy = x.copy()
    x_noisy[~mask] = 100.0
    layer(x_noisy, mask=mask, training=True)
    np.testing.assert_allclose(
        [float(v) for v in layer.losses], losses, rtol=1e-5
    )


def test_padding_takes_no_capacity():
    layer = MoE(
        num_experts=2, units=3, top_k=1, dispatch="sparse", capacity_factor=1.0
    )
    x = _x((1, 8, 3))
    mask = np.array([[True] * 4 + [False] * 4])
    layer.build(x.shape)
    # All tokens prefer expert 0.
    layer.gate.kernel.assign(np.zeros((3, 2), "float32"))
    layer.gate.bias = None
    x = np.abs(x)
    layer.gate.kernel.assign(np.array([[1.0, 0.0]] * 3, "float32"))
    layer(x, mask=mask, training=True)
    # C = ceil(1.0 * 8 / 2) = 4: the 4 real tokens fit even though the 4
    # padded ones would have competed for expert 0.
    assert layer.statistics.result("train")["dropped_fraction"] == 0.0


def test_mask_propagates_through_a_model():
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = MoE(num_experts=3, units=4, top_k=2)(h)
    outputs = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, outputs)
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    pooled = model.predict(ids, verbose=0)
    # Pooling honours the mask only if MoE passed it on: the first row's
    # mean is over its three real positions.
    trimmed = model.predict(np.array([[1, 2, 3, 0, 0, 0]]), verbose=0)
    np.testing.assert_allclose(pooled[0], trimmed[0], rtol=1e-5)
    embed_model = keras.Model(inputs, model.layers[2].output)
    per_position = embed_model.predict(ids[:1], verbose=0)[0]
    np.testing.assert_allclose(
        pooled[0], per_position[:3].mean(0), rtol=1e-4, atol=1e-6
    )


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_experts=0, units=4), ValueError, "num_experts"),
        (dict(num_experts="4", units=4), TypeError, "num_experts"),
        (dict(num_experts=4, units=0), ValueError, "units"),
        (dict(num_experts=4, units=4, top_k=0), ValueError, "top_k"),
        (dict(num_experts=4, units=4, top_k=5), ValueError, "top_k"),
        (dict(num_experts=4, units=4, gate="relu"), ValueError, "gate"),
        (
            dict(num_experts=4, units=4, gate=keras.layers.Dense(4)),
            TypeError,
            "gate",
        ),
        (
            dict(num_experts=4, units=4, gate=SigmoidGate(num_experts=3)),
            ValueError,
            "num_experts",
        ),
        (dict(num_experts=4, units=4, dispatch="fast"), ValueError, "dispatch"),
        (
            dict(num_experts=4, units=4, top_k=None, dispatch="sparse"),
            ValueError,
            "top_k",
        ),
        (
            dict(num_experts=4, units=4, top_k=2, capacity_factor=0),
            ValueError,
            "capacity_factor",
        ),
        (
            dict(num_experts=4, units=4, top_k=2, capacity_factor=-1.0),
            ValueError,
            "capacity_factor",
        ),
        (
            dict(num_experts=4, units=4, load_balance_weight=-0.1),
            ValueError,
            "load_balance_weight",
        ),
        (
            dict(num_experts=4, units=4, top_k=2, capacity_factor=np.inf),
            ValueError,
            "capacity_factor",
        ),
        (
            dict(num_experts=4, units=4, top_k=2, capacity_factor=np.nan),
            ValueError,
            "capacity_factor",
        ),
        (
            dict(num_experts=4, units=4, top_k=2, eval_capacity_factor=np.inf),
            ValueError,
            "eval_capacity_factor",
        ),
        (
            dict(num_experts=4, units=4, z_loss_weight=np.inf),
            ValueError,
            "z_loss_weight",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MoE(**kwargs)


def test_unknown_feature_dimension():
    with pytest.raises(ValueError, match="last dimension"):
        MoE(num_experts=2, units=3)(keras.Input((None, None)))


def test_rank_one_input():
    with pytest.raises(ValueError, match="rank"):
        MoE(num_experts=2, units=3).build((4,))


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_integer_input(dtype):
    with pytest.raises(TypeError, match="floating"):
        MoE(num_experts=2, units=3)(keras.Input((4,), dtype=dtype))
    with pytest.raises(TypeError, match="floating"):
        MoE(num_experts=2, units=3)(np.ones((2, 4), dtype))


@pytest.mark.parametrize("seed", ["abc", 1.5, True])
@pytest.mark.parametrize("gate_cls", [HashGate, RandomGate, SoftmaxGate])
def test_bad_gate_seed_is_rejected_at_construction(gate_cls, seed):
    with pytest.raises(TypeError, match="seed"):
        gate_cls(seed=seed)


def _feature_width_layers():
    return {
        "moe": MoE(num_experts=3, units=4, top_k=2),
        "moe-dense": MoE(num_experts=3, units=4),
        "experts": DenseExperts(num_experts=3, units=4, hidden_units=5),
        "softmax-gate": SoftmaxGate(num_experts=3),
        "sigmoid-gate": SigmoidGate(num_experts=3),
        "noisy-gate": NoisyTopKGate(num_experts=3),
    }


@pytest.mark.parametrize("name", sorted(_feature_width_layers()))
def test_other_feature_width_than_built_is_a_clear_error(name, tmp_path):
    layer = _feature_width_layers()[name]
    layer(_x((2, 8)))
    with pytest.raises(ValueError, match=r"expected axis -1.*value 8"):
        layer(_x((2, 9)))
    # The same after a `.keras` round trip.
    model = keras.Sequential([keras.Input((8,)), layer])
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    with pytest.raises(ValueError, match=r"expected axis -1.*value 8"):
        reloaded.layers[0](_x((2, 9)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("top_k", [None, 1])
def test_expert_list_output_follows_the_layer_policy(policy, top_k):
    layer = MoE(
        experts=[keras.layers.Dense(4), keras.layers.Dense(4, "relu")],
        top_k=top_k,
        dtype=policy,
    )
    x = _x((5, 3))
    y = layer(x)
    spec = layer.compute_output_spec(keras.KerasTensor(x.shape))
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert spec.dtype == compute
    # Inside a compiled model too.
    model = keras.Sequential([keras.Input((3,)), layer])
    out = model.predict_on_batch(x)
    assert keras.backend.standardize_dtype(out.dtype) == compute


EMPTY_BATCH_LAYERS = {
    "capacity": dict(top_k=2),
    "dropless": dict(top_k=2, capacity_factor=None),
    "swiglu-top1": dict(top_k=1, hidden_units=6, gated=True, activation="silu"),
    "dense": dict(top_k=2, dispatch="dense"),
    "shared": dict(top_k=2, num_shared_experts=1, hidden_units=6),
}


@pytest.mark.parametrize("name", sorted(EMPTY_BATCH_LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(name, training):
    layer = MoE(num_experts=4, units=5, **EMPTY_BATCH_LAYERS[name])
    layer.build((None, 7, 3))
    y = layer(np.zeros((0, 7, 3), "float32"), training=training)
    assert tuple(y.shape) == (0, 7, 5)
    # Losses of an empty batch are 0, not the 0 / 0 of a mean.
    for loss in layer.losses:
        assert float(loss) == 0.0
    # Compiled, as `predict` runs it.
    model = keras.Sequential([keras.Input((7, 3)), layer])
    out = model.predict_on_batch(np.zeros((0, 7, 3), "float32"))
    assert out.shape == (0, 7, 5)


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="an unknown batch size is TF graph-only"
)
@pytest.mark.parametrize("num_experts", [4, 80])  # one-hot and sorting plans
def test_unknown_batch_size_in_a_graph_gives_eager_results(num_experts):
    import tensorflow as tf

    layer = MoE(
        num_experts=num_experts,
        units=3,
        top_k=2,
        hidden_units=4,
        capacity_factor=1.2345678,
    )
    x = _x((4, 2048, 3))  # 8192 tokens: tokens * numerator overflowed int32
    layer.build(x.shape)
    _randomize(layer)
    graph_call = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec((None, None, 3))],
    )
    for batch in (x, x[:3], x[:0]):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(graph_call(batch)),
            keras.ops.convert_to_numpy(layer(batch, training=True)),
            rtol=1e-5,
            atol=1e-6,
        )


def test_fit_with_a_partial_last_batch_drops_what_eager_calls_drop():
    # 200 samples in batches of 128: the last batch of 72 has an unknown
    # size in TensorFlow's traced step, and 72 x 128 = 9216 tokens times
    # the numerator of 1.2345678 * 2 / 4 overflowed int32 before.
    layer = MoE(num_experts=4, units=2, top_k=2, capacity_factor=1.2345678)
    model = keras.Sequential([keras.Input((128, 3)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _x((200, 128, 3)), _x((200, 128, 2), 1)
    history = model.fit(
        x,
        y,
        batch_size=128,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[RoutingMetrics()],
    )
    in_fit = history.history[f"{layer.name}_dropped_fraction"][0]
    layer.statistics.reset()
    for start in (0, 128):
        layer(x[start : start + 128], training=True)
    eager = layer.statistics.result("train")["dropped_fraction"]
    assert in_fit == pytest.approx(eager)
