"""Token groups (`MoE(token_groups=G)`) and expert parallelism.

The groups are checked on every backend against a NumPy recount that
routes each group on its own, with the group's own capacity. The
multi-device checks need a fresh process (the device count is fixed when
the backend starts): JAX on 8 virtual CPU devices runs
`expert_parallel_checks.py`, TensorFlow with 2 logical CPUs runs
`mirrored_checks.py`.
"""

import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import moe_keras
from moe_keras import MoE
from moe_keras import group_dispatch
from tests import reference

BACKEND = keras.backend.backend()
TESTS = pathlib.Path(__file__).parent


def _grouped_reference(layer, x, groups, capacity_factor, valid=None):
    """Each group routed alone, padded with unrouted rows to equal size."""
    tokens = x.shape[0]
    size = -(-tokens // groups)
    padded = np.zeros((size * groups, x.shape[1]), x.dtype)
    padded[:tokens] = x
    present = np.zeros(size * groups, bool)
    present[:tokens] = True if valid is None else valid
    capacity = None
    if capacity_factor is not None:
        exact = capacity_factor * size * layer.top_k / layer.num_experts
        capacity = max(1, min(math.ceil(exact - 1e-9), size))
    out = [
        reference.moe_forward(
            layer,
            padded[g * size : (g + 1) * size],
            capacity=capacity if capacity is not None else size,
            valid=present[g * size : (g + 1) * size],
        )
        for g in range(groups)
    ]
    return np.concatenate(out)[:tokens]


@pytest.mark.skipif(
    BACKEND == "jax",
    reason="JAX compiles every new shape of an eager call (minutes here); "
    "its grouped dispatch is checked on 8 devices and by the dropless test",
)
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    groups=st.integers(1, 5),
    tokens=st.integers(1, 23),
    num_experts=st.integers(2, 6),
    data=st.data(),
)
def test_each_group_routes_alone_with_its_own_capacity(
    groups, tokens, num_experts, data
):
    top_k = data.draw(st.integers(1, num_experts), label="k")
    capacity_factor = data.draw(
        st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]), label="capacity_factor"
    )
    masked = data.draw(st.booleans(), label="masked")
    training = data.draw(st.booleans(), label="training")
    layer = MoE(
        num_experts,
        4,
        hidden_units=5,
        activation="relu",
        top_k=top_k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        dispatch="sparse",
        token_groups=groups,
    )
    rng = np.random.default_rng(tokens * 31 + groups)
    x = rng.normal(size=(tokens, 3)).astype("float32")
    valid = rng.random(tokens) > 0.3 if masked else None
    mask = None if valid is None else keras.ops.convert_to_tensor(valid)
    y = keras.ops.convert_to_numpy(layer(x, training=training, mask=mask))
    expected = _grouped_reference(layer, x, groups, capacity_factor, valid)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capacity", [None, 1, 2, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_sorted_inverse_map_is_the_scattered_one(capacity, masked):
    # Under a distribution the plan's slot -> assignment map comes from a
    # sort batched over groups (the scatter is not partitioned by XLA);
    # both must build the same plan, drops and empty groups included.
    rng = np.random.default_rng(capacity or 0)
    indices = np.stack([rng.permutation(4)[:2] for _ in range(3 * 7)]).reshape(
        3, 7, 2
    )
    indices[1] = 0  # a group that overflows expert 0
    valid = rng.random((3, 7)) > 0.3 if masked else None
    if masked:
        valid[2] = False  # a group with nothing to route
    plans = [
        group_dispatch.GroupRoutePlan(
            indices.astype("int32"), 4, capacity, valid, partitioned=sort
        )
        for sort in (False, True)
    ]
    for name in ("slot_filled", "slot_assignment", "kept", "assignment_slot"):
        scattered, sorted_ = (
            keras.ops.convert_to_numpy(getattr(plan, name)) for plan in plans
        )
        np.testing.assert_array_equal(sorted_, scattered, err_msg=name)


