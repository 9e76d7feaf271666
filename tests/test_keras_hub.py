"""`moe_keras.hub.sparsify` and `upcycle` on tiny keras-hub models.

Every check compares against the original keras-hub model (or the dense
layer), built here with random weights: no downloads, no stored numbers.
"""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from moe_keras import MoE  # noqa: E402
from moe_keras.hub import custom_objects  # noqa: E402
from moe_keras.hub import sparsify  # noqa: E402
from moe_keras.hub import upcycle  # noqa: E402

BACKEND = keras.backend.backend()

VOCAB = 100
COMMON = dict(
    vocabulary_size=VOCAB,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
)


def _mixtral():
    return keras_hub.models.MixtralBackbone(
        intermediate_dim=32, num_experts=4, top_k=2, sliding_window=64,
        **COMMON,
    )  # fmt: skip


def _qwen_moe():
    # Shared expert and its gate; norm_top_k_prob off.
    return keras_hub.models.QwenMoeBackbone(
        intermediate_dim=32, moe_intermediate_dim=16,
        shared_expert_intermediate_dim=24, num_experts=4, top_k=2,
        norm_top_k_prob=False, decoder_sparse_step=1,
        **COMMON,
    )  # fmt: skip


def _qwen3_moe():
    # k = 1 with renormalisation: every weight is exactly 1.
    return keras_hub.models.Qwen3MoeBackbone(
        intermediate_dim=32, moe_intermediate_dim=16, head_dim=8,
        num_experts=4, top_k=1, norm_top_k_prob=True, **COMMON,
    )  # fmt: skip


def _gpt_oss():
    # Clamped SwiGLU experts with biases, a biased top-k-softmax router.
    return keras_hub.models.GptOssBackbone(
        intermediate_dim=16, num_experts=4, top_k=2, head_dim=4, **COMMON
    )


def _gemma4():
    # A dense MLP beside the experts; the router's input transform and the
    # per-expert output scale (keras-hub initialises the experts to zeros:
    # the fixture randomises every weight).
    return keras_hub.models.Gemma4Backbone(
        image_size=16, intermediate_dim=32, head_dim=4,
        enable_moe_block=True, num_experts=4, expert_intermediate_dim=8,
        num_experts_per_token=2, sliding_window_size=8,
        sliding_window_pattern=2, **COMMON,
    )  # fmt: skip


def _qwen3_5_moe():
    # The hybrid backbone: a Gated DeltaNet layer, then attention.
    return keras_hub.models.Qwen3_5MoeBackbone(
        head_dim=8, moe_intermediate_dim=8, shared_expert_intermediate_size=12,
        num_experts=4, top_k=2,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=4, linear_value_head_dim=4, **COMMON,
    )  # fmt: skip


FAMILIES = {
    "mixtral": (_mixtral, keras_hub.models.MixtralCausalLM),
    "qwen_moe": (_qwen_moe, keras_hub.models.QwenMoeCausalLM),
    "qwen3_moe": (_qwen3_moe, keras_hub.models.Qwen3MoeCausalLM),
    "gpt_oss": (_gpt_oss, keras_hub.models.GptOssCausalLM),
    "gemma4": (_gemma4, keras_hub.models.Gemma4CausalLM),
    "qwen3_5_moe": (_qwen3_5_moe, keras_hub.models.Qwen3_5MoeCausalLM),
}
# Families whose blocks add no auxiliary loss.
NO_AUX_LOSS = {"gpt_oss", "gemma4"}


def _batch(seed=0, batch=2, length=8):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, length), "int32")
    padding[1, length - 3 :] = 0  # a padded row: masks the aux loss
    return {
        "token_ids": rng.integers(1, VOCAB, (batch, length)).astype("int32"),
        "padding_mask": padding,
    }


def _inputs(model, x):
    """`x` with the position ids a backbone that takes them (Gemma 4)."""
    if "position_ids" in [i.name for i in model.backbone.inputs]:
        length = x["token_ids"].shape[1]
        positions = np.arange(length, dtype="int32")
        x = {**x, "position_ids": np.tile(positions, (len(x["token_ids"]), 1))}
    return x


