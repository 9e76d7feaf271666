"""Text classification with a Mixture-of-Experts feed-forward block.

Generated "documents" are variable-length sequences of token ids (0 is
padding). Each document holds filler tokens plus a few keywords of one
topic, and the topic is the label. The model embeds the tokens with
`Embedding(mask_zero=True)`, runs a top-2 MoE feed-forward block on every
position (the padding mask flows through the MoE: padded positions are not
routed and take no expert capacity), averages the unmasked positions and
classifies.

    python examples/text_classification.py --epochs 6
"""

import argparse
import os

VOCAB_SIZE = 200
MAX_LENGTH = 24
NUM_CLASSES = 4
KEYWORDS_PER_CLASS = 5


def make_data(samples, seed=0):
    """`(tokens, labels)`: int32 `(samples, MAX_LENGTH)` ids, zero padded.

    Ids `1 .. NUM_CLASSES * KEYWORDS_PER_CLASS` are topic keywords (class
    `c` owns a block of `KEYWORDS_PER_CLASS` of them); the rest of the
    vocabulary is filler shared by every class.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    first_filler = 1 + NUM_CLASSES * KEYWORDS_PER_CLASS
    labels = rng.integers(NUM_CLASSES, size=samples)
    tokens = np.zeros((samples, MAX_LENGTH), dtype="int32")
    for i, label in enumerate(labels):
        length = rng.integers(MAX_LENGTH // 3, MAX_LENGTH + 1)
        doc = rng.integers(first_filler, VOCAB_SIZE, size=length)
        num_keywords = rng.integers(1, 4)
        where = rng.choice(length, size=num_keywords, replace=False)
        doc[where] = (
            1
            + label * KEYWORDS_PER_CLASS
            + rng.integers(KEYWORDS_PER_CLASS, size=num_keywords)
        )
        tokens[i, :length] = doc
    return tokens, labels.astype("int32")


def build_model(num_experts=4, top_k=2):
    import keras

    from moe_keras import MoE

    tokens = keras.Input((MAX_LENGTH,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB_SIZE, 32, mask_zero=True)(tokens)
    h = MoE(
        num_experts=num_experts,
        units=32,
        hidden_units=64,
        activation="relu",
        top_k=top_k,
        name="moe_ffn",
    )(h)
    h = keras.layers.GlobalAveragePooling1D()(h)  # averages unmasked tokens
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(h)
    return keras.Model(tokens, outputs, name="moe_text_classifier")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    # Before TensorFlow starts: without an NVIDIA GPU its CUDA probe logs
    # `failed call to cuInit` as an error though nothing failed.
    gpu = os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu else "3")

    import keras

    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.samples, seed=args.seed)
    split = int(0.8 * len(x))
    model = build_model(args.experts, args.top_k)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if args.verbose:
        model.summary()
    initial = model.evaluate(
        x[split:], y[split:], args.batch_size, return_dict=True, verbose=0
    )
    model.fit(
        x[:split],
        y[:split],
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=args.verbose,
    )
    final = model.evaluate(
        x[split:], y[split:], args.batch_size, return_dict=True, verbose=0
    )
    result = {
        "initial_loss": float(initial["loss"]),
        "loss": float(final["loss"]),
        "accuracy": float(final["accuracy"]),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
