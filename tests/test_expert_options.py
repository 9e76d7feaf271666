"""The options today's MoE models need, each against a NumPy reference:
GPT-OSS's clamped SwiGLU and its biased top-k-softmax router, Gemma 4's
per-expert output scale, its router input transform and a router that
scores other inputs than the experts run on (`router_inputs`)."""

import os

import keras
import numpy as np
import pytest

from moe_keras import DenseExperts
from moe_keras import MoE
from moe_keras import SoftmaxGate
from moe_keras import StaticGate
from tests import reference
from tests.backend_marks import NO_EXPORT
from tests.grad_utils import gradients

CLAMPED = dict(gated="clamped_swiglu", glu_alpha=1.3, glu_limit=0.9)
GEMMA4_GATE = dict(
    input_norm="rms", input_multiplier=3**-0.5, use_input_scale=True
)


def _x(shape, seed=0, scale=1.0):
    rng = np.random.RandomState(seed)
    return (scale * rng.normal(size=shape)).astype("float32")


def _randomize(layer, seed=3):
    rng = np.random.RandomState(seed)
    for w in layer.weights:
        if w.trainable:
            w.assign(rng.normal(scale=0.7, size=w.shape).astype("float32"))


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("hidden_units", [None, 4])
@pytest.mark.parametrize("use_bias", [True, False])
def test_clamped_swiglu_and_output_scale_match_numpy(hidden_units, use_bias):
    experts = DenseExperts(
        num_experts=3,
        units=5,
        hidden_units=hidden_units,
        use_bias=use_bias,
        use_output_scale=True,
        **CLAMPED,
    )
    x = _x((9, 3), scale=3.0)  # wide enough to reach both clamps
    experts.build(x.shape)
    _randomize(experts)
    h = x @ _numpy(experts.weights[0])[0]
    # The inputs do hit the clamps (above and below) somewhere.
    assert (h > 0.9).any() and (h < -0.9).any()
    np.testing.assert_allclose(
        _numpy(experts(x)),
        reference.experts_forward(experts, x),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "dispatch, capacity_factor, grouped_matmul",
    [
        ("dense", 1.25, "auto"),
        ("sparse", 4.0, "auto"),  # room for every token: nothing dropped
        ("sparse", None, "blocks"),
        ("sparse", None, "reference"),  # rows sorted by expert
    ],
)
def test_moe_with_every_option_matches_numpy(
    dispatch, capacity_factor, grouped_matmul
):
    """GPT-OSS's experts with Gemma 4's output scale and router, routed on
    other inputs than the experts run on, through each dispatch."""
    layer = MoE(
        num_experts=4,
        units=3,
        hidden_units=4,
        top_k=2,
        gate=SoftmaxGate(use_bias=True, normalize_top_k=True, **GEMMA4_GATE),
        dispatch=dispatch,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        grouped_matmul=grouped_matmul,
        use_output_scale=True,
        **CLAMPED,
    )
    x, routed_on = _x((2, 6, 3), 1, scale=2.0), _x((2, 6, 3), 2)
    layer.build(x.shape)
    _randomize(layer)
    expected = reference.moe_forward(
        layer, x.reshape(-1, 3), router_x=routed_on.reshape(-1, 3)
    ).reshape(2, 6, 3)
    for training in (False, True):
        got = layer(x, router_inputs=routed_on, training=training)
        np.testing.assert_allclose(_numpy(got), expected, rtol=1e-5, atol=1e-5)
    # Routing on the inputs themselves is a different function.
    assert not np.allclose(_numpy(layer(x)), expected, atol=1e-3)


def test_gate_input_transform_matches_numpy():
    gate = SoftmaxGate(num_experts=5, **GEMMA4_GATE)
    x = _x((7, 3), scale=5.0)
    gate.build(x.shape)
    _randomize(gate)
    probs, _ = reference.gate_forward(gate, x)
    np.testing.assert_allclose(_numpy(gate(x)), probs, rtol=1e-5, atol=1e-6)
    # RMS-normalised: the scale of a row does not change its routing.
    np.testing.assert_allclose(_numpy(gate(10.0 * x)), probs, atol=1e-5)


def test_biased_router_with_top_k_softmax_is_gpt_oss_routing():
    """GPT-OSS takes the softmax over the k largest logits of a biased
    linear router: `SoftmaxGate(use_bias=True, normalize_top_k=True)`."""
    gate = SoftmaxGate(num_experts=6, use_bias=True, normalize_top_k=True)
    x = _x((10, 4))
    gate.build(x.shape)
    _randomize(gate)
    routing = gate(x, routing=True, top_k=3)
    logits = x @ _numpy(gate.kernel) + _numpy(gate.bias)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :3]
    expected = reference.softmax(np.take_along_axis(logits, top, axis=-1))
    np.testing.assert_array_equal(_numpy(routing["indices"]), top)
    np.testing.assert_allclose(_numpy(routing["weights"]), expected, atol=1e-6)