def _randomize(model, seed=5):
    """Random weights everywhere: keras-hub initialises some to zeros or
    ones (biases, scales, Gemma 4's experts), which would hide a weight
    put in the wrong place."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        scale = 0.3 if len(w.shape) > 1 else 0.1
        w.assign(rng.normal(1.0 if "scale" in w.path else 0.0, scale, w.shape))


def _close(a, b, atol=2e-5):
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(a),
        keras.ops.convert_to_numpy(b),
        atol=atol,
        rtol=1e-4,
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """`(original CausalLM, sparsified CausalLM)` of one family."""
    keras.utils.set_random_seed(7)
    make_backbone, task_class = FAMILIES[request.param]
    original = task_class(backbone=make_backbone(), preprocessor=None)
    _randomize(original)
    return request.param, original, sparsify(original)


def test_sparsified_logits_equal(pair):
    name, original, sparse = pair
    assert type(sparse) is type(original)
    assert type(sparse.backbone).__name__.startswith("Sparse")
    x = _inputs(original, _batch())
    _close(sparse.predict_on_batch(x), original.predict_on_batch(x))
    # The original is left as it was.
    assert not type(original.backbone).__name__.startswith("Sparse")


@pytest.mark.skipif(
    BACKEND == "jax",
    reason="eager calls are slow on JAX; there the training-step test's "
    "loss, which includes the auxiliary loss, checks it",
)
def test_sparsified_aux_loss_equals_original(pair):
    name, original, sparse = pair
    x = _inputs(original, _batch(3))
    aux = []
    for model in (original, sparse):
        model.backbone(x, training=True)
        aux.append(sum(float(v) for v in model.backbone.losses))
    if name in NO_AUX_LOSS:
        assert aux == [0, 0]
    else:
        assert aux[0] > 0
        np.testing.assert_allclose(aux[1], aux[0], rtol=1e-5)


def _skip_slow_jax(name):
    """On JAX each model's compiled step takes seconds to build on a CPU,
    so the checks that compile new steps (training, generate, reloading)
    run for Mixtral only there; they run for every family on TensorFlow. Routing
    differs between families in backend-agnostic `keras.ops` code only."""
    if BACKEND == "jax" and name != "mixtral":
        pytest.skip("run for Mixtral only on JAX (time budget)")


def test_sparsified_generate_same_tokens(pair):
    name, original, sparse = pair
    _skip_slow_jax(name)
    prompt = {
        "token_ids": np.zeros((2, 10), "int32"),
        "padding_mask": np.zeros((2, 10), "int32"),
    }
    prompt["token_ids"][:, :3] = [[5, 6, 7], [8, 9, 10]]
    prompt["padding_mask"][:, :3] = 1
    outputs = []
    for model in (original, sparse):
        model.compile(sampler="greedy")
        outputs.append(model.generate(prompt, stop_token_ids=None))
    np.testing.assert_array_equal(
        outputs[1]["token_ids"], outputs[0]["token_ids"]
    )
    assert outputs[0]["padding_mask"].all()  # it generated to the end


def test_sparsified_save_load_round_trip(pair, tmp_path):
    name, original, sparse = pair
    _skip_slow_jax(name)  # serialization is the same on every backend
    path = tmp_path / f"{name}.keras"
    sparse.save(path)
    loaded = keras.saving.load_model(path, custom_objects=custom_objects())
    assert type(loaded.backbone) is type(sparse.backbone)
    x = _inputs(sparse, _batch(4))
    _close(loaded.predict_on_batch(x), sparse.predict_on_batch(x), 1e-6)


def test_sparsified_training_step_matches(pair):
    """One SGD step from the same weights: the same loss (task loss plus
    the family's auxiliary loss) and the same logits afterwards, so the
    same gradients. (It trains the pair: the last test of each family.)"""
    name, original, sparse = pair
    _skip_slow_jax(name)
    x, y = _inputs(original, _batch(1)), _batch(2)["token_ids"]
    losses = []
    for model in (original, sparse):
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            # One compiled step is much faster than eager ops on JAX.
            jit_compile=BACKEND == "jax",
        )
        losses.append(
            model.train_on_batch(x, y, sample_weight=x["padding_mask"])
        )
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # A step of learning rate 1 on random weights magnifies the float32
    # rounding by which the two paths' sums differ (up to ~2e-4 seen, as
    # threads split TensorFlow's reductions differently); a gradient put
    # in the wrong place moves these logits by far more.
    _close(sparse.predict_on_batch(x), original.predict_on_batch(x), 1e-3)


def test_sparsify_backbone_and_capacity_factor():
    keras.utils.set_random_seed(1)
    backbone = _mixtral()
    sparse = sparsify(backbone, capacity_factor=1.0)
    assert sparse.capacity_factor == 1.0
    blocks = [block for _, block in sparse.sparse_blocks()]
    assert len(blocks) == 2
    assert all(b.moe.capacity_factor == 1.0 for b in blocks)
    assert all(b.moe.sparse for b in blocks)
    if BACKEND != "jax":  # eager calls are slow on JAX
        x = _batch()
        # Inference is dropless whatever the training capacity.
        _close(sparse(x), backbone(x))
        sparse(x, training=True)  # runs with capacity buffers


def test_sparsify_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        sparsify("mixtral")
    with pytest.raises(TypeError, match="model"):
        sparsify(keras.Sequential([keras.layers.Dense(2)]))
    backbone = _mixtral()
    with pytest.raises(ValueError, match="capacity_factor"):
        sparsify(backbone, capacity_factor=0.0)
    with pytest.raises(TypeError, match="capacity_factor"):
        sparsify(backbone, capacity_factor="1.25")
    with pytest.raises(ValueError, match="already sparse"):
        sparsify(sparsify(backbone))


class _MyMixtral(keras_hub.models.MixtralBackbone):
    pass


def test_subclasses_and_upcycled_models_are_named():
    config = _mixtral().get_config()
    with pytest.raises(ValueError, match="_MyMixtral, a subclass of Mixtral"):
        sparsify(_MyMixtral.from_config(config))
    llama = keras_hub.models.LlamaBackbone(intermediate_dim=32, **COMMON)
    upcycled = upcycle(llama, num_experts=2)
    with pytest.raises(ValueError, match="upcycled by `moe_keras.upcycle`"):
        sparsify(upcycled)


def test_sparsify_dense_model_names_it():
    llama = keras_hub.models.LlamaBackbone(intermediate_dim=32, **COMMON)
    with pytest.raises(ValueError, match="LlamaBackbone.*upcycle"):
        sparsify(llama)


def test_sparsify_qwen_moe_without_moe_layers():
    backbone = keras_hub.models.QwenMoeBackbone(
        intermediate_dim=32, moe_intermediate_dim=16,
        shared_expert_intermediate_dim=24, num_experts=4, top_k=2,
        norm_top_k_prob=True, decoder_sparse_step=1, mlp_only_layers=[0, 1],
        **COMMON,
    )  # fmt: skip
    with pytest.raises(ValueError, match="QwenSparseMoeBlock.*dense"):
        sparsify(backbone)


# --- upcycle -------------------------------------------------------------


# Tiny configs of each dense family `upcycle` covers; the FFN forms:
# SwiGLU inline (llama ... phi3), GeGLU inline (gemma, gemma3), a SwiGLU
# sublayer with biases (smollm3), two biased Dense layers (gpt2 ... falcon).
_PLAIN = dict(
    vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=16,
    intermediate_dim=32,
)  # fmt: skip
DENSE = {
    "llama": (
        lambda: keras_hub.models.LlamaBackbone(intermediate_dim=32, **COMMON),
        keras_hub.models.LlamaCausalLM,
    ),
    "qwen3": (
        lambda: keras_hub.models.Qwen3Backbone(
            intermediate_dim=32, head_dim=8, **COMMON
        ),
        keras_hub.models.Qwen3CausalLM,
    ),
    "mistral": (
        lambda: keras_hub.models.MistralBackbone(
            intermediate_dim=32, sliding_window=4, **COMMON
        ),
        keras_hub.models.MistralCausalLM,
    ),
    "qwen2": (
        lambda: keras_hub.models.QwenBackbone(intermediate_dim=32, **COMMON),
        keras_hub.models.QwenCausalLM,
    ),
    "qwen3_5": (
        # Full attention only: its linear-attention layers (the same FFN)
        # take long to compile on JAX.
        lambda: keras_hub.models.Qwen3_5Backbone(
            intermediate_dim=32,
            head_dim=8,
            layer_types=["full_attention"] * 2,
            **COMMON,
        ),
        keras_hub.models.Qwen3_5CausalLM,
    ),
    "phi3": (
        lambda: keras_hub.models.Phi3Backbone(intermediate_dim=32, **COMMON),
        keras_hub.models.Phi3CausalLM,
    ),
    "gemma": (
        # Gemma's FFN is intermediate_dim // 2 wide.
        lambda: keras_hub.models.GemmaBackbone(
            intermediate_dim=64, head_dim=4, **COMMON
        ),
        keras_hub.models.GemmaCausalLM,
    ),
    "gemma3": (
        lambda: keras_hub.models.Gemma3Backbone(
            image_size=16,
            intermediate_dim=32,
            head_dim=4,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=4,
            **COMMON,
        ),
        keras_hub.models.Gemma3CausalLM,
    ),
    "smollm3": (
        lambda: keras_hub.models.SmolLM3Backbone(
            vocabulary_size=VOCAB,
            hidden_dim=16,
            intermediate_dim=32,
            num_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=False,
            attention_dropout=0.0,
            rope_layer_enabled_list=[True, False],
            layer_types=["attention"] * 2,
            mlp_bias=True,
            layer_norm_epsilon=1e-6,
            max_position_embeddings=64,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
        ),
        keras_hub.models.SmolLM3CausalLM,
    ),
    "gpt2": (
        lambda: keras_hub.models.GPT2Backbone(max_sequence_length=16, **_PLAIN),
        keras_hub.models.GPT2CausalLM,
    ),
    "opt": (
        lambda: keras_hub.models.OPTBackbone(max_sequence_length=16, **_PLAIN),
        keras_hub.models.OPTCausalLM,
    ),
    "gpt_neo_x": (
        lambda: keras_hub.models.GPTNeoXBackbone(
            max_sequence_length=16, rotary_percentage=0.5, **_PLAIN
        ),
        keras_hub.models.GPTNeoXCausalLM,
    ),
    "falcon": (
        lambda: keras_hub.models.FalconBackbone(
            vocabulary_size=VOCAB,
            num_layers=2,
            num_attention_heads=4,
            hidden_dim=16,
            intermediate_dim=32,
        ),
        keras_hub.models.FalconCausalLM,
    ),
}


# On JAX, whose eager calls compile every new shape, one family of each
# FFN form (the swaps are backend-agnostic `keras.ops`).
_JAX_DENSE = {"llama", "qwen3", "gemma", "smollm3", "gpt2", "falcon"}


@pytest.mark.parametrize("name", list(DENSE))
def test_upcycled_keras_hub_equals_dense_and_round_trips(name, tmp_path):
    if BACKEND == "jax" and name not in _JAX_DENSE:
        pytest.skip("checked on TensorFlow and torch (JAX time budget)")
    keras.utils.set_random_seed(3)
    make_backbone, task_class = DENSE[name]
    dense = task_class(backbone=make_backbone(), preprocessor=None)
    # keras-hub's biases start at zero: random ones check that they are
    # copied (into the experts too, where the FFN has biases).
    rng = np.random.default_rng(1)
    for weight in dense.weights:
        if weight.path.endswith("bias"):
            weight.assign(
                0.1 * rng.standard_normal(weight.shape).astype("float32")
            )
    moe = upcycle(dense, num_experts=4, top_k=2, seed=0)
    assert type(moe) is task_class
    layers = moe.backbone.moe_layers()
    assert len(layers) == 2 and all(isinstance(m, MoE) for m in layers)
    assert all(m.num_experts == 4 and m.top_k == 2 for m in layers)
    x = _batch()
    expected = dense.predict_on_batch(x)
    _close(moe.predict_on_batch(x), expected)
    assert all(m.load_balance_weight == 0.01 for m in layers)
    if BACKEND == "jax" and name != "llama":
        return  # the round trip, for Llama only on JAX (time budget)
    path = tmp_path / f"{name}.keras"
    moe.save(path)
    loaded = keras.saving.load_model(path, custom_objects=custom_objects())
    assert type(loaded.backbone) is type(moe.backbone)
    _close(loaded.predict_on_batch(x), expected)


def _built(layer, features=8):
    layer.build((None, features))
    return layer


def _functional_ffn():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8)(hidden))


class _Residual(keras.layers.Layer):
    """An FFN of the user's own: `x + relu(x W)`."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], input_shape[-1]), name="kernel"
        )

    def call(self, x):
        return x + keras.ops.relu(keras.ops.matmul(x, self.kernel))


