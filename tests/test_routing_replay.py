"""Recording a model's routing in one call and replaying it in another."""

import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import MoE
from moe_keras import RoutingRecorder
from moe_keras import RoutingReplayer
from tests import grad_utils
from tests.backend_marks import BACKEND
from tests.backend_marks import NO_EXPORT

E, K, D = 4, 2, 4


def _model(**options):
    options = {"num_experts": E, "units": D, "top_k": K, **options}
    return keras.Sequential([keras.Input((3, D)), MoE(name="moe", **options)])


def _x(batch=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 3, D)).astype("float32")


def _softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _reference_choice(scores, k):
    # A stable sort keeps tied experts in index order: the lower first.
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


@pytest.mark.parametrize(
    "options",
    [
        {"dispatch": "dense"},
        {"dispatch": "sparse", "eval_capacity_factor": 0.5},  # drops
        {"dispatch": "sparse", "capacity_factor": None},
    ],
    ids=["dense", "capacity", "dropless"],
)
def test_replay_reproduces_recording(options, tmp_path):
    model = _model(**options)
    x = _x()
    outputs, routing = RoutingRecorder(model).predict(
        x, batch_size=4, verbose=0
    )
    # The recording is the gate's own choice, ties to the lower index.
    kernel = _numpy(model.get_layer("moe").gate.kernel)
    expected = _reference_choice(_softmax(x @ kernel), K)
    assert routing["moe"].dtype == np.int32
    np.testing.assert_array_equal(routing["moe"], expected)
    np.testing.assert_array_equal(
        outputs, model.predict(x, batch_size=4, verbose=0)
    )
    # Saved as NumPy and replayed: the outputs exactly.
    np.savez(tmp_path / "routing.npz", **routing)
    loaded = dict(np.load(tmp_path / "routing.npz"))
    replayed = RoutingReplayer(model).predict(
        (x, loaded), batch_size=4, verbose=0
    )
    np.testing.assert_array_equal(replayed, outputs)


def _reference_forward(x, router, kernel, bias, indices):
    """The MoE output and d sum(y * cotangent) / d router, by hand."""
    t = x.reshape(-1, D)
    idx = indices.reshape(-1, K)
    probs = _softmax(t @ router)
    chosen = np.take_along_axis(probs, idx, axis=-1)
    total = chosen.sum(-1, keepdims=True)
    weights = chosen / total  # SoftmaxGate renormalises at k > 1
    expert_out = np.einsum("td,edu->teu", t, kernel) + bias  # [T, E, u]
    picked = np.take_along_axis(expert_out, idx[..., None], axis=1)
    y = np.einsum("tk,tku->tu", weights, picked)
    cotangent = np.random.RandomState(7).normal(size=x.shape[:-1] + (D,))
    d_weights = np.einsum("tu,tku->tk", cotangent.reshape(-1, D), picked)
    d_chosen = d_weights - (d_weights * weights).sum(-1, keepdims=True)
    d_chosen = d_chosen / total
    d_probs = np.zeros_like(probs)
    np.put_along_axis(d_probs, idx, d_chosen, axis=-1)
    d_logits = probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True))
    return y.reshape(x.shape[:-1] + (D,)), t.T @ d_logits


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_forced_experts_forward_and_router_gradient(dispatch):
    layer = MoE(
        num_experts=E,
        units=D,
        top_k=K,
        dispatch=dispatch,
        capacity_factor=None,
        name="moe",
    )
    x = _x(batch=2)
    layer(x)
    router = _numpy(layer.gate.kernel)
    own = _reference_choice(_softmax(x @ router), K)
    # Each position's two worst experts, in reverse: not the gate's choice.
    forced = _reference_choice(-_softmax(x @ router), K).astype("int32")
    assert not np.any(forced == own)
    kernel, bias = _numpy(layer.experts.kernel), _numpy(layer.experts.bias)
    trainable = list(layer.trainable_variables)
    position = next(
        i for i, v in enumerate(trainable) if v is layer.gate.kernel
    )

    def run(router_kernel):
        values = [_numpy(v) for v in trainable]
        values[position] = router_kernel
        y, _ = layer.stateless_call(
            values,
            [v.value for v in layer.non_trainable_variables],
            x,
            expert_indices=forced,
        )
        return y

    expected_y, expected_grad = _reference_forward(
        x, router, kernel, bias, forced
    )
    np.testing.assert_allclose(
        _numpy(run(router)), expected_y, rtol=1e-5, atol=1e-5
    )
    (grad,) = grad_utils.gradients(run, router)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_train_with_replay_then_save(tmp_path):
    model = _model(
        capacity_factor=None, load_balance_weight=0.0, z_loss_weight=0.0
    )
    x = _x(batch=8)
    y = np.random.default_rng(1).normal(size=(8, 3, D)).astype("float32")
    _, routing = RoutingRecorder(model).predict(x, verbose=0)
    router_before = _numpy(model.get_layer("moe").gate.kernel)
    replayer = RoutingReplayer(model)
    replayer.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        jit_compile=BACKEND != "torch",
    )
    replayer.fit((x, routing), y, batch_size=4, epochs=1, verbose=0)
    replayer.train_on_batch((x, routing), y)
    # Without auxiliary losses, only the task's gradient moves the router.
    router_after = _numpy(model.get_layer("moe").gate.kernel)
    assert np.abs(router_after - router_before).max() > 1e-4
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    # Eager calls (compiling two predict steps costs seconds on JAX).
    np.testing.assert_array_equal(
        _numpy(RoutingReplayer(loaded)((x, routing))),
        _numpy(RoutingReplayer(model)((x, routing))),
    )