def test_dropless_groups_change_nothing():
    x = np.random.default_rng(0).normal(size=(37, 6)).astype("float32")
    grouped = MoE(8, 5, hidden_units=7, top_k=2, token_groups=4)
    plain = MoE(8, 5, hidden_units=7, top_k=2)
    grouped(x[:1])
    plain(x[:1])
    plain.set_weights(grouped.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(grouped(x)),
        keras.ops.convert_to_numpy(plain(x)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_fit_with_a_partial_batch_and_save_load(tmp_path):
    x = np.random.default_rng(1).normal(size=(45, 6)).astype("float32")
    y = x[:, :1] * 2.0
    model = keras.Sequential(
        [
            keras.Input((6,)),
            MoE(4, 8, top_k=2, capacity_factor=1.0, token_groups=4),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    path = str(tmp_path / "grouped.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.layers[0].token_groups == 4
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


def test_global_load_balance_is_the_batch_loss_on_one_device():
    # Without a tf.distribute strategy the step sees the whole batch: the
    # option must leave the loss (and so training) as it is, and persist.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 7, 6)).astype("float32")
    mask = keras.ops.convert_to_tensor(rng.random((3, 7)) > 0.3)
    plain = MoE(4, 5, top_k=2, load_balance_weight=1.0, z_loss_weight=0.0)
    global_ = MoE.from_config(
        {**plain.get_config(), "global_load_balance": True}
    )
    assert global_.get_config()["global_load_balance"] is True
    plain(x[:1])
    global_(x[:1])
    global_.set_weights(plain.get_weights())
    losses = []
    for layer in (plain, global_):
        layer(x, training=True, mask=mask)
        losses.append(keras.ops.convert_to_numpy(sum(layer.losses)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert losses[0] > 0.5  # the balance loss is near 1 for any routing


def test_token_groups_is_checked():
    with pytest.raises(TypeError, match="token_groups"):
        MoE(4, 8, top_k=2, token_groups=2.5)
    with pytest.raises(ValueError, match="token_groups"):
        MoE(4, 8, top_k=2, token_groups=0)
    with pytest.raises(ValueError, match="token_groups"):
        MoE(4, 8, token_groups=2)  # the dense mixture has no dispatch
    with pytest.raises(ValueError, match="token_groups"):
        MoE(4, 8, gate=moe_keras.ExpertChoiceGate(), token_groups=2)


@pytest.mark.skipif(BACKEND != "jax", reason="Keras distributes on JAX")
def test_get_layout_map_checks_its_arguments():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ["batch", "model"], keras.distribution.list_devices()[:1]
    )
    layout_map = moe_keras.get_layout_map(mesh)
    assert layout_map["m/moe/experts/in_kernel"].axes == ("model", None, None)
    assert layout_map["m/moe/experts/out_bias"].axes == ("model", None)
    assert layout_map["m/moe/shared_experts/in_kernel"] is None
    with pytest.raises(TypeError, match="device_mesh"):
        moe_keras.get_layout_map("mesh")
    with pytest.raises(ValueError, match="model_parallel_dim_name='expert'"):
        moe_keras.get_layout_map(mesh, model_parallel_dim_name="expert")
    with pytest.raises(ValueError, match="differ"):
        moe_keras.get_layout_map(mesh, "batch", "batch")


def _run_checks(script, env):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [str(TESTS / script)],
        env={**os.environ, **env},
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.skipif(BACKEND != "jax", reason="runs once, in the JAX suite")
def test_expert_parallelism_on_8_devices():
    _run_checks(
        "expert_parallel_checks.py",
        {
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        },
    )


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="runs once, in the TensorFlow suite"
)
def test_mirrored_strategy_on_2_cpus():
    _run_checks("mirrored_checks.py", {"KERAS_BACKEND": "tensorflow"})