@pytest.mark.parametrize(
    "make, capacity_factor",
    [
        (lambda: _built(keras.layers.Dense(6, activation="tanh")), None),
        (
            lambda: keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(16, activation="gelu"),
                    keras.layers.Dense(8),
                ]
            ),
            None,
        ),
        (lambda: _built(_Residual()), None),
        (lambda: _built(_Residual()), 4.0),
        (lambda: _functional_ffn(), None),
    ],
    ids=[
        "dense",
        "sequential",
        "custom-dense-dispatch",
        "custom-sparse",
        "functional",
    ],
)
def test_upcycled_layer_equals_dense(make, capacity_factor):
    keras.utils.set_random_seed(5)
    ffn = make()
    moe = upcycle(
        ffn, num_experts=4, top_k=2, capacity_factor=capacity_factor, seed=1
    )
    assert isinstance(moe, MoE) and moe.built
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    _close(_predict(moe, x), _predict(ffn, x), 1e-5)


def _predict(layer, x):
    """`layer(x)` in a compiled predict step (eager ops are slow on JAX)."""
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    return model.predict_on_batch(x)


def test_upcycle_noise_makes_experts_differ():
    keras.utils.set_random_seed(6)
    ffn = _built(keras.layers.Dense(6))
    moe = upcycle(ffn, num_experts=3, noise=0.5, seed=2)
    kernels = keras.ops.convert_to_numpy(moe.experts.kernel)
    assert not np.allclose(kernels[0], kernels[1])
    # Relative noise: each expert stays near the dense kernel.
    dense_kernel = keras.ops.convert_to_numpy(ffn.kernel)
    spread = np.std(kernels - dense_kernel) / np.std(dense_kernel)
    assert 0.3 < spread < 0.7
    x = np.ones((2, 8), "float32")
    assert not np.allclose(_predict(moe, x), _predict(ffn, x), atol=1e-4)