def _tied_model():
    model = _model(capacity_factor=None)
    # Experts 1 and 3 score alike, and so do 0 and 2: every position ties.
    column = np.random.default_rng(2).normal(size=(D,)).astype("float32")
    router = np.stack([0 * column, column, 0 * column, column], axis=-1)
    model.get_layer("moe").gate.kernel.assign(router)
    return model, router


def test_ties_break_to_lower_index():
    model, router = _tied_model()
    x = _x(batch=8)
    _, routing = RoutingRecorder(model).predict(x, verbose=0)
    expected = _reference_choice(_softmax(x @ router), K)
    assert set(map(tuple, expected.reshape(-1, K))) == {(0, 2), (1, 3)}
    np.testing.assert_array_equal(routing["moe"], expected)


@NO_EXPORT
def test_exported_recorder_serves_routing(tmp_path):
    import tensorflow as tf

    model, router = _tied_model()
    x = _x(batch=8)
    recorder = RoutingRecorder(model)
    outputs, routing = recorder.predict(x, verbose=0)
    path = str(tmp_path / "recorder")
    recorder.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)  # kept: `serve` holds it weakly
    served = loaded.serve(tf.constant(x))
    assert sorted(served) == ["outputs", "routing_moe"]
    np.testing.assert_array_equal(served["routing_moe"].numpy(), routing["moe"])
    np.testing.assert_allclose(
        served["outputs"].numpy(), outputs, rtol=1e-5, atol=1e-6
    )


def test_masked_positions_are_ignored_on_replay():
    tokens = keras.Input((3,), dtype="int32")
    hidden = keras.layers.Embedding(9, D, mask_zero=True)(tokens)
    model = keras.Model(
        tokens, MoE(num_experts=E, units=D, top_k=K, name="moe")(hidden)
    )
    ids = np.array([[1, 2, 0], [3, 0, 0]], "int32")
    outputs, routing = RoutingRecorder(model)(ids)
    outputs, routing = _numpy(outputs), _numpy(routing["moe"])
    # Any experts at the padding: it is not routed.
    routing[ids == 0] = [K, K - 1]
    replayed = _numpy(RoutingReplayer(model)((ids, {"moe": routing})))
    np.testing.assert_array_equal(replayed, outputs)
    np.testing.assert_array_equal(outputs[ids == 0], 0.0)


