"""The grouped matmul behind dropless dispatch, and dropless on it.

No GPU or TPU runs here, so the kernels' plumbing is checked with what
runs on a CPU: XLA's `ragged_dot` under the same custom VJP the Mosaic GPU
kernels use, JAX's Megablox kernels in Pallas interpret mode, torch's
`grouped_mm`, and the `keras.ops` reference; each against a NumPy loop
over the groups and finite differences. Then the whole layer: dropless on
sorted rows gives the block layout's outputs, gradients and `fit` updates.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from moe_keras import DenseExperts
from moe_keras import MoE
from moe_keras import dispatch
from moe_keras import kernels
from tests.backend_marks import BACKEND
from tests.grad_utils import gradients

# The grouped matmul each backend can run on a CPU besides the reference.
NATIVE = {"jax": "ragged_dot", "torch": "torch", "tensorflow": "reference"}[
    BACKEND
]
IMPLEMENTATIONS = sorted({NATIVE, "reference"})


def _numpy_grouped(x, w, sizes):
    y = np.zeros((x.shape[0], w.shape[-1]), "float64")
    start = 0
    for g, size in enumerate(sizes):
        y[start : start + size] = x[start : start + size] @ w[g]
        start += size
    return y


def _numpy_grads(x, w, sizes, dy):
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        dx[rows] = dy[rows] @ w[g].T
        dw[g] = x[rows].T @ dy[rows]
        start += size
    return dx, dw


def _function(implementation):
    if implementation == "megablox-interpret":
        from moe_keras.kernels import _jax

        kernel = _jax._with_vjp(*_jax.megablox_parts(interpret=True))
        return lambda x, w, s: kernel(x, w, s)
    return lambda x, w, s: kernels.grouped_matmul(x, w, s, implementation)


SIZES = {
    "mixed-with-empty-and-tail": ([7, 0, 20, 3, 0], 37),
    "all-on-one": ([0, 0, 29, 0], 29),
    "all-on-last-odd-rows": ([0, 0, 0, 131], 131),
    "none-routed": ([0, 0, 0], 9),
    "one-row-each": ([1, 1, 1, 1, 1], 5),
}


def _case(sizes, rows, k=24, n=40, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(rows, k)).astype("float32")
    w = rng.normal(size=(len(sizes), k, n)).astype("float32")
    return x, w, np.asarray(sizes, "int32")


@pytest.mark.parametrize("case", sorted(SIZES))
@pytest.mark.parametrize(
    "implementation",
    IMPLEMENTATIONS + (["megablox-interpret"] if BACKEND == "jax" else []),
)
def test_grouped_matmul_and_its_gradients_match_a_loop_over_groups(
    case, implementation
):
    if implementation == "megablox-interpret" and case not in (
        "mixed-with-empty-and-tail",
        "all-on-last-odd-rows",
    ):
        pytest.skip("interpret mode is slow: two cases are enough")
    sizes, rows = SIZES[case]
    x, w, s = _case(sizes, rows)
    fn = _function(implementation)
    y = keras.ops.convert_to_numpy(fn(x, w, s))
    expected = _numpy_grouped(x, w, sizes)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # Rows in no group are exactly 0.
    assert np.all(y[sum(sizes) :] == 0.0)

    dx, dw = gradients(lambda x, w: fn(x, w, s), x, w)
    cotangent = np.random.RandomState(7).normal(size=y.shape)
    want_dx, want_dw = _numpy_grads(x, w, sizes, cotangent)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_agree_with_finite_differences(implementation):
    sizes, rows = [5, 0, 9, 2], 19
    x, w, s = _case(sizes, rows, k=8, n=4, seed=3)
    fn = _function(implementation)
    dx, dw = gradients(lambda x, w: fn(x, w, s), x, w)
    cotangent = np.random.RandomState(7).normal(size=(rows, 4))
    rng = np.random.RandomState(4)
    vx, vw = rng.normal(size=x.shape), rng.normal(size=w.shape)

    def loss(x, w):
        out = keras.ops.convert_to_numpy(fn(x, w, s)).astype("float64")
        return float(np.sum(out * cotangent))

    h = 1e-2  # the loss is bilinear: central differences are exact
    fd = (
        loss((x + h * vx).astype("float32"), (w + h * vw).astype("float32"))
        - loss((x - h * vx).astype("float32"), (w - h * vw).astype("float32"))
    ) / (2 * h)
    np.testing.assert_allclose(
        np.sum(dx * vx) + np.sum(dw * vw), fd, rtol=2e-3, atol=2e-3
    )


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=6),
    st.integers(0, 5),
    st.integers(0, 2**16),
)
def test_any_group_sizes_give_the_loop(sizes, tail, seed):
    x, w, s = _case(sizes, sum(sizes) + tail, k=8, n=4, seed=seed)
    y = kernels.grouped_matmul(x, w, s, NATIVE)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y),
        _numpy_grouped(x, w, sizes),
        rtol=1e-4,
        atol=1e-4,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 64).map(lambda i: 64 * i),
    st.integers(1, 64).map(lambda i: 64 * i),
    st.integers(1, 1 << 18),
    st.integers(1, 128),
)
def test_mosaic_block_sizes_fit_every_shape_they_accept(k, n, rows, groups):
    # The kernels read whole tiles: each block size must divide its axis.
    from moe_keras.kernels import _jax

    assert _jax.mosaic_shape_problem(k, n) is None
    forward = _jax.mosaic_forward_config(rows, groups, k, n)
    assert k % forward["block_k"] == 0 and n % forward["block_n"] == 0
    assert (n // forward["block_n"]) % forward["grid_block_n"] == 0
    assert 2 <= forward["max_concurrent_steps"] <= k // forward["block_k"]
    assert forward["block_m"] in (64, 128)
    # The input gradient runs the forward kernel from n to k.
    backward = _jax.mosaic_forward_config(rows, groups, n, k)
    assert n % backward["block_k"] == 0 and k % backward["block_n"] == 0
    weights = _jax.mosaic_weight_grad_config(k, n)
    assert k % weights["block_m"] == 0 and n % weights["block_n"] == 0


pytestmark_jax = pytest.mark.skipif(BACKEND != "jax", reason="JAX kernels")


@pytestmark_jax
@pytest.mark.parametrize("k, n", [(100, 128), (64, 128), (128, 96)])
def test_mosaic_rejects_shapes_its_tiles_do_not_fit(k, n):
    from moe_keras.kernels import _jax

    assert "multiples of 64" in _jax.mosaic_shape_problem(k, n)


# ------------------------------------------------ choosing an implementation


def test_auto_is_the_block_layout_on_a_cpu():
    assert (
        kernels.select_implementation("auto", "bfloat16", [(128, 256)])
        == "blocks"
    )


@pytest.mark.parametrize(
    "requested, missing",
    [
        ("mosaic_gpu", "jax backend" if BACKEND != "jax" else "Hopper"),
        ("megablox", "jax backend" if BACKEND != "jax" else "TPU"),
        ("ragged_dot", "jax backend"),
        ("torch", "torch backend"),
    ],
)
def test_an_unavailable_choice_says_what_is_missing(requested, missing):
    if requested == "ragged_dot" and BACKEND == "jax":
        pytest.skip("runs here")
    if requested == "torch" and BACKEND == "torch":
        pytest.skip("runs here")
    with pytest.raises(ValueError, match=missing):
        kernels.select_implementation(requested, "bfloat16", [(128, 128)])
    layer = MoE(4, 8, top_k=2, capacity_factor=None, grouped_matmul=requested)
    with pytest.raises(ValueError, match=f"grouped_matmul='{requested}'"):
        layer.build((None, 128))


def test_a_bad_name_is_a_value_error():
    with pytest.raises(ValueError, match="grouped_matmul"):
        MoE(4, 8, top_k=2, grouped_matmul="cutlass")


def test_a_list_of_expert_layers_cannot_be_forced_onto_a_grouped_matmul():
    with pytest.raises(ValueError, match="stacked expert weights"):
        MoE(
            experts=[keras.layers.Dense(3) for _ in range(2)],
            top_k=1,
            capacity_factor=1.0,
            grouped_matmul="reference",
        )


@pytestmark_jax
def test_auto_picks_mosaic_on_hopper_for_16_bit_experts(monkeypatch):
    # What auto decides from the platform, on a platform stood in for.
    from moe_keras.kernels import _jax

    monkeypatch.setattr(_jax, "gpu_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(_jax, "platform", lambda: "gpu")
    shapes = [(1024, 1024), (512, 1024)]
    assert kernels.select_implementation("auto", "bfloat16", shapes) == (
        "mosaic_gpu"
    )
    # float32, or a size the tiles do not fit: the block layout.
    assert kernels.select_implementation("auto", "float32", shapes) == "blocks"
    assert (
        kernels.select_implementation("auto", "bfloat16", [(100, 1024)])
        == "blocks"
    )
    for older_or_newer in ((8, 0), (10, 0)):
        monkeypatch.setattr(
            _jax, "gpu_compute_capability", lambda c=older_or_newer: c
        )
        assert (
            kernels.select_implementation("auto", "bfloat16", shapes)
            == "blocks"
        )
    monkeypatch.setattr(_jax, "platform", lambda: "tpu")
    assert kernels.select_implementation("auto", "bfloat16", shapes) == (
        "megablox"
    )
    # A distribution over several devices: the block layout, which the
    # distribution's layouts shard.
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    monkeypatch.setattr(
        keras.distribution,
        "distribution",
        lambda: keras.distribution.DataParallel(device_mesh=mesh),
    )
    monkeypatch.setattr(
        mesh, "_devices", np.asarray(devices * 2, dtype=object), raising=False
    )
    assert kernels.select_implementation("auto", "bfloat16", shapes) == (
        "blocks"
    )


# --------------------------------------------------- the sorted-rows plan


@pytest.mark.parametrize("method", dispatch.PLAN_METHODS)
@pytest.mark.parametrize("masked", [False, True])
def test_sorted_plan_lists_each_assignment_once_by_expert(method, masked):
    rng = np.random.RandomState(0)
    tokens, experts, k = 40, 6, 2
    scores = rng.normal(size=(tokens, experts)) + np.linspace(0, 3, experts)
    indices = np.argsort(-scores, -1)[:, :k].astype("int32")
    indices[:, 0] = np.where(np.arange(tokens) < 30, 5, indices[:, 0])
    indices[:, 1] = np.where(indices[:, 1] == 5, 4, indices[:, 1])
    valid = rng.uniform(size=tokens) > 0.3 if masked else None
    plan = dispatch.RoutePlan(
        indices, experts, None, valid, method=method, sorted_rows=True
    )

    def numpy(t):
        return keras.ops.convert_to_numpy(t)

    routed = np.ones(tokens, bool) if valid is None else valid
    expected = np.bincount(indices[routed].ravel(), minlength=experts)
    np.testing.assert_array_equal(numpy(plan.group_sizes), expected)
    assert (plan.num_groups, plan.group_size) == (1, tokens * k)
    filled = numpy(plan.slot_filled)
    assert filled.sum() == expected.sum() and filled[: expected.sum()].all()
    # Each filled row holds an assignment of its group's expert.
    assignment = numpy(plan.slot_assignment)[filled]
    row_expert = np.repeat(np.arange(experts), expected)
    np.testing.assert_array_equal(indices.ravel()[assignment], row_expert)
    assert len(np.unique(assignment)) == len(assignment)
    # And the inverse map sends each kept assignment back to its row.
    kept = numpy(plan.kept)
    slots = numpy(plan.assignment_slot)
    np.testing.assert_array_equal(
        numpy(plan.slot_assignment)[slots[kept]], np.flatnonzero(kept)
    )


# ------------------------------------------------ dropless on sorted rows

FORMS = {
    "swiglu": dict(hidden_units=16, gated=True, activation="silu"),
    "relu-mlp": dict(hidden_units=16, activation="relu"),
    "gelu-glu-no-bias": dict(
        hidden_units=16, gated=True, activation="gelu", use_bias=False
    ),
    "one-projection": dict(activation="tanh"),
    "shared-expert": dict(hidden_units=16, num_shared_experts=1),
}


def _pair(form, implementation, **kwargs):
    layers = []
    for grouped in ("blocks", implementation):
        keras.utils.set_random_seed(3)
        layers.append(
            MoE(
                num_experts=5,
                units=8,
                top_k=2,
                capacity_factor=None,
                grouped_matmul=grouped,
                **FORMS[form],
                **kwargs,
            )
        )
    return layers


# On JAX (eager calls compile every shape) the forms whose expert code
# differs most; the rest is the same `keras.ops` on every backend.
_JAX_FORMS = ("swiglu", "relu-mlp", "one-projection")


@pytest.mark.parametrize(
    "form, implementation",
    [
        (form, NATIVE)
        for form in sorted(FORMS)
        if BACKEND != "jax" or form in _JAX_FORMS
    ]
    + ([("swiglu", "reference")] if BACKEND == "torch" else []),
)
def test_sorted_rows_give_the_block_layouts_outputs_and_gradients(
    form, implementation
):
    rng = np.random.RandomState(1)
    x = rng.normal(size=(3, 7, 12)).astype("float32")
    mask = rng.uniform(size=(3, 7)) > 0.25
    blocks, grouped = _pair(form, implementation)
    for layer in (blocks, grouped):
        layer.build(x.shape)
    grouped.set_weights(blocks.get_weights())
    assert grouped._grouped_matmul == implementation
    for training in (False, True):
        want = keras.ops.convert_to_numpy(
            blocks(x, mask=mask, training=training)
        )
        got = keras.ops.convert_to_numpy(
            grouped(x, mask=mask, training=training)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (want,) = gradients(lambda x: blocks(x, mask=mask, training=True), x)
    (got,) = gradients(lambda x: grouped(x, mask=mask, training=True), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_sorted_rows_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    rng = np.random.RandomState(2)
    x = rng.normal(size=(2, 9, 16)).astype("float32")
    blocks, grouped = _pair("swiglu", NATIVE)
    for layer in (blocks, grouped):
        layer.build(x.shape)
    grouped.set_weights(blocks.get_weights())
    want = keras.ops.convert_to_numpy(blocks(x, training=True))
    got = keras.ops.convert_to_numpy(grouped(x, training=True))
    assert got.dtype == want.dtype == np.dtype(policy.split("_")[1])
    # 16-bit outputs, accumulated in float32 by both: a few ulps apart.
    tolerance = 3e-2 if policy == "mixed_bfloat16" else 4e-3
    np.testing.assert_allclose(
        got.astype("float32"),
        want.astype("float32"),
        rtol=tolerance,
        atol=tolerance,
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_updates_match_with_masks_and_a_partial_last_batch(optimizer):
    rng = np.random.RandomState(4)
    x = rng.normal(size=(7, 6, 12)).astype("float32")
    x[5:, 4:] = 0.0  # padding, masked
    y = rng.normal(size=(7, 6, 8)).astype("float32")
    trained = []
    for layer in _pair("swiglu", NATIVE):
        inputs = keras.Input((6, 12))
        masked = keras.layers.Masking(0.0)(inputs)
        model = keras.Model(inputs, layer(masked))
        if trained:
            model.set_weights(trained[0][0])
        model.compile(
            keras.optimizers.SGD(0.1)
            if optimizer == "sgd"
            else keras.optimizers.Adam(0.01),
            "mse",
        )
        initial = model.get_weights()
        # Batches of 3: the last has 1 sample.
        model.fit(x, y, batch_size=3, epochs=2, shuffle=False, verbose=0)
        trained.append((initial, model.get_weights(), model.predict(x[:5])))
    (_, want, want_pred), (_, got, got_pred) = trained
    moved = [not np.allclose(a, b) for a, b in zip(trained[0][0], want)]
    assert any(moved)  # the comparison has teeth
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_pred, want_pred, rtol=1e-4, atol=1e-5)


def test_empty_batch_and_nan_row_on_sorted_rows():
    layer = MoE(
        4,
        8,
        top_k=2,
        capacity_factor=None,
        hidden_units=8,
        grouped_matmul=NATIVE,
    )
    empty = layer(np.zeros((0, 8), "float32"), training=True)
    assert tuple(keras.ops.shape(empty)) == (0, 8)
    x = np.random.RandomState(5).normal(size=(9, 8)).astype("float32")
    clean = keras.ops.convert_to_numpy(layer(x, training=True))
    x[3] = np.nan
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    assert np.all(np.isnan(y[3]))
    others = np.arange(9) != 3
    np.testing.assert_allclose(y[others], clean[others], rtol=1e-5, atol=1e-6)


def test_grouped_matmul_survives_config_keras_file_and_saved_model(tmp_path):
    inputs = keras.Input((5, 16))
    layer = MoE(
        4,
        8,
        top_k=2,
        capacity_factor=None,
        hidden_units=16,
        grouped_matmul=NATIVE,
    )
    model = keras.Model(inputs, layer(inputs))
    assert layer.get_config()["grouped_matmul"] == NATIVE
    x = np.random.RandomState(6).normal(size=(3, 5, 16)).astype("float32")
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].grouped_matmul == NATIVE
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, atol=1e-6)
    if BACKEND == "torch":
        return  # Keras writes SavedModels from TensorFlow and JAX
    import tensorflow as tf

    model.export(str(tmp_path / "saved_model"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(
        served.serve(tf.constant(x)).numpy(), before, rtol=1e-5, atol=1e-6
    )


def test_experts_take_sorted_rows_directly():
    # `DenseExperts` on its own: rows sorted by expert, one group each.
    experts = DenseExperts(3, units=4, hidden_units=6, activation="relu")
    experts.build((None, 5))
    rows = np.random.RandomState(7).normal(size=(10, 5)).astype("float32")
    sizes = np.asarray([4, 0, 5], "int32")  # the last row in no group
    got = keras.ops.convert_to_numpy(
        experts(rows, grouped=True, group_sizes=sizes)
    )
    every = keras.ops.convert_to_numpy(experts(rows))  # [rows, E, units]
    expert_of_row = np.repeat([0, 1, 2], sizes)
    np.testing.assert_allclose(
        got[:9], every[np.arange(9), expert_of_row], rtol=1e-5, atol=1e-6
    )
