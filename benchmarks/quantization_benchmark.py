"""Quantized experts: weight bytes, agreement with the float model, and
`predict` time, for one `MoE` layer and a sparsified keras-hub Mixtral;
and a few `fit` steps in `"float8"` mode.

`model.quantize(mode)` reaches `DenseExperts` (the router stays float32).
For each mode this prints, against the float32 model, side by side in one
process (predict calls timed in turns, so a busy machine slows them alike):

- weight bytes of the whole model and of its expert banks;
- the layer: the largest output difference, relative to the largest
  output; the Mixtral: greedy-token agreement (the share of positions of a
  held-out batch whose argmax token is the float model's) and the largest
  logit difference;
- `predict_on_batch` time, and its ratio to the float model's.

The Mixtral is small, sparsified with `moe_keras.sparsify` and first
fine-tuned on Python's help text (as bytes, as `examples/sparsify_keras_hub.py`
does), so that its tokens are not a random model's near-ties.

    python benchmarks/quantization_benchmark.py
    KERAS_BACKEND=jax python benchmarks/quantization_benchmark.py --steps 60
"""

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

MODES = ("int8", "int4", "float8")
HERE = os.path.dirname(os.path.abspath(__file__))


def _example():
    """`examples/sparsify_keras_hub.py`, for its text and batches."""
    path = os.path.join(HERE, "..", "examples", "sparsify_keras_hub.py")
    spec = importlib.util.spec_from_file_location("sparsify_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bytes(model):
    """`(all weights, expert-bank weights)` in bytes."""
    total = experts = 0
    for variable in model.weights:
        size = np.asarray(variable.numpy()).nbytes
        total += size
        if "/experts/" in variable.path or "/shared_experts/" in variable.path:
            experts += size
    return total, experts


def _timed(models, x, rounds):
    """Median ms of `predict_on_batch` for each model, in turns."""
    times = {name: [] for name in models}
    for model in models.values():
        model.predict_on_batch(x)  # compile
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            np.asarray(model.predict_on_batch(x))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _loaded_copies(model, keras):
    """The float model and a copy of it per mode, each loaded from one
    `.keras` file and quantized."""
    path = os.path.join(tempfile.mkdtemp(), "float.keras")
    model.save(path)
    copies = {"float32": model}
    for mode in MODES:
        copy = keras.saving.load_model(path)
        copy.quantize(mode)
        copies[mode] = copy
    return copies


def layer_table(args, keras, moe_keras):
    """One MoE layer of SwiGLU experts in a Sequential model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((args.layer_dim,)),
            moe_keras.MoE(
                args.layer_experts,
                args.layer_dim,
                hidden_units=2 * args.layer_dim,
                activation="silu",
                gated=True,
                top_k=2,
                capacity_factor=None,
            ),
        ]
    )
    x = np.random.default_rng(1).normal(size=(args.tokens, args.layer_dim))
    x = x.astype("float32")
    models = _loaded_copies(model, keras)
    reference = np.asarray(model.predict_on_batch(x))
    times = _timed(models, x, args.rounds)
    base_total, base_experts = _bytes(model)
    print(
        f"\nOne MoE layer: {args.layer_experts} SwiGLU experts, top-2, "
        f"d={args.layer_dim}, hidden={2 * args.layer_dim}, dropless; "
        f"{args.tokens} tokens\n"
    )
    print(
        "| mode | weight bytes | expert bytes | experts x smaller | "
        "max output diff / max output | predict ms | x float |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, copy in models.items():
        total, experts = _bytes(copy)
        diff = np.abs(np.asarray(copy.predict_on_batch(x)) - reference).max()
        print(
            f"| {name} | {total:,} | {experts:,} | "
            f"{base_experts / experts:.2f} | "
            f"{diff / np.abs(reference).max():.4f} | {times[name]:.2f} | "
            f"{times[name] / times['float32']:.2f} |"
        )


def mixtral_table(args, keras, keras_hub, moe_keras):
    """A sparsified Mixtral, fine-tuned, then quantized."""
    example = _example()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=example.VOCAB, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=128, intermediate_dim=256,
        num_experts=8, top_k=2, sliding_window=256,
    )  # fmt: skip
    lm = keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    sparse = moe_keras.sparsify(lm)
    text = example.load_text()
    train_x, train_y = example.batches(
        text, args.steps, args.batch_size, args.seq_len, seed=0
    )
    first, last = example.fine_tune(sparse, train_x, train_y, args, keras)
    x, _ = example.batches(text, 1, args.batch_size, args.seq_len, seed=1)
    models = _loaded_copies(sparse, keras)
    reference = np.asarray(sparse.predict_on_batch(x))
    tokens = reference.argmax(-1)
    times = _timed(models, x, args.rounds)
    base_total, base_experts = _bytes(sparse)
    print(
        f"\nSparsified keras-hub Mixtral (2 layers, hidden 128, 8 experts, "
        f"top-2), fine-tuned {args.steps} steps (loss {first:.2f} -> "
        f"{last:.2f}); a held-out batch of {args.batch_size} x "
        f"{args.seq_len} tokens\n"
    )
    print(
        "| mode | weight bytes | expert bytes | experts x smaller | "
        "greedy-token agreement | max logit diff | predict ms | x float |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, copy in models.items():
        total, experts = _bytes(copy)
        logits = np.asarray(copy.predict_on_batch(x))
        agreement = (logits.argmax(-1) == tokens).mean()
        print(
            f"| {name} | {total:,} | {experts:,} | "
            f"{base_experts / experts:.2f} | {agreement:.4f} | "
            f"{np.abs(logits - reference).max():.4f} | {times[name]:.1f} | "
            f"{times[name] / times['float32']:.2f} |"
        )


def float8_training(args, keras, moe_keras):
    """`fit` with float8 experts: the loss before and after."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(512, 16)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(16, 4))).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((16,)),
            moe_keras.MoE(
                4, 4, hidden_units=32, activation="relu", top_k=2,
                capacity_factor=None,
            ),
        ]
    )  # fmt: skip
    model.quantize("float8")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=args.float8_epochs, batch_size=64, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    print(
        f"\nfloat8 experts, `fit` {args.float8_epochs} epochs of 8 steps "
        f"(Adam): mse {before:.4f} -> {after:.4f}"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layer-dim", type=int, default=256)
    parser.add_argument("--layer-experts", type=int, default=8)
    parser.add_argument("--float8-epochs", type=int, default=5)
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    import keras
    import keras_hub

    import moe_keras

    backend = keras.backend.backend()
    print(
        f"command: KERAS_BACKEND={backend} python "
        f"benchmarks/quantization_benchmark.py {' '.join(argv)}".rstrip()
    )
    print(
        f"versions: python {platform.python_version()}, keras "
        f"{keras.__version__}, keras_hub {keras_hub.__version__}; machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    layer_table(args, keras, moe_keras)
    mixtral_table(args, keras, keras_hub, moe_keras)
    float8_training(args, keras, moe_keras)


if __name__ == "__main__":
    main()
