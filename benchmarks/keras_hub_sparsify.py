"""Training-step time and memory of keras-hub MoE models, before and after
`moe_keras.sparsify`.

keras-hub's MoE blocks run every expert on every token and mask the
result; `sparsify` swaps them for blocks on this package's sparse,
dropless dispatch (same weights, same routing). This times one compiled
training step (forward, backward, Adam update) of a small randomly
initialised causal LM of each keras-hub MoE family (Mixtral, Qwen-MoE,
Qwen3-MoE, GPT-OSS, Gemma 4, Qwen3.5-MoE), original and sparsified,
side by side in one process, in turns (one step of each, round after
round, so a busy machine slows them alike), and gives each variant's
peak memory from a process of its own (max RSS, how much RSS grew over
its first training steps, and on JAX the scratch memory XLA plans for the
forward and backward pass). Prints a markdown table, the command and
the versions:

    KERAS_BACKEND=tensorflow python benchmarks/keras_hub_sparsify.py
    KERAS_BACKEND=jax python benchmarks/keras_hub_sparsify.py
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# model -> (keras-hub backbone class name, its constructor arguments)
MODELS = {
    "mixtral": (
        "MixtralBackbone",
        dict(
            vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=256, intermediate_dim=512,
            num_experts=8, top_k=2, sliding_window=512,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeBackbone",
        dict(
            vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=256, intermediate_dim=512,
            moe_intermediate_dim=256, head_dim=64, num_experts=16, top_k=2,
            norm_top_k_prob=True,
        ),
    ),
    # A shared expert with a sigmoid gate beside the routed ones.
    "qwen_moe": (
        "QwenMoeBackbone",
        dict(
            vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=256, intermediate_dim=512,
            moe_intermediate_dim=256, shared_expert_intermediate_dim=512,
            num_experts=16, top_k=2, norm_top_k_prob=True,
            decoder_sparse_step=1,
        ),
    ),
    # GPT-OSS-20b's routing ratio (top-4 of 32: 8 times the expert work).
    "gpt_oss": (
        "GptOssBackbone",
        dict(
            vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=256, intermediate_dim=256,
            head_dim=64, num_experts=32, top_k=4, sliding_window=512,
        ),
    ),
    # A dense MLP runs beside the experts in every layer.
    "gemma4": (
        "Gemma4Backbone",
        dict(
            vocabulary_size=512, image_size=16, num_layers=2,
            num_query_heads=4, num_key_value_heads=2, hidden_dim=256,
            intermediate_dim=512, head_dim=64, enable_moe_block=True,
            num_experts=16, expert_intermediate_dim=256,
            num_experts_per_token=2, sliding_window_size=512,
        ),
    ),
    # Hybrid: a Gated DeltaNet layer, then attention; a shared expert.
    "qwen3_5_moe": (
        "Qwen3_5MoeBackbone",
        dict(
            vocabulary_size=512, num_layers=2, num_query_heads=4,
            num_key_value_heads=2, head_dim=64, hidden_dim=256,
            moe_intermediate_dim=256, shared_expert_intermediate_size=256,
            num_experts=16, top_k=2,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=4, linear_num_value_heads=4,
            linear_key_head_dim=64, linear_value_head_dim=64,
        ),
    ),
    # The whole-model GPU size of issue 20: run with --models mixtral-gpu
    # --batch-size 8 --seq-len 1024 --no-memory.
    "mixtral-gpu": (
        "MixtralBackbone",
        dict(
            vocabulary_size=32000, num_layers=4, num_query_heads=16,
            num_key_value_heads=8, hidden_dim=1024, intermediate_dim=2048,
            num_experts=8, top_k=2, sliding_window=1024,
        ),
    ),
}  # fmt: skip
TASKS = {
    "mixtral": "MixtralCausalLM",
    "qwen3_moe": "Qwen3MoeCausalLM",
    "qwen_moe": "QwenMoeCausalLM",
    "gpt_oss": "GptOssCausalLM",
    "gemma4": "Gemma4CausalLM",
    "qwen3_5_moe": "Qwen3_5MoeCausalLM",
    "mixtral-gpu": "MixtralCausalLM",
}
# sparsified: `sparsify(model)`, dropless; cf1.0: capacity_factor=1.0.
VARIANTS = ("keras-hub", "sparsified", "sparsified-cf1.0")
DEFAULT_MODELS = (
    "mixtral", "qwen_moe", "qwen3_moe", "gpt_oss", "gemma4", "qwen3_5_moe"
)  # fmt: skip


def _build(model_name, variant, jit_compile):
    import keras
    import keras_hub

    from moe_keras.hub import sparsify

    keras.utils.set_random_seed(0)
    backbone_name, kwargs = MODELS[model_name]
    backbone = getattr(keras_hub.models, backbone_name)(**kwargs)
    task = getattr(keras_hub.models, TASKS[model_name])(
        backbone=backbone, preprocessor=None
    )
    if variant == "sparsified":
        task = sparsify(task)
    elif variant == "sparsified-cf1.0":
        task = sparsify(task, capacity_factor=1.0)
    task.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return task


def _data(args, model):
    rng = np.random.default_rng(0)
    vocab = 512
    tokens = rng.integers(1, vocab, (args.batch_size, args.seq_len + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((args.batch_size, args.seq_len), "int32"),
    }
    if "position_ids" in [i.name for i in model.backbone.inputs]:  # Gemma 4
        positions = np.arange(args.seq_len, dtype="int32")
        x["position_ids"] = np.tile(positions, (args.batch_size, 1))
    return x, tokens[:, 1:].astype("int32")


def _peak_rss_mb():
    """Peak resident memory of this process in MB (from /proc, where
    `ru_maxrss` of a child would include what it inherited)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmHWM"].split()[0]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_worker(model_name, variant, args):
    model = _build(model_name, variant, args.jit_compile)
    x, y = _data(args, model)
    before = _peak_rss_mb()
    for _ in range(3):
        model.train_on_batch(x, y)
    peak = _peak_rss_mb()
    return {
        "peak_rss_mb": peak,
        "step_rss_mb": peak - before,
        "xla_temp_mb": _xla_temp_mb(model, x, y),
    }


