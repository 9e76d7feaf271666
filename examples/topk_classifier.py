"""Softmax-gated top-1 and top-2 Mixture-of-Experts classifiers.

Points come from 6 well separated clusters, each with its own random linear
rule over 5 classes. Two otherwise identical models are trained: one routes
each point to its best expert (top-1, Switch style), the other to its two
best experts (top-2, Mixtral style), with sparse capacity dispatch.

Note on top-1 with the softmax gate: as in the Switch Transformer, the
combine weight at `top_k=1` is the selected softmax probability itself
(not renormalised to 1), so the task loss trains the router too, besides
the layer's load-balancing and z-losses. With `top_k=2` the two selected
probabilities are renormalised to sum to 1 (as in Mixtral).
`gate=SoftmaxGate(normalize_top_k=True)` renormalises at `top_k=1` too
(a softmax over the selected logits, as in Shazeer et al. 2017), which
makes every top-1 weight exactly 1.

    python examples/topk_classifier.py --epochs 8
"""

import argparse
import os

NUM_FEATURES = 12
NUM_CLUSTERS = 6
NUM_CLASSES = 5


def make_data(samples, seed=0):
    """`(x, y)`: 6 clusters, each labelled by its own linear rule."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, size=(NUM_CLUSTERS, NUM_FEATURES))
    rules = rng.normal(size=(NUM_CLUSTERS, NUM_FEATURES, NUM_CLASSES))
    cluster = rng.integers(NUM_CLUSTERS, size=samples)
    offset = rng.normal(size=(samples, NUM_FEATURES))
    y = np.argmax(np.einsum("nf,nfc->nc", offset, rules[cluster]), axis=-1)
    x = centres[cluster] + offset
    return x.astype("float32"), y.astype("int32")


def build_model(top_k, num_experts=6):
    import keras

    from moe_keras import MoE

    inputs = keras.Input((NUM_FEATURES,))
    h = MoE(
        num_experts=num_experts,
        units=32,
        hidden_units=32,
        activation="relu",
        gate="softmax",
        top_k=top_k,
        capacity_factor=1.5,
        name=f"moe_top{top_k}",
    )(inputs)
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(h)
    return keras.Model(inputs, outputs, name=f"top{top_k}_classifier")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    # Before TensorFlow starts: without an NVIDIA GPU its CUDA probe logs
    # `failed call to cuInit` as an error though nothing failed.
    gpu = os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu else "3")

    import keras

    x, y = make_data(args.samples, seed=args.seed)
    split = int(0.8 * len(x))
    results = {}
    for top_k in (1, 2):
        keras.utils.set_random_seed(args.seed)
        model = build_model(top_k)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
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
        results[f"top{top_k}"] = {
            "initial_loss": float(initial["loss"]),
            "loss": float(final["loss"]),
            "accuracy": float(final["accuracy"]),
        }
        print(f"top-{top_k}: {results[f'top{top_k}']}")
    return results


if __name__ == "__main__":
    main()
