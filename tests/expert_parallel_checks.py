"""Expert parallelism on 8 virtual CPU devices (JAX, Keras distribution).

Not collected on its own (the name has no `test_` prefix): the device
count is fixed when JAX starts, so `test_expert_parallel.py` runs this
file in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import collections
import re

import jax
import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import MoE

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax" or len(jax.devices()) < 8,
    reason="needs the JAX backend with 8 devices",
)


@pytest.fixture(autouse=True)
def _no_distribution():
    keras.distribution.set_distribution(None)
    yield
    keras.distribution.set_distribution(None)


def _mesh(shape):
    devices = keras.distribution.list_devices()[: shape[0] * shape[1]]
    return keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)


def _distribute(shape):
    mesh = _mesh(shape)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=moe_keras.get_layout_map(mesh), batch_dim_name="batch"
        )
    )
    return mesh


def _model(token_groups=None, capacity_factor=1.0, **moe_kwargs):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((12,))
    h = keras.layers.Dense(16)(inputs)
    h = MoE(
        8,
        16,
        hidden_units=32,
        top_k=2,
        capacity_factor=capacity_factor,
        token_groups=token_groups,
        name="moe",
        **moe_kwargs,
    )(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, np.tanh(x[:, :1] * x[:, 1:2]).astype("float32")


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.parametrize(
    "shape, capacity_factor, samples",
    # 70 samples: a last batch of 6 tokens for 8 groups (padded).
    [((2, 4), 1.0, 64), ((8, 1), 1.0, 64), ((1, 8), 0.5, 70)],
)
def test_fit_matches_one_device_running_the_same_groups(
    shape, capacity_factor, samples
):
    x, y = _data(samples)
    reference = _model(token_groups=8, capacity_factor=capacity_factor)
    expected = reference.fit(
        x, y, batch_size=32, epochs=2, shuffle=False, verbose=0
    ).history["loss"]
    expected_weights = _weights(reference)
    expected_predictions = reference.predict(x, batch_size=32, verbose=0)

    _distribute(shape)
    model = _model(capacity_factor=capacity_factor)
    kernel = model.get_layer("moe").experts.kernel_in
    assert tuple(kernel.value.sharding.spec)[0] == "model"
    losses = model.fit(
        x, y, batch_size=32, epochs=2, shuffle=False, verbose=0
    ).history["loss"]
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(_weights(model), expected_weights):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Inference (dropless by default) after the same updates.
    np.testing.assert_allclose(
        model.predict(x, batch_size=32, verbose=0),
        expected_predictions,
        rtol=1e-4,
        atol=1e-5,
    )


def _compiled_step(model, mesh, x):
    """The layer's forward and backward, compiled for the mesh."""
    layer = model.get_layer("moe")
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.sum(y**2)

    if mesh is not None:
        sharding = keras.distribution.TensorLayout(
            ["batch", None], mesh
        ).backend_layout
        x = jax.device_put(x, sharding)
    return jax.jit(jax.grad(loss)).lower(trainable, x).compile()


def _collectives(hlo):
    return collections.Counter(
        re.findall(
            r"\b(all-to-all|all-gather|all-reduce|collective-permute)"
            r"(?:-start)?\(",
            hlo,
        )
    )


