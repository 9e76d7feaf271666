import math

import keras
import numpy as np
import pytest

from moe_keras import DenseExperts
from tests import reference
from tests.grad_utils import gradients
from tests.layer_test_utils import run_layer_test

CONFIGS = [
    dict(),
    dict(activation="relu"),
    dict(hidden_units=6, activation="relu"),
    dict(hidden_units=6, activation="silu", gated=True),
    dict(gated=True, activation="silu", use_bias=False),
    dict(hidden_units=6, gated="clamped_swiglu", use_output_scale=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_layer_contract(config, tmp_path):
    num_weights = (1 if config.get("hidden_units") is None else 2) * (
        2 if config.get("use_bias", True) else 1
    ) + config.get("use_output_scale", False)
    run_layer_test(
        DenseExperts,
        dict(num_experts=3, units=5, **config),
        input_shape=(8, 4),
        expected_output_shape=(8, 3, 5),
        expected_num_trainable_weights=num_weights,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_numpy_reference(config):
    experts = DenseExperts(num_experts=3, units=5, **config)
    x = np.random.normal(size=(10, 4)).astype("float32")
    experts.build(x.shape)
    # Non-zero biases so that a misplaced bias shows.
    for w in experts.weights:
        w.assign(np.random.normal(size=w.shape).astype("float32"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(experts(x)),
        reference.experts_forward(experts, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_grouped_call_runs_each_expert_on_its_own_tokens():
    experts = DenseExperts(num_experts=3, units=5, hidden_units=7, gated=True)
    grouped = np.random.normal(size=(3, 6, 4)).astype("float32")
    out = keras.ops.convert_to_numpy(experts(grouped, grouped=True))
    assert out.shape == (3, 6, 5)
    for e in range(3):
        every_expert = keras.ops.convert_to_numpy(
            experts(grouped[e])
        )  # [6, E, 5]
        np.testing.assert_allclose(out[e], every_expert[:, e], atol=1e-5)


def _numpy_grouped(experts, x, weights=None):
    """float64 forward of `experts(x, grouped=True, group_weights=...)`."""
    acts = {
        "silu": lambda z: z / (1 + np.exp(-z)),
        "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / 2**0.5)),
        "relu": lambda z: np.maximum(z, 0),
        "tanh": np.tanh,
    }
    act = acts.get(keras.activations.serialize(experts.activation))
    params = {w.path.split("/")[-1]: keras.ops.convert_to_numpy(w).astype("float64") for w in
              experts.weights}  # fmt: skip
    first = "kernel" if experts.hidden_units is None else "in_kernel"
    h = np.einsum("gtd,gdh->gth", x, params[first])
    if experts.use_bias:
        h = h + params[first.replace("kernel", "bias")][:, None]
    if experts.gated == "clamped_swiglu":
        gate, up = np.split(h, 2, -1)
        gate = np.minimum(gate, experts.glu_limit)
        up = np.clip(up, -experts.glu_limit, experts.glu_limit)
        h = gate / (1 + np.exp(-experts.glu_alpha * gate)) * (up + 1)
    elif experts.gated:
        gate, up = np.split(h, 2, -1)
        h = act(gate) * up
    else:
        h = act(h)
    scale = 1.0 if weights is None else weights[..., None]
    if "output_scale" in params:
        scale = scale * params["output_scale"][:, None, None]
    if experts.hidden_units is None:
        return h * scale
    out = np.einsum("gth,ghu->gtu", h, params["out_kernel"])
    if experts.use_bias:
        out = out + params["out_bias"][:, None]
    return out * scale


def _central_differences(f, value, eps=1e-5):
    grads = np.zeros(value.size)
    for i in range(value.size):
        step = np.zeros(value.size)
        step[i] = eps
        step = step.reshape(value.shape)
        grads[i] = (f(value + step) - f(value - step)) / (2 * eps)
    return grads.reshape(value.shape)


@pytest.mark.parametrize(
    "batched", [False, True], ids=["per-expert", "batched"]
)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        dict(hidden_units=4, gated=True, activation="silu"),
        dict(hidden_units=4, gated=True, activation="silu", use_bias=False),
        dict(hidden_units=4, gated=True, activation="gelu", use_bias=False),
        dict(hidden_units=4, activation="relu"),
        dict(activation="tanh"),
        dict(
            hidden_units=4,
            gated="clamped_swiglu",
            glu_limit=0.8,
            use_output_scale=True,
        ),
    ],
)
def test_grouped_gradients_match_finite_differences(config, scaled, batched):
    # SwiGLU has hand-written gradients, with and without row weights; the
    # other activations go through autodiff. The MoE layer lets experts
    # weight their own rows (in the hidden layer, where it is cheaper):
    # that must equal scaling the output. Gradients for the inputs and the
    # weights must match central differences of a float64 NumPy forward,
    # in both forms of the matmuls: one per expert (CPU, few experts) and
    # batched (many experts, GPU and TPU, expert parallelism).
    experts = DenseExperts(num_experts=2, units=3, **config)
    rng = np.random.RandomState(1)
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    weights = rng.uniform(0.1, 1.0, size=(2, 5)).astype("float32")
    experts.build(x.shape)
    for w in experts.weights:  # non-zero biases, so their scaling counts
        w.assign(rng.normal(size=w.shape).astype("float32"))
    x64, w64 = x.astype("float64"), weights.astype("float64")
    if not scaled:
        weights = w64 = None

    out = experts(x, grouped=True, group_weights=weights, batched=batched)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out),
        _numpy_grouped(experts, x64, w64),
        rtol=1e-4,
        atol=1e-5,
    )
    cotangent = np.random.RandomState(7).normal(size=out.shape)
    if scaled:
        grad_x, grad_w = gradients(
            lambda x, w: experts(
                x, grouped=True, group_weights=w, batched=batched
            ),
            x,
            weights,
        )
        np.testing.assert_allclose(
            grad_w,
            _central_differences(
                lambda v: np.sum(_numpy_grouped(experts, x64, v) * cotangent),
                w64,
            ),
            rtol=1e-3,
            atol=1e-4,
        )
    else:
        (grad_x,) = gradients(
            lambda x: experts(x, grouped=True, batched=batched), x
        )
    np.testing.assert_allclose(
        grad_x,
        _central_differences(
            lambda v: np.sum(_numpy_grouped(experts, v, w64) * cotangent), x64
        ),
        rtol=1e-3,
        atol=1e-4,
    )


def test_any_input_rank():
    experts = DenseExperts(num_experts=2, units=3)
    assert tuple(experts(np.zeros((2, 5, 7, 4), "float32")).shape) == (
        2,
        5,
        7,
        2,
        3,
    )


def test_experts_are_initialised_like_dense_layers():
    """Each expert's kernel has the spread a `Dense` kernel would have,
    and the experts differ from one another."""
    experts = DenseExperts(
        num_experts=16, units=64, kernel_initializer="glorot_uniform"
    )
    experts.build((None, 64))
    kernel = keras.ops.convert_to_numpy(experts.kernel)
    limit = np.sqrt(6.0 / (64 + 64))
    assert kernel.max() <= limit and kernel.max() > 0.9 * limit
    assert not np.allclose(kernel[0], kernel[1])


def test_seeded_initializer_keeps_experts_distinct():
    experts = DenseExperts(
        num_experts=4,
        units=8,
        kernel_initializer=keras.initializers.GlorotUniform(seed=3),
    )
    experts.build((None, 8))
    kernel = keras.ops.convert_to_numpy(experts.kernel)
    assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_experts=0, units=4), ValueError),
        (dict(num_experts=2.5, units=4), TypeError),
        (dict(num_experts=2, units=0), ValueError),
        (dict(num_experts=2, units=4, hidden_units=-1), ValueError),
        (dict(num_experts=2, units=4, activation="no_such_act"), ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        DenseExperts(**kwargs)


def test_unknown_feature_dimension():
    with pytest.raises(ValueError, match="last dimension"):
        DenseExperts(num_experts=2, units=3).build((None, None))
