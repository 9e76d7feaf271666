"""Binary classification of 784-feature inputs with a 10-expert MoE layer.

`Input(784) -> MoE(num_experts=10, units=64) -> Dense(1, sigmoid)`, the
shape of a flattened 28x28 image task. The images are generated: each one
holds a bright bar, horizontal (label 0) or vertical (label 1), at a random
row or column, with random intensity and pixel noise. Prints `summary()`,
trains with `fit` and scores with `evaluate`.

    python examples/binary_784.py --epochs 5
"""

import argparse
import os

SIDE = 28


def make_data(samples, seed=0):
    """`(x, y)`: `(samples, 784)` float32 images in [0, 1], int32 labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(2, size=samples)
    images = rng.uniform(0.0, 0.3, size=(samples, SIDE, SIDE))
    position = rng.integers(2, SIDE - 2, size=samples)
    intensity = rng.uniform(0.4, 0.7, size=samples)
    for i in range(samples):
        bar = slice(position[i] - 1, position[i] + 1)
        if y[i] == 0:
            images[i, bar, :] += intensity[i]
        else:
            images[i, :, bar] += intensity[i]
    x = np.clip(images, 0.0, 1.0).reshape(samples, SIDE * SIDE)
    return x.astype("float32"), y.astype("int32")


def build_model():
    import keras

    from moe_keras import MoE

    inputs = keras.Input((SIDE * SIDE,), name="pixels")
    h = MoE(
        num_experts=10,
        units=64,
        activation="relu",
        top_k=2,
        name="moe",
    )(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="prob")(h)
    return keras.Model(inputs, outputs, name="binary_784_moe")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4000)
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
    model.summary()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="binary_crossentropy",
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
        validation_split=0.1,
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