def _flops(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return analysis["flops"]


# Two of the four mesh x expert-form pairs: each compiles a sharded step,
# and the collectives depend on the mesh, not on the form.
@pytest.mark.parametrize(
    "shape, gated", [((2, 4), False), ((1, 8), True)], ids=["relu", "swiglu"]
)
def test_tokens_travel_by_all_to_all_and_expert_weights_stay(shape, gated):
    x = np.random.default_rng(1).normal(size=(256, 16)).astype("float32")
    mesh = _distribute(shape)
    model = _model(gated=gated, activation="silu" if gated else "relu")
    hlo = _compiled_step(model, mesh, x).as_text()
    collectives = _collectives(hlo)
    assert collectives["all-to-all"] >= 2, collectives
    # Each device routes its own group's tokens: nothing token-sized is
    # gathered (the router's weight gradient is an all-reduce of parts).
    assert collectives["all-gather"] == 0, collectives
    # Each group's routing plan is built on its own device: no integer
    # (plan) data crosses devices.
    for line in hlo.splitlines():
        if re.search(r"\ball-reduce(-start)?\(", line):
            assert "s32[" not in line.split("all-reduce")[0], line
    # Nothing of an expert weight's full shape is gathered or permuted.
    layer = model.get_layer("moe")
    for weight in layer.experts.weights:
        full = ",".join(str(d) for d in weight.shape)
        for line in hlo.splitlines():
            if re.search(r"\b(all-gather|collective-permute)(-start)?\(", line):
                assert f"[{full}]" not in line, line


def test_expert_flops_per_device_fall_with_the_expert_axis():
    x = np.random.default_rng(2).normal(size=(512, 16)).astype("float32")
    flops = {}
    for devices in (1, 2, 4, 8):
        keras.distribution.set_distribution(None)
        mesh = _distribute((1, devices)) if devices > 1 else None
        # Wide experts, so that the experts dominate the step.
        model = _model(token_groups=8 if devices == 1 else None)
        flops[devices] = _flops(_compiled_step(model, mesh, x))
    for devices in (2, 4, 8):
        ratio = flops[1] / flops[devices]
        assert devices * 0.75 <= ratio <= devices * 1.25, flops


def test_save_load_and_predict_under_the_distribution(tmp_path):
    x, y = _data()
    _distribute((2, 4))
    model = _model()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    expected = model.predict(x, batch_size=32, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    kernel = restored.get_layer("moe").experts.kernel_in
    assert tuple(kernel.value.sharding.spec)[0] == "model"
    np.testing.assert_allclose(
        restored.predict(x, batch_size=32, verbose=0), expected, atol=1e-6
    )
    # And on one device again, with the groups the mesh had.
    keras.distribution.set_distribution(None)
    single = keras.saving.load_model(path)
    single.get_layer("moe").token_groups = 8
    np.testing.assert_allclose(
        single.predict(x, batch_size=32, verbose=0), expected, atol=1e-5
    )


def test_data_parallel_uses_one_group_per_device():
    x, y = _data()
    reference = _model(token_groups=8)
    expected = reference.fit(
        x, y, batch_size=32, epochs=1, shuffle=False, verbose=0
    ).history["loss"]
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _model()
    losses = model.fit(
        x, y, batch_size=32, epochs=1, shuffle=False, verbose=0
    ).history["loss"]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_layouts_that_cannot_apply_fail_clearly():
    _distribute((2, 4))
    with pytest.raises(ValueError, match="num_experts=6.*'model'"):
        keras.Sequential([keras.Input((8,)), MoE(6, 8, top_k=2)])
    experts = [keras.layers.Dense(8) for _ in range(4)]
    with pytest.raises(ValueError, match="list of separate layers"):
        keras.Sequential(
            [
                keras.Input((8,)),
                MoE(experts=experts, top_k=1, capacity_factor=1.0),
            ]
        )
    with pytest.raises(ValueError, match="token_groups=4.*8 devices"):
        keras.Sequential(
            [keras.Input((8,)), MoE(8, 8, top_k=2, token_groups=4)]
        )
    # One layer kept replicated by its exact paths: its dispatch alone is
    # not enough (the weights would stay sharded, moving slices every
    # step); the error lists every entry.
    mesh = _mesh((2, 4))
    layout_map = moe_keras.get_layout_map(mesh)
    layout_map["replicated/experts/dispatch_buffers"] = (
        None,
        "batch",
        None,
        None,
    )
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    for num_experts in (8, 6):
        with pytest.raises(
            ValueError, match=r"(?s)agree.*out_bias'\] = \(None, None\)"
        ):
            inputs = keras.Input((8,))
            MoE(num_experts, 8, hidden_units=8, top_k=2, name="replicated")(
                inputs
            )
    for name in ("in_kernel", "out_kernel"):
        layout_map[f"replicated/experts/{name}"] = (None, None, None)
    for name in ("in_bias", "out_bias"):
        layout_map[f"replicated/experts/{name}"] = (None, None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    inputs = keras.Input((8,))
    outputs = MoE(6, 8, hidden_units=8, top_k=2, name="replicated")(inputs)
    model = keras.Model(inputs, outputs)
    out = model.predict(np.ones((16, 8), "float32"), verbose=0)
    assert out.shape == (16, 8) and np.isfinite(out).all()