@pytest.mark.parametrize("dropless", [False, True])
def test_sparse_gradients_equal_dense_gradients(dropless):
    """Every weight's gradient, the output and input scales' included,
    through the sparse dispatch equals the dense mixture's."""
    common = dict(
        num_experts=4,
        units=3,
        hidden_units=4,
        top_k=2,
        use_output_scale=True,
        **CLAMPED,
    )
    layers = [
        MoE(
            dispatch=dispatch,
            gate=SoftmaxGate(use_bias=True, **GEMMA4_GATE),
            capacity_factor=None if dropless else 4.0,
            **common,
        )
        for dispatch in ("dense", "sparse")
    ]
    x = _x((10, 3), scale=2.0)
    for layer in layers:
        layer.build(x.shape)
    _randomize(layers[0])
    layers[1].set_weights(layers[0].get_weights())
    grads = []
    for layer in layers:
        values = [_numpy(w) for w in layer.trainable_weights]

        def fn(x, *values, layer=layer):
            out, _ = layer.stateless_call(
                list(values),
                [v.value for v in layer.non_trainable_variables],
                x,
                training=True,
            )
            return out

        grads.append(gradients(fn, x, *values))
    names = [w.path.split("/")[-1] for w in layers[0].trainable_weights]
    assert {"output_scale", "input_scale"} <= set(names)
    for name, got, want in zip(names, grads[1], grads[0]):
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_router_inputs_in_a_functional_model_round_trip(tmp_path):
    x_in = keras.Input((5, 3))
    r_in = keras.Input((5, 3))
    moe = MoE(
        num_experts=4,
        units=3,
        hidden_units=4,
        top_k=2,
        capacity_factor=None,
        use_output_scale=True,
        gate=SoftmaxGate(**GEMMA4_GATE),
        **CLAMPED,
    )
    model = keras.Model([x_in, r_in], moe(x_in, router_inputs=r_in))
    model.compile("adam", "mse")
    x, r, y = _x((6, 5, 3), 1), _x((6, 5, 3), 2), _x((6, 5, 3), 3)
    model.fit([x, r], y, epochs=2, batch_size=4, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict([x, r], verbose=0), model.predict([x, r], verbose=0)
    )
    config = loaded.layers[-1].get_config()
    assert config["gated"] == "clamped_swiglu"
    assert config["glu_limit"] == 0.9 and config["use_output_scale"]
    assert config["gate"]["config"]["input_norm"] == "rms"


@NO_EXPORT
def test_saved_model_export_serves_the_same_numbers(tmp_path):
    import tensorflow as tf

    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            MoE(
                num_experts=4,
                units=3,
                hidden_units=4,
                top_k=2,
                capacity_factor=None,
                use_output_scale=True,
                gate=SoftmaxGate(use_bias=True, **GEMMA4_GATE),
                **CLAMPED,
            ),
        ]
    )
    _randomize(model)
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    x = _x((3, 5, 3), 4, scale=2.0)
    np.testing.assert_allclose(
        _numpy(served.serve(tf.constant(x))),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DenseExperts(2, 3, gated="swiglu"), "gated"),
        (
            lambda: DenseExperts(
                2, 3, gated="clamped_swiglu", activation="silu"
            ),
            "activation",
        ),
        (lambda: DenseExperts(2, 3, gated=True, glu_limit=0.0), "glu_limit"),
        (lambda: MoE(2, 3, gated="clamped_swiglu", glu_alpha=-1), "glu_alpha"),
        (
            lambda: MoE(
                experts=[keras.layers.Dense(3)] * 2, use_output_scale=True
            ),
            "use_output_scale",
        ),
        (lambda: SoftmaxGate(input_norm="layer"), "input_norm"),
        (lambda: SoftmaxGate(input_norm_epsilon=0.0), "input_norm_epsilon"),
        (
            lambda: SoftmaxGate(input_multiplier=float("nan")),
            "input_multiplier",
        ),
        (lambda: StaticGate(use_input_scale=True), "use_input_scale"),
    ],
)
def test_bad_options_are_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_router_inputs_of_another_shape_is_a_clear_error():
    layer = MoE(num_experts=2, units=3, top_k=1)
    with pytest.raises(ValueError, match="router_inputs"):
        layer(_x((4, 3)), router_inputs=_x((4, 2)))
