import pathlib

import keras
import numpy as np
import pytest

from moe_keras import SigmoidGate
from moe_keras import SoftmaxGate
from tests import reference
from tests.layer_test_utils import run_layer_test


@pytest.mark.parametrize("gate_cls", [SoftmaxGate, SigmoidGate])
@pytest.mark.parametrize("use_bias", [False, True])
def test_layer_contract(gate_cls, use_bias, tmp_path):
    run_layer_test(
        gate_cls,
        dict(num_experts=5, use_bias=use_bias),
        input_shape=(8, 4),
        expected_output_shape=(8, 5),
        expected_num_trainable_weights=2 if use_bias else 1,
        tmp_path=tmp_path,
        # The router stays in float32 under a mixed policy.
        mixed_precision_output_dtype="float32",
    )


@pytest.mark.parametrize("gate_cls", [SoftmaxGate, SigmoidGate])
def test_matches_numpy_reference(gate_cls):
    gate = gate_cls(
        num_experts=5, use_bias=True, bias_initializer="random_normal"
    )
    x = np.random.normal(size=(7, 4)).astype("float32")
    routing = gate(x, routing=True)
    probs, logits = routing["probs"], routing["logits"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gate(x)),
        keras.ops.convert_to_numpy(probs),
        rtol=1e-6,
    )
    ref_probs, ref_logits = reference.gate_forward(gate, x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits), ref_logits, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(probs), ref_probs, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "gate_cls, normalize", [(SoftmaxGate, True), (SigmoidGate, False)]
)
def test_select_top_k(gate_cls, normalize):
    gate = gate_cls(num_experts=6)
    probs = np.random.uniform(0.01, 1, size=(9, 6)).astype("float32")
    probs = probs / probs.sum(-1, keepdims=True)
    weights, indices = gate.select(probs, 3)
    ref, order = reference.top_k_weights(probs, 3, normalize)
    np.testing.assert_array_equal(
        np.sort(keras.ops.convert_to_numpy(indices), -1), np.sort(order, -1)
    )
    rows = np.arange(9)[:, None]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(weights),
        ref[rows, keras.ops.convert_to_numpy(indices)],
        rtol=1e-6,
    )


def test_router_is_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    gate = SoftmaxGate(num_experts=3)
    assert gate.compute_dtype == "float32"
    probs = gate(np.ones((2, 4), "float32"))
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"


def test_unbuilt_gate_without_num_experts_says_so():
    with pytest.raises(ValueError, match="num_experts"):
        SoftmaxGate()(np.ones((2, 4), "float32"))


# --- the `gates` sub-package keeps the single module's names --------------


def test_gates_subpackage_keeps_every_name():
    from moe_keras import gates

    for name in (
        "ExpertChoiceGate", "FeatureGate", "Gate", "HashGate",
        "NoisyTopKGate", "RandomGate", "RoundRobinGate", "SigmoidGate",
        "SoftmaxGate", "StaticGate", "UniformGate", "get", "top_k_indices",
    ):  # fmt: skip
        assert hasattr(gates, name), name
    for name in ("SoftmaxGate", "HashGate", "PerformanceGate", "ClusterGate"):
        registered = keras.saving.get_registered_object(f"moe_keras>{name}")
        assert registered is getattr(gates, name)


def test_files_saved_before_the_gates_subpackage_load_unchanged():
    # Saved by moe_keras at 13d5059 (gates in one `gates.py`): nine MoE
    # layers in a row, one per gate family, with random weights.
    data = pathlib.Path(__file__).parent / "data"
    model = keras.saving.load_model(data / "gates_before_subpackage.keras")
    saved = np.load(data / "gates_before_subpackage.npz")
    inputs = [saved["x"], saved["ids"]]
    if keras.backend.backend() == "jax":
        # One compiled step: JAX compiles eager ops one by one per shape.
        predictions = model.predict(inputs, verbose=0)
    else:
        predictions = keras.ops.convert_to_numpy(model(inputs))
    np.testing.assert_allclose(
        predictions,
        saved["y"],
        rtol=1e-5,
        atol=1e-5,
    )
