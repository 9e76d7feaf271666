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
