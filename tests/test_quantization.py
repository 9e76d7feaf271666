"""`quantize("int8" | "int4" | "float8")` on the expert bank.

Each quantized layer is checked against a NumPy reference written from
the float weights alone: the kernels quantized here (abs-max per expert
and output channel), then the quantized forward (int8: each input row
quantized too, an integer matmul, rescaled; int4: the dequantized kernel;
float8: inputs and kernel through `float8_e4m3fn` with the initial unit
scales).
"""

import gc
import math
import os

import keras
import ml_dtypes
import numpy as np
import pytest

from moe_keras import DenseExperts
from moe_keras import MoE
from tests import reference
from tests.backend_marks import NO_EXPORT
from tests.grad_utils import gradients

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _no_full_collection_per_deleted_kernel(monkeypatch):
    """Keras' `Layer.__delattr__` runs `gc.collect()` for each float
    kernel `quantize` deletes, to free device memory at once. Late in a
    test session each collection walks every earlier test's objects, which
    made these tests take seconds each; they check numbers, not when
    memory is freed."""
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


MODES = ("int8", "int4", "float8")
# Experts, features, hidden units, units (odd: int4 packs two to a byte).
E, D, H, U = 4, 8, 6, 5
EPS = np.float32(keras.backend.epsilon())
TOL = dict(rtol=1e-4, atol=1e-4)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if v.path.endswith("output_scale"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        else:
            v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))


def _experts(hidden_units=H, **kwargs):
    options = dict(activation="silu", gated=True, use_output_scale=True)
    options.update(kwargs)
    layer = DenseExperts(E, U, hidden_units=hidden_units, **options)
    layer.build((None, D))
    _randomize(layer)
    return layer


def _float_weights(layer):
    """`{weight name: float32 array}` before quantizing."""
    return {
        v.path.split("/")[-1]: _np(v).astype("float32") for v in layer.weights
    }


def _abs_max(w, top):
    """NumPy per-channel abs-max quantization over the input axis of an
    `[E, in, out]` kernel: `(integers, scale [E, 1, out])`."""
    scale = np.float32(top) / (np.abs(w).max(axis=1, keepdims=True) + EPS)
    low = -8 if top == 7 else -top
    return np.clip(np.round(w * scale), low, top), scale


def _unpack_int4(packed, length):
    """NumPy unpacking of two signed nibbles a byte along the last axis,
    low nibble first."""
    b = packed.astype(np.uint8)
    low, high = (b & 0x0F).astype(np.int16), (b >> 4).astype(np.int16)
    both = np.stack([low, high], axis=-1)
    both = np.where(both > 7, both - 16, both)
    return both.reshape(packed.shape[:-1] + (-1,))[..., :length]


def _qdq_e4m3(x):
    x = np.clip(np.asarray(x, np.float32), -448.0, 448.0)
    return x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class _Reference:
    """The quantized experts in NumPy, from the float weights."""

    def __init__(self, weights, mode, hidden=True, activation="silu"):
        self.w, self.mode, self.hidden = weights, mode, hidden
        self.activation = activation
        self.prefixes = ("in_", "out_") if hidden else ("",)
        self.q = {}
        if mode in ("int8", "int4"):
            top = 127 if mode == "int8" else 7
            for p in self.prefixes:
                self.q[p] = _abs_max(weights[f"{p}kernel"], top)

    def project(self, x, p, e):
        x = np.asarray(x, np.float32)
        if self.mode == "int8":
            scale = np.float32(127) / (np.abs(x).max(-1, keepdims=True) + EPS)
            x_int = np.clip(np.round(x * scale), -127, 127)
            q, s = self.q[p]
            return (x_int @ q[e]).astype(np.float32) / (scale * s[e])
        if self.mode == "int4":
            q, s = self.q[p]
            return x @ (q[e] / s[e]).astype(np.float32)
        if self.mode == "float8":
            return _qdq_e4m3(x) @ _qdq_e4m3(self.w[f"{p}kernel"][e])
        return x @ self.w[f"{p}kernel"][e]

    def expert(self, x, e, row_weights=None):
        """Expert `e` on rows `x`; `row_weights` scale the hidden
        activations (and the output bias), as the sparse dispatch does."""
        first = self.prefixes[0]
        h = self.project(x, first, e)
        if f"{first}bias" in self.w:
            h = h + self.w[f"{first}bias"][e]
        if self.activation == "silu":
            gate, up = np.split(h, 2, axis=-1)
            h = gate * _sigmoid(gate) * up
        bias = 0.0
        if self.hidden:
            if row_weights is not None:
                h = h * row_weights[:, None]
            h = self.project(h, "out_", e)
            bias = self.w.get("out_bias", np.zeros((E, U)))[e]
            if row_weights is not None:
                bias = bias * row_weights[:, None]
        elif row_weights is not None:
            h = h * row_weights[:, None]
        y = h + bias
        if "output_scale" in self.w:
            y = y * self.w["output_scale"][e]
        return y

    def every_expert(self, x):
        return np.stack([self.expert(x, e) for e in range(E)], axis=1)