def _xla_temp_mb(model, x, y):
    """On JAX, the scratch memory XLA plans for the forward and backward
    pass (its intermediate buffers: activations, the `[experts, tokens,
    hidden]` products of the original blocks), which RSS hides since
    JAX's CPU client allocates ahead. `None` on other backends."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    def loss(trainable, non_trainable):
        logits, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True
            )
        )

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    lowered = jax.jit(jax.grad(loss)).lower(trainable, non_trainable)
    return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20


def _memory(model_name, variant, argv):
    cmd = [sys.executable, __file__, *argv, "--memory-worker"]
    cmd += [f"{model_name}:{variant}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"error": tail[0] if tail else f"exit {proc.returncode}"}


def _time(model_name, args):
    """Median and fastest step ms of each variant, timed in turns."""
    variants = args.variants.split(",")
    models = {v: _build(model_name, v, args.jit_compile) for v in variants}
    x, y = _data(args, models["keras-hub"])
    times = {v: [] for v in variants}
    for model in models.values():  # compile, warm up
        for _ in range(2):
            model.train_on_batch(x, y)
    for _ in range(args.steps):
        for variant, model in models.items():
            start = time.perf_counter()
            loss = model.train_on_batch(x, y)
            np.asarray(loss)  # wait for the step
            times[variant].append((time.perf_counter() - start) * 1e3)
    return {
        v: (statistics.median(t), min(t), models[v].count_params())
        for v, t in times.items()
    }


def _versions():
    import keras
    import keras_hub

    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__}
    module = {"tensorflow": "tensorflow"}.get(backend, backend)
    versions[module] = __import__(module).__version__
    versions["keras_hub"] = keras_hub.__version__
    return backend, versions


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--variants", default="keras-hub,sparsified")
    parser.add_argument("--dtype-policy", default=None)
    parser.add_argument(
        "--no-memory", action="store_true",
        help="skip the memory processes (one compile per variant each)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--no-jit", dest="jit_compile", action="store_false",
        help="compile the step without XLA (TensorFlow)",
    )  # fmt: skip
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if "keras-hub" not in args.variants.split(","):
        parser.error("--variants must include keras-hub, the baseline")
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 1:
        parser.error("--steps, --batch-size and --seq-len must be >= 1")
    jit = args.jit_compile
    if args.dtype_policy:
        import keras

        keras.config.set_dtype_policy(args.dtype_policy)
    if args.memory_worker:
        model_name, variant = args.memory_worker.split(":")
        result = _memory_worker(model_name, variant, args)
        print("RESULT " + json.dumps(result))
        return

    import keras

    if keras.backend.backend() == "torch":
        jit = args.jit_compile = False  # Keras' default on torch: eager
    backend, versions = _versions()
    print(
        f"command: KERAS_BACKEND={backend} python "
        f"benchmarks/keras_hub_sparsify.py {' '.join(argv)}".rstrip()
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"batch {args.batch_size} x {args.seq_len} tokens, Adam, "
        f"policy {keras.config.dtype_policy().name}, "
        f"jit_compile={jit}, {args.steps} timed steps per variant\n"
    )
    worker_argv = [a for a in argv if not a.startswith("--models")]
    print(
        "| model | experts (k) | variant | params | step ms (median) | "
        "fastest ms | speed-up | peak RSS MB | RSS growth in steps MB | "
        "XLA temp MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        config = MODELS[name][1]
        top_k = config.get("top_k", config.get("num_experts_per_token"))
        variants = args.variants.split(",")
        memory = {
            v: (
                {"error": "not measured"}
                if args.no_memory
                else _memory(name, v, worker_argv)
            )
            for v in variants
        }
        timed = _time(name, args)
        base = timed["keras-hub"][0]
        for variant in variants:
            median, fastest, params = timed[variant]
            m = memory[variant]
            if "error" in m:
                mem = "- | - | - |"
            else:
                temp = m["xla_temp_mb"]
                mem = f"{m['peak_rss_mb']:.0f} | {m['step_rss_mb']:.0f} | "
                mem += "- |" if temp is None else f"{temp:.0f} |"
            print(
                f"| {name} | {config['num_experts']} ({top_k}) | "
                f"{variant} | {params:,} | {median:.1f} | {fastest:.1f} | "
                f"{base / median:.2f}x | " + mem
            )


if __name__ == "__main__":
    main()
