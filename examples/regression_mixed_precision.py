"""Regression with a sigmoid-gated MoE under `mixed_bfloat16`.

The target is a different smooth function of the inputs in each of four
quadrants of the first two features, so experts can take a quadrant each.
The model trains with mean squared error under the Keras mixed-precision
policy `mixed_bfloat16`: the experts compute in bfloat16 with float32
weights, the router of the `MoE` layer stays in float32 (as it always
does), and the output layer is forced to float32 so the loss is computed
in full precision. The global policy is set for the run and restored
afterwards.

The router is `gate="sigmoid"`: every expert gets an independent gate
value in (0, 1) rather than a share of a softmax. (A gate that weights
each output *feature* of each expert separately is
`moe_keras.FeatureGate`.)

    python examples/regression_mixed_precision.py --epochs 10
"""

import argparse
import os

NUM_FEATURES = 8


def make_data(samples, seed=0):
    """`(x, y)`: float32 inputs and `(samples, 1)` targets (unit scale)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, size=(samples, NUM_FEATURES))
    quadrant = (x[:, 0] > 0).astype(int) * 2 + (x[:, 1] > 0).astype(int)
    weights = rng.normal(size=(4, NUM_FEATURES)) / np.sqrt(NUM_FEATURES)
    linear = np.einsum("nf,nf->n", x, weights[quadrant])
    curves = np.stack(
        [np.sin(2 * x[:, 2]), x[:, 3] ** 2 - 1.3, np.cos(x[:, 4]), -x[:, 5]],
        axis=-1,
    )
    y = linear + curves[np.arange(samples), quadrant]
    y = (y - y.mean()) / y.std()
    return x.astype("float32"), y[:, None].astype("float32")


def build_model():
    import keras

    from moe_keras import MoE

    inputs = keras.Input((NUM_FEATURES,))
    h = MoE(
        num_experts=4,
        units=32,
        hidden_units=32,
        activation="gelu",
        # One independent weight in (0, 1) per expert.
        gate="sigmoid",
        name="moe",
    )(inputs)
    outputs = keras.layers.Dense(1, dtype="float32", name="prediction")(h)
    return keras.Model(inputs, outputs, name="moe_regression")


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
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model()
        moe = model.get_layer("moe")
        print(
            f"policy {keras.config.dtype_policy().name}: experts compute in "
            f"{moe.experts.compute_dtype} (weights "
            f"{moe.experts.variable_dtype}), router in "
            f"{moe.gate.compute_dtype}, output in "
            f"{model.get_layer('prediction').compute_dtype}"
        )
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss="mse",
            metrics=["mae"],
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
        predictions = model.predict(x[split:], verbose=0)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    result = {
        "initial_loss": float(initial["loss"]),
        "loss": float(final["loss"]),
        "mae": float(final["mae"]),
        "prediction_dtype": str(predictions.dtype),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
