"""What the routing statistics cost a training step.

Builds the same model three times: two residual `MoE` blocks with
`routing_statistics=True` (the default), with `routing_statistics=False`,
and with a dense FFN block in place of each MoE (what a model costs
without any MoE at all, for scale). Times a `fit` step (an epoch of
`--steps` batches, divided by the batches) and a `train_on_batch` call of
each, the variants in turns round after round so that a busy machine
slows them alike, and prints medians, the ratio of statistics on to
off, and what each MoE model's `train_on_batch` costs over the FFN
model's (with tiny sizes, e.g. `--seq-len 8 --d-model 16 --hidden 16`,
that is the per-step overhead the layer adds beyond its arithmetic):

    KERAS_BACKEND=tensorflow python benchmarks/statistics_overhead.py
    KERAS_BACKEND=jax python benchmarks/statistics_overhead.py
"""

import argparse
import platform
import statistics
import sys
import time

import keras
import numpy as np

from moe_keras import MoE

VARIANTS = ("statistics on", "statistics off", "dense FFN")


def build(variant, args):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((args.seq_len, args.d_model))
    x = inputs
    for _ in range(args.layers):
        h = keras.layers.LayerNormalization()(x)
        if variant == "dense FFN":
            h = keras.layers.Dense(args.top_k * args.hidden, "gelu")(h)
            h = keras.layers.Dense(args.d_model)(h)
        else:
            h = MoE(
                args.experts,
                args.d_model,
                hidden_units=args.hidden,
                activation="gelu",
                top_k=args.top_k,
                routing_statistics=variant == "statistics on",
            )(h)
        x = keras.layers.Add()([x, h])
    model = keras.Model(inputs, keras.layers.Dense(args.d_model)(x))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)

    rng = np.random.RandomState(0)
    n = args.batch_size * args.steps
    x = rng.normal(size=(n, args.seq_len, args.d_model)).astype("float32")
    y = rng.normal(size=x.shape).astype("float32")
    models = {v: build(v, args) for v in VARIANTS}
    for model in models.values():  # compile and warm up
        model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
        model.train_on_batch(x[: args.batch_size], y[: args.batch_size])

    fit_ms = {v: [] for v in VARIANTS}
    tob_ms = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
            fit_ms[variant].append(
                1000 * (time.perf_counter() - start) / args.steps
            )
            times = []
            for i in range(args.steps):
                batch = slice(i * args.batch_size, (i + 1) * args.batch_size)
                start = time.perf_counter()
                model.train_on_batch(x[batch], y[batch])
                times.append(1000 * (time.perf_counter() - start))
            tob_ms[variant].append(statistics.median(times))

    print(
        f"command: KERAS_BACKEND={keras.backend.backend()} python {' '.join(sys.argv)}"
    )
    print(
        f"versions: python {platform.python_version()}, keras "
        f"{keras.__version__}; machine: {platform.machine()}"
    )
    print(
        f"model: {args.layers} residual blocks, tokens/batch="
        f"{args.batch_size * args.seq_len}, d={args.d_model}, "
        f"E={args.experts}, k={args.top_k}, hidden={args.hidden}"
    )
    print(
        "| variant | fit ms/step | train_on_batch ms | fit x off | tob x off "
        "| tob - FFN ms |"
    )
    print("|---|---|---|---|---|---|")
    ffn_tob = statistics.median(tob_ms["dense FFN"])
    off_fit = statistics.median(fit_ms["statistics off"])
    off_tob = statistics.median(tob_ms["statistics off"])
    for variant in VARIANTS:
        f = statistics.median(fit_ms[variant])
        t = statistics.median(tob_ms[variant])
        print(
            f"| {variant} | {f:.2f} | {t:.2f} | {f / off_fit:.3f} | "
            f"{t / off_tob:.3f} | {t - ffn_tob:+.2f} |"
        )


if __name__ == "__main__":
    main()