def test_upcycle_rejects_bad_input():
    dense = _built(keras.layers.Dense(4))
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(dense, num_experts=0)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="noise"):
        upcycle(dense, num_experts=2, noise=-1.0)
    with pytest.raises(TypeError, match="noise"):
        upcycle(dense, num_experts=2, noise="lots")
    with pytest.raises(TypeError, match="model"):
        upcycle(np.zeros(3), num_experts=2)
    with pytest.raises(ValueError, match="built"):
        upcycle(keras.layers.Dense(4), num_experts=2)
    llama = keras_hub.models.LlamaBackbone(intermediate_dim=32, **COMMON)
    with pytest.raises(TypeError, match="num_experts"):
        upcycle(llama, num_experts=2.5)
    # NumPy numbers are numbers.
    moe = upcycle(
        dense, num_experts=np.int64(2), noise=np.float32(0.1), seed=np.int32(3)
    )
    assert moe.num_experts == 2
    with pytest.raises(ValueError, match="capacity_factor"):
        upcycle(llama, num_experts=2, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="MixtralBackbone.*upcycle"):
        upcycle(_mixtral(), num_experts=2)


@pytest.mark.skipif(
    BACKEND == "jax", reason="eager ops compile one by one on JAX: slow"
)
def test_upcycle_docstring_example():
    import doctest

    from moe_keras.hub import _upcycle

    result = doctest.testmod(
        _upcycle, extraglobs=dict(np=np, keras=keras, upcycle=upcycle)
    )
    assert result.attempted > 0 and result.failed == 0