def _quantized(mode, **kwargs):
    layer = _experts(**kwargs)
    weights = _float_weights(layer)
    layer.quantize(mode)
    return layer, weights


# --- the variables ------------------------------------------------------


@pytest.mark.parametrize("hidden", [True, False], ids=["mlp", "single"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_integer_variables(mode, hidden):
    layer, weights = _quantized(mode, hidden_units=H if hidden else None)
    ref = _Reference(weights, mode, hidden)
    assert layer.quantization_mode == mode
    expected_policy = "int8" if mode == "int8" else "int4/-1"
    assert layer.dtype_policy.name == f"{expected_policy}_from_float32"
    projections = [("kernel_in", "in_"), ("kernel_out", "out_")]
    if not hidden:
        projections = [("kernel", "")]
    for attribute, prefix in projections:
        kernel = getattr(layer, attribute)
        scale = getattr(layer, f"{prefix}kernel_scale")
        assert kernel.path.endswith(f"/{prefix}kernel")
        assert kernel.dtype == "int8" and not kernel.trainable
        assert scale.dtype == "float32" and not scale.trainable
        q, s = ref.q[prefix]
        out = q.shape[-1]
        assert tuple(scale.shape) == (E, out)
        np.testing.assert_allclose(_np(scale), s[:, 0], rtol=1e-6)
        values = _np(kernel)
        if mode == "int4":
            assert tuple(kernel.shape) == (E, q.shape[1], math.ceil(out / 2))
            values = _unpack_int4(values, out)
        else:
            assert tuple(kernel.shape) == q.shape
        np.testing.assert_array_equal(values, q)
    # No float kernel is left; biases and output scales stay float.
    for v in layer.weights:
        name = v.path.split("/")[-1]
        if name.endswith("kernel"):
            assert v.dtype == "int8", v.path
        else:
            assert v.dtype == "float32", v.path
        if "bias" in name or name == "output_scale":
            assert v.trainable
            np.testing.assert_array_equal(_np(v), weights[name])
    assert all("kernel" not in v.path for v in layer.trainable_weights)


def test_float8_variables():
    layer, weights = _quantized("float8")
    assert layer.quantization_mode == "float8"
    assert layer.dtype_policy.name == "float8_from_float32"
    np.testing.assert_array_equal(_np(layer.kernel_in), weights["in_kernel"])
    assert layer.kernel_in.trainable and layer.kernel_in.dtype == "float32"
    for prefix in ("in_", "out_"):
        for stat in ("inputs", "kernel", "outputs_grad"):
            scale = getattr(layer, f"{prefix}{stat}_scale")
            history = getattr(layer, f"{prefix}{stat}_amax_history")
            assert tuple(scale.shape) == () and float(_np(scale)) == 1.0
            assert tuple(history.shape) == (1024,) and not _np(history).any()
            assert scale.overwrite_with_gradient


# --- the forward pass, every form ----------------------------------------


@pytest.mark.parametrize("hidden", [True, False], ids=["mlp", "single"])
@pytest.mark.parametrize("mode", MODES)
def test_every_expert_matches_numpy(mode, hidden):
    x = np.random.default_rng(1).normal(size=(7, D)).astype("float32")
    layer, weights = _quantized(mode, hidden_units=H if hidden else None)
    y = _np(layer(x))
    np.testing.assert_allclose(
        y, _Reference(weights, mode, hidden).every_expert(x), **TOL
    )


# How far each mode may move the outputs of these experts (relative
# Frobenius norm); the float8 layer is at its initial scales of 1.
AGREEMENT = {"int8": 0.02, "int4": 0.2, "float8": 0.1}


@pytest.mark.parametrize("mode", MODES)
def test_close_to_float_layer(mode):
    x = np.random.default_rng(2).normal(size=(16, D)).astype("float32")
    layer = _experts()
    y_float = _np(layer(x))
    layer.quantize(mode)
    y = _np(layer(x))
    error = np.linalg.norm(y - y_float) / np.linalg.norm(y_float)
    assert 0 < error < AGREEMENT[mode], error


@pytest.mark.parametrize("mode", MODES)
def test_grouped_forms_match_numpy(mode):
    rng = np.random.default_rng(3)
    layer, weights = _quantized(mode)
    ref = _Reference(weights, mode)
    buffers = rng.normal(size=(E, 6, D)).astype("float32")
    row_weights = rng.uniform(0.2, 1.0, (E, 6)).astype("float32")
    expected = np.stack(
        [ref.expert(buffers[e], e, row_weights[e]) for e in range(E)]
    )
    # One group per expert: the per-expert loop and the batched matmul
    # (float8 runs both batched).
    for batched in (False, True):
        y = layer(
            buffers, grouped=True, group_weights=row_weights, batched=batched
        )
        np.testing.assert_allclose(_np(y), expected, **TOL)
    # Blocks of one expert's rows (a gather of the integer kernels).
    group_experts = np.array([2, 0, 2, 3, 1], "int32")
    blocks = rng.normal(size=(5, 3, D)).astype("float32")
    block_weights = rng.uniform(0.2, 1.0, (5, 3)).astype("float32")
    y = layer(
        blocks,
        grouped=True,
        group_experts=group_experts,
        group_weights=block_weights,
    )
    expected = np.stack(
        [
            ref.expert(blocks[g], e, block_weights[g])
            for g, e in enumerate(group_experts)
        ]
    )
    np.testing.assert_allclose(_np(y), expected, **TOL)
    # Rows sorted by expert through the grouped matmul; expert 1 has none
    # and two rows past the groups are in none.
    sizes = np.array([3, 0, 4, 2], "int32")
    rows = rng.normal(size=(11, D)).astype("float32")
    weights_of_rows = rng.uniform(0.2, 1.0, (11,)).astype("float32")
    y = layer(
        rows,
        grouped=True,
        group_sizes=sizes,
        group_weights=weights_of_rows,
        implementation="reference",
    )
    expert_of_row = np.repeat(np.arange(E), sizes)  # the 9 rows in groups
    rows_in, weights_in = rows[:9], weights_of_rows[:9]
    expected = np.concatenate(
        [
            ref.expert(
                rows_in[expert_of_row == e], e, weights_in[expert_of_row == e]
            )
            for e in range(E)
        ]
    )
    np.testing.assert_allclose(_np(y)[: sizes.sum()], expected, **TOL)


def _moe(mode, **kwargs):
    layer = MoE(
        num_experts=E,
        units=U,
        hidden_units=H,
        top_k=2,
        activation="silu",
        gated=True,
        use_output_scale=True,
        **kwargs,
    )
    layer.build((None, D))
    _randomize(layer, seed=4)
    weights = _float_weights(layer.experts)
    gate_kernel = _np(layer.gate.kernel)
    model = keras.Sequential([keras.Input((D,)), layer])
    model.quantize(mode)
    # The router is not quantized.
    assert layer.gate.quantization_mode is None
    assert layer.gate.kernel.dtype == "float32"
    np.testing.assert_array_equal(_np(layer.gate.kernel), gate_kernel)
    assert layer.experts.quantization_mode == mode
    return layer, weights


PATHS = {
    "dense": dict(dispatch="dense"),
    "capacity": dict(capacity_factor=1.0, eval_capacity_factor=1.0),
    "blocks": dict(grouped_matmul="blocks"),
    "reference": dict(grouped_matmul="reference"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", MODES)
def test_moe_dispatch_paths_match_numpy(mode, path):
    tokens = 12
    x = np.random.default_rng(5).normal(size=(tokens, D)).astype("float32")
    layer, weights = _moe(mode, **PATHS[path])
    y = _np(layer(x, training=False))
    ref = _Reference(weights, mode)
    probs, _ = reference.gate_forward(layer.gate, x)
    combine, order = reference.top_k_weights(probs, 2, normalize=True)
    if path == "capacity":
        capacity = min(max(math.ceil(1.0 * tokens * 2 / E), 1), tokens)
        keep = reference.capacity_keep(order, E, capacity)
        assert not keep.all()  # something is dropped
        combine[np.arange(tokens)[:, None], order] *= keep
    expected = np.zeros((tokens, U), "float32")
    for e in range(E):
        if path == "dense":
            expected += combine[:, e : e + 1] * ref.expert(x, e)
        else:
            # The sparse dispatch weights the hidden activations.
            rows = combine[:, e] > 0
            expected[rows] += ref.expert(x[rows], e, combine[rows, e])
    np.testing.assert_allclose(y, expected, **TOL)


# --- gradients, training ----------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_inputs_gradient_through_dequantized_kernel(mode):
    """The integer kernels have no gradient; the inputs get theirs through
    the dequantized kernel (straight through the inputs' quantization)."""
    layer, weights = _quantized(
        mode,
        hidden_units=None,
        activation=None,
        gated=False,
        use_output_scale=False,
    )
    q, s = _Reference(weights, mode, hidden=False).q[""]
    kernel = (q / s).astype("float32")  # [E, D, U]
    x = np.random.default_rng(6).normal(size=(5, D)).astype("float32")
    cotangent = np.random.RandomState(7).normal(size=(5, E, U))
    (grad,) = gradients(lambda t: layer(t, training=True), x)
    np.testing.assert_allclose(
        grad, np.einsum("teu,edu->td", cotangent, kernel), rtol=1e-4, atol=1e-5
    )
    buffers = np.random.default_rng(8).normal(size=(E, 5, D))
    cotangent = np.random.RandomState(7).normal(size=(E, 5, U))
    for batched in (False, True):
        (grad,) = gradients(
            lambda t, b=batched: layer(
                t, grouped=True, batched=b, training=True
            ),
            buffers,
        )
        np.testing.assert_allclose(
            grad,
            np.einsum("etu,edu->etd", cotangent, kernel),
            rtol=1e-4,
            atol=1e-5,
        )


def test_float8_fit_reduces_loss_and_updates_scales():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(64, D)).astype("float32")
    y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")
    layer = MoE(
        num_experts=E, units=D, hidden_units=16, top_k=2, activation="silu",
        gated=True,
    )  # fmt: skip
    inputs = keras.Input((D,))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.quantize("float8")
    experts = layer.experts
    kernel = _np(experts.kernel_in)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.5 * before, (before, after)
    assert not np.array_equal(_np(experts.kernel_in), kernel)
    # Delayed scaling: the scales follow the amax histories.
    for prefix in ("in_", "out_"):
        for stat in ("inputs", "kernel", "outputs_grad"):
            history = _np(getattr(experts, f"{prefix}{stat}_amax_history"))
            assert history.max() > 0
            assert float(_np(getattr(experts, f"{prefix}{stat}_scale"))) != 1.0
    # The inputs' scale maps their largest value to float8_e4m3fn's max.
    np.testing.assert_allclose(
        float(_np(experts.in_inputs_scale)),
        _np(experts.in_inputs_amax_history).max() / 448.0,
        rtol=0.5,
    )


# --- errors ----------------------------------------------------------------


def test_quantize_errors():
    layer = _experts()
    with pytest.raises(ValueError, match="Invalid quantization mode"):
        layer.quantize("int3")
    assert layer.quantization_mode is None
    layer.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize("float8")
    with pytest.raises(ValueError, match="isn't yet built"):
        DenseExperts(E, U).quantize("int8")

    class Subclass(DenseExperts):
        pass

    sub = Subclass(E, U)
    sub.build((None, D))
    with pytest.raises(NotImplementedError):
        sub.quantize("int8")
    sub.quantize("int8", type_check=False)
    assert sub.quantization_mode == "int8"


# --- saving ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_get_config_round_trip(mode):
    layer, _ = _quantized(mode)
    x = np.random.default_rng(10).normal(size=(5, D)).astype("float32")
    config = layer.get_config()
    assert config["quantization_config"] is not None
    revived = DenseExperts.from_config(config)
    revived.build((None, D))
    assert revived.quantization_mode == mode
    assert [
        (v.path.split("/")[-1], v.dtype, tuple(v.shape))
        for v in revived.weights
    ] == [
        (v.path.split("/")[-1], v.dtype, tuple(v.shape)) for v in layer.weights
    ]
    store = {}
    layer.save_own_variables(store)
    revived.load_own_variables(store)
    np.testing.assert_array_equal(_np(revived(x)), _np(layer(x)))


def _model(mode):
    inputs = keras.Input((D,))
    layer = MoE(
        num_experts=E, units=D, hidden_units=H, top_k=2, activation="silu",
        gated=True, num_shared_experts=1,
    )  # fmt: skip
    model = keras.Model(inputs, layer(inputs))
    _randomize(layer, seed=11)
    model.quantize(mode)
    assert layer.shared_experts.quantization_mode == mode
    return model, layer


@pytest.mark.parametrize("mode", MODES)
def test_keras_file_round_trip(mode, tmp_path):
    model, layer = _model(mode)
    x = np.random.default_rng(12).normal(size=(9, D)).astype("float32")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    moe = next(lay for lay in loaded.layers if isinstance(lay, MoE))
    for experts in (moe.experts, moe.shared_experts):
        assert experts.quantization_mode == mode
        kernel_dtype = "float32" if mode == "float8" else "int8"
        assert experts.kernel_in.dtype == kernel_dtype
    assert moe.gate.quantization_mode is None
    np.testing.assert_array_equal(
        loaded.predict_on_batch(x), model.predict_on_batch(x)
    )


@NO_EXPORT
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_model_export(mode, tmp_path):
    import tensorflow as tf

    model, _ = _model(mode)
    x = np.random.default_rng(13).normal(size=(9, D)).astype("float32")
    path = os.path.join(tmp_path, "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    restored = tf.saved_model.load(path)  # kept: it owns the variables
    served = restored.serve(x)
    np.testing.assert_allclose(
        np.asarray(served), model.predict_on_batch(x), rtol=1e-5, atol=1e-5
    )


# --- keras-hub -------------------------------------------------------------


def test_sparsified_keras_hub_model_quantizes_its_experts():
    keras_hub = pytest.importorskip("keras_hub")
    from moe_keras.hub import sparsify

    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        num_experts=4, top_k=2, sliding_window=64,
    )  # fmt: skip
    model = keras_hub.models.MixtralCausalLM(
        backbone=backbone, preprocessor=None
    )
    rng = np.random.default_rng(5)
    for w in model.weights:
        scale = 0.3 if len(w.shape) > 1 else 0.1
        w.assign(rng.normal(1.0 if "scale" in w.path else 0.0, scale, w.shape))
    sparse = sparsify(model)
    x = {
        "token_ids": rng.integers(1, 100, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    y_float = sparse.predict_on_batch(x)
    sparse.quantize("int8")
    experts = [
        layer
        for layer in sparse._flatten_layers()
        if isinstance(layer, DenseExperts)
    ]
    assert len(experts) == 2
    for layer in experts:
        assert layer.quantization_mode == "int8"
        assert layer.kernel_in.dtype == layer.kernel_out.dtype == "int8"
    float_expert_kernels = [
        v.path
        for v in sparse.weights
        if "experts" in v.path and "kernel" in v.path and v.dtype != "int8"
        and not v.path.endswith("kernel_scale")
    ]  # fmt: skip
    assert not float_expert_kernels
    y = sparse.predict_on_batch(x)
    error = np.linalg.norm(y - y_float) / np.linalg.norm(y_float)
    assert 0 < error < 0.05, error
