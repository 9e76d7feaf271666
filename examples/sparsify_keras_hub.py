"""Sparsify a keras-hub Mixtral, fine-tune and sample it; upcycle a dense
Qwen3 into an MoE.

keras-hub's MoE blocks run every expert on every token and mask the
result. `moe_keras.hub.sparsify` swaps them for blocks on this package's
sparse dispatch, with the same weights and routing, so the model computes
the same function with `top_k / num_experts` of the expert work.
`moe_keras.hub.upcycle` goes the other way round for a dense model: each
FFN becomes an `MoE` whose experts start as copies of it (sparse
upcycling, Komatsuzaki et al. 2022), so the model is unchanged at step 0.

Everything is tiny and randomly initialised (no download). The text is
the help topics that ship with Python (`pydoc_data.topics`), tokenised as
bytes (vocabulary 256). The script:

1. builds a small `MixtralCausalLM`, sparsifies it and checks that the
   logits agree;
2. fine-tunes the sparsified model for `--steps` steps and prints the
   loss before and after;
3. generates from a prompt with greedy sampling;
4. upcycles a small dense `Qwen3CausalLM`, checks that its logits at step
   0 equal the dense model's, and fine-tunes it a few steps.

    python examples/sparsify_keras_hub.py
    KERAS_BACKEND=jax python examples/sparsify_keras_hub.py --steps 40

Exit status: 0 on success, 2 for bad flags.
"""

import argparse

import numpy as np

VOCAB = 256  # bytes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def load_text():
    """Python's own help topics, as one string (about 465,000 chars)."""
    from pydoc_data import topics

    return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def batches(text, steps, batch_size, seq_len, seed):
    """`(x, y)` for `steps` batches of random byte windows: `x` the keras-hub
    inputs dict, `y` the next bytes."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype("int32")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq_len - 1, steps * batch_size)
    windows = np.stack([data[s : s + seq_len + 1] for s in starts])
    x = {
        "token_ids": windows[:, :-1],
        "padding_mask": np.ones((len(windows), seq_len), "int32"),
    }
    return x, windows[:, 1:]


def _compile(model, keras):
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )


def fine_tune(model, x, y, args, keras):
    """Trains on `(x, y)` batch by batch; returns `(loss of the first
    batch, before its update; mean loss of the last three batches)`."""
    _compile(model, keras)
    losses = []
    for start in range(0, len(y), args.batch_size):
        batch = {k: v[start : start + args.batch_size] for k, v in x.items()}
        logs = model.train_on_batch(
            batch, y[start : start + args.batch_size], return_dict=True
        )
        losses.append(float(logs["loss"]))
    return losses[0], float(np.mean(losses[-3:]))


def generate(model, prompt, length):
    """Greedy continuation of `prompt` (a str), decoded as bytes."""
    ids = np.zeros((1, length), "int32")
    mask = np.zeros((1, length), "int32")
    encoded = np.frombuffer(prompt.encode("utf-8"), np.uint8)
    ids[0, : len(encoded)] = encoded
    mask[0, : len(encoded)] = 1
    out = model.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None
    )
    return bytes(np.asarray(out["token_ids"][0], "uint8")).decode(
        "utf-8", "replace"
    )


def main(argv=None):
    args = parse_args(argv)

    import keras
    import keras_hub

    from moe_keras.hub import sparsify
    from moe_keras.hub import upcycle

    print(f"backend: {keras.backend.backend()}", flush=True)
    x, y = batches(
        load_text(), args.steps, args.batch_size, args.seq_len, args.seed
    )
    sample = {k: v[:2] for k, v in x.items()}
    result = {}

    # 1. Sparsify a Mixtral causal LM.
    keras.utils.set_random_seed(args.seed)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
        num_experts=8, top_k=2, sliding_window=args.seq_len,
    )  # fmt: skip
    mixtral = keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    sparse = sparsify(mixtral)
    gap = float(
        np.max(
            np.abs(
                mixtral.predict_on_batch(sample)
                - sparse.predict_on_batch(sample)
            )
        )
    )
    result["sparsify_max_abs_diff"] = gap
    print(
        f"sparsified {type(sparse.backbone).__name__}: max |logits - "
        f"original| = {gap:.2e}"
    )

    # 2. Fine-tune it.
    before, after = fine_tune(sparse, x, y, args, keras)
    result["mixtral_loss"] = (before, after)
    print(f"fine-tuning, {args.steps} steps: loss {before:.3f} -> {after:.3f}")

    # 3. Generate.
    text = generate(sparse, "The ", 40)
    result["generated"] = text
    print(f"greedy sample: {text!r}")

    # 4. Upcycle a dense Qwen3.
    keras.utils.set_random_seed(args.seed)
    dense_backbone = keras_hub.models.Qwen3Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
        head_dim=16,
    )  # fmt: skip
    dense = keras_hub.models.Qwen3CausalLM(dense_backbone, preprocessor=None)
    moe = upcycle(dense, num_experts=4, top_k=2, seed=args.seed)
    gap = float(
        np.max(
            np.abs(
                dense.predict_on_batch(sample) - moe.predict_on_batch(sample)
            )
        )
    )
    result["upcycle_max_abs_diff"] = gap
    print(
        f"upcycled {type(moe.backbone).__name__} "
        f"({moe.backbone.moe_layers()[0].num_experts} experts, top-2): "
        f"max |logits - dense| at step 0 = {gap:.2e}"
    )
    steps = max(3, args.steps // 3)
    short = {k: v[: steps * args.batch_size] for k, v in x.items()}
    before, after = fine_tune(
        moe, short, y[: steps * args.batch_size], args, keras
    )
    result["upcycled_loss"] = (before, after)
    print(f"upcycled, {steps} steps: loss {before:.3f} -> {after:.3f}")
    return result


if __name__ == "__main__":
    main()