# --- loading in a fresh process -------------------------------------------

_FRESH_LOAD = """
import sys

import keras
import numpy as np

import moe_keras

assert "keras_hub" not in sys.modules, "import moe_keras imported keras-hub"
for path in sys.argv[1:]:
    model = keras.saving.load_model(path + ".keras")
    data = np.load(path + ".npz")
    batch = {"token_ids": data["token_ids"], "padding_mask": data["mask"]}
    got = keras.ops.convert_to_numpy(model.predict_on_batch(batch))
    np.testing.assert_allclose(got, data["logits"], rtol=1e-5, atol=1e-5)
    print(type(model.backbone).__name__)
"""


@pytest.mark.skipif(
    BACKEND == "jax", reason="one fresh process per backend: TF and torch"
)
def test_converted_models_load_plainly_in_a_fresh_process(tmp_path):
    """A `.keras` file of a sparsified or upcycled model loads with a
    plain `load_model` after `import moe_keras`, which itself does not
    import keras-hub."""
    import os
    import subprocess
    import sys

    keras.utils.set_random_seed(5)
    sparse = sparsify(
        keras_hub.models.MixtralCausalLM(_mixtral(), preprocessor=None)
    )
    make_backbone, task_class = DENSE["llama"]
    upcycled = upcycle(
        task_class(make_backbone(), preprocessor=None), num_experts=4
    )
    x = _batch()
    paths = []
    for name, model in (("sparse", sparse), ("upcycled", upcycled)):
        path = str(tmp_path / name)
        model.save(path + ".keras")
        np.savez(
            path,
            token_ids=x["token_ids"],
            mask=x["padding_mask"],
            logits=keras.ops.convert_to_numpy(model.predict_on_batch(x)),
        )
        paths.append(path)
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, *paths],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": BACKEND},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "SparseMixtralBackbone",
        "UpcycledLlamaBackbone",
    ]


def test_every_converted_class_has_a_stand_in():
    # The stand-ins' list must name every class the adapter registers.
    from moe_keras.hub import _lazy

    registered = {
        name.split(">", 1)[1]
        for name, cls in custom_objects().items()
        if cls.__module__.startswith("moe_keras.hub.")
    }
    assert registered == set(_lazy.LAZY_CLASSES)
    for name, module in _lazy.LAZY_CLASSES.items():
        assert custom_objects()[f"moe_keras>{name}"].__module__.endswith(module)