def test_bad_routing_is_a_clear_error():
    model = _model()
    x = _x(batch=2)
    _, routing = RoutingRecorder(model).predict(x, verbose=0)
    replayer = RoutingReplayer(model)
    good = routing["moe"]
    cases = [
        ({"other": good}, ValueError, "unknown entries \\['other'\\]"),
        ({}, ValueError, "lacks \\['moe'\\]"),
        ({"moe": good[..., :1]}, ValueError, "top_k=2"),
        ({"moe": good + E}, ValueError, "num_experts=4"),
        ({"moe": np.zeros_like(good)}, ValueError, "distinct"),
        ({"moe": good.astype("float32")}, TypeError, "integer"),
        ({"moe": good[:1]}, ValueError, "batch of 2"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            replayer.predict((x, bad), verbose=0)
    with pytest.raises(ValueError, match="\\(inputs, routing\\)"):
        replayer(x)
    layer = model.get_layer("moe")
    with pytest.raises(ValueError, match="inputs' shape"):
        layer(x, expert_indices=good.reshape(2, 3, 1, K))
    dense = MoE(num_experts=E, units=D, name="dense_moe")
    with pytest.raises(ValueError, match="no per-position top-k"):
        dense(x, expert_indices=good)
    no_choice = keras.Sequential([keras.Input((3, D)), dense])
    with pytest.raises(ValueError, match="no MoE layer with a top-k"):
        RoutingRecorder(no_choice)
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        RoutingReplayer(layer)


def test_public_names():
    assert moe_keras.RoutingRecorder is RoutingRecorder
    assert "RoutingReplayer" in moe_keras.__all__
    config = RoutingReplayer(_model(), name="replayer").get_config()
    revived = RoutingReplayer.from_config(config)
    assert revived.name == "replayer"
    assert revived.model.get_layer("moe").top_k == K


def test_keras_hub_generate_then_replay():
    keras_hub = pytest.importorskip("keras_hub")
    if BACKEND == "jax":
        pytest.skip("TensorFlow and torch only (CI time: generate compiles)")
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=50, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
        num_experts=4, top_k=2, sliding_window=16,
    )  # fmt: skip
    model = moe_keras.sparsify(
        keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    )
    prompt = {
        "token_ids": np.array([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]], "int32"),
        "padding_mask": np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], bool),
    }
    model.compile(sampler="greedy")
    generated = model.generate(prompt, stop_token_ids=None)
    # The decoding loop hands no routing out: one prefill pass records it.
    logits, routing = RoutingRecorder(model).predict_on_batch(generated)
    # Every block names its layer `moe`: the entries go by path.
    assert sorted(routing) == [
        f"transformer_layer_{i}/sparse_moe_block/moe" for i in (0, 1)
    ]
    for indices in routing.values():
        assert indices.shape == (2, 5, 2)
    # The pass sees what decoding saw: greedy picked each generated token
    # as the argmax of the logits before it.
    for row, start in enumerate(prompt["padding_mask"].sum(-1)):
        np.testing.assert_array_equal(
            np.argmax(logits[row, start - 1 : -1], -1),
            generated["token_ids"][row, start:],
        )
    replayer = RoutingReplayer(model)
    np.testing.assert_array_equal(
        replayer.predict_on_batch((generated, routing)), logits
    )
    replayer.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    labels = np.roll(generated["token_ids"], -1, axis=1)
    assert np.isfinite(replayer.train_on_batch((generated, routing), labels))


class _OwnRouteGate(moe_keras.SoftmaxGate):
    def route(self, x, top_k, training=None, mask=None, routing_ids=None):
        return super().route(x, top_k, training, mask, routing_ids)


def test_gates_under_replay():
    x = _x(batch=2)
    forced = np.tile(np.array([3, 1], "int32"), (2, 3, 1))
    # The noise only explores the choice: replayed, training adds none.
    noisy = MoE(
        num_experts=E,
        units=D,
        top_k=K,
        gate=moe_keras.NoisyTopKGate(seed=0),
        capacity_factor=None,
    )
    np.testing.assert_array_equal(
        _numpy(noisy(x, expert_indices=forced, training=True)),
        _numpy(noisy(x, expert_indices=forced)),
    )
    hashed = MoE(num_experts=E, units=D, top_k=K, gate=moe_keras.HashGate())
    hashed(x, routing_ids=np.zeros((2, 3), "int32"))
    kernel, bias = _numpy(hashed.experts.kernel), _numpy(hashed.experts.bias)
    expected = 0.5 * (x @ kernel[3] + bias[3] + x @ kernel[1] + bias[1])
    np.testing.assert_allclose(
        _numpy(
            hashed(
                x,
                routing_ids=np.zeros((2, 3), "int32"),
                expert_indices=forced,
            )
        ),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    own = MoE(num_experts=E, units=D, top_k=K, gate=_OwnRouteGate())
    own(x)
    with pytest.raises(ValueError, match="takes no `indices`"):
        own(x, expert_indices=forced)
