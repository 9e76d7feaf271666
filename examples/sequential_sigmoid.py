"""A sigmoid-gated mixture of linear experts in a Sequential model.

The task has two regimes: the sign of the first input feature decides which
of two random linear rules labels a point with one of 10 classes. One linear
classifier cannot fit both rules; a mixture of linear experts whose gate
looks at the input can, by switching experts with the regime. The sigmoid
gate weighs every expert independently (no competition between experts),
here as the dense mixture of all 4 experts.

    python examples/sequential_sigmoid.py --epochs 10
"""

import argparse
import os

NUM_FEATURES = 20
NUM_CLASSES = 10


def make_data(samples, seed=0):
    """`(x, y)`: 10 classes whose linear rule flips with the sign of x[0]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rules = rng.normal(size=(2, NUM_FEATURES, NUM_CLASSES))
    x = rng.normal(size=(samples, NUM_FEATURES)).astype("float32")
    regime = (x[:, 0] > 0).astype("int64")
    y = np.argmax(np.einsum("nf,nfc->nc", x, rules[regime]), axis=-1)
    return x, y.astype("int32")


def build_model():
    import keras

    from moe_keras import MoE

    model = keras.Sequential(name="sigmoid_moe")
    model.add(keras.Input((NUM_FEATURES,)))
    model.add(MoE(num_experts=4, units=NUM_CLASSES, gate="sigmoid"))
    model.add(keras.layers.Softmax())
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
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

    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.samples, seed=args.seed)
    split = int(0.8 * len(x))
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
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
    result = {
        "initial_loss": float(initial["loss"]),
        "loss": float(final["loss"]),
        "accuracy": float(final["accuracy"]),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
