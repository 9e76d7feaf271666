"""Do the load-balancing options balance? A seconds-long CPU experiment.

Inputs come from 8 clusters with skewed frequencies (half of all points
from one cluster), each cluster with its own target function, so an
unbalanced router sends most tokens to few experts. The same top-2 MoE is
trained with each balancing method, and the max/mean expert load
(fraction of assignments; 1.0 is perfect balance, E/k = 4.0 the worst for
k = 2 of 8) is measured on held-out data after training.

    python benchmarks/balance_experiment.py
"""

import argparse
import sys

import keras
import numpy as np

import moe_keras
from moe_keras import MoE

EXPERTS, TOP_K, FEATURES = 8, 2, 16


def make_data(n, seed):
    rng = np.random.RandomState(seed)
    weights = np.array([0.5] + [0.5 / 7] * 7)
    cluster = rng.choice(8, size=n, p=weights)
    centers = np.random.RandomState(99).normal(scale=3.0, size=(8, FEATURES))
    maps = np.random.RandomState(98).normal(size=(8, FEATURES, 4))
    x = centers[cluster] + rng.normal(size=(n, FEATURES))
    y = np.einsum("nd,ndk->nk", x, maps[cluster]) / FEATURES
    return x.astype("float32"), y.astype("float32")


METHODS = {
    "none": lambda: dict(load_balance_weight=0.0, z_loss_weight=0.0),
    "switch loss 0.01": lambda: dict(load_balance_weight=0.01),
    "switch loss 0.1": lambda: dict(load_balance_weight=0.1),
    "noisy top-k": lambda: dict(
        gate=moe_keras.NoisyTopKGate(seed=0),
        load_balance_weight=0.0,
        z_loss_weight=0.0,
    ),
    "aux-free bias": lambda: dict(
        gate=moe_keras.SigmoidGate(bias_update_rate=0.01),
        load_balance_weight=0.0,
        z_loss_weight=0.0,
    ),
    "expert choice": lambda: dict(
        gate=moe_keras.ExpertChoiceGate(), top_k=None
    ),
}


def run(name, epochs, seed):
    keras.utils.set_random_seed(seed)
    kwargs = dict(
        num_experts=EXPERTS,
        units=16,
        hidden_units=32,
        activation="relu",
        top_k=TOP_K,
        capacity_factor=2.0,
    )
    kwargs.update(METHODS[name]())
    layer = MoE(**kwargs)
    model = keras.Sequential(
        [keras.Input((FEATURES,)), layer, keras.layers.Dense(4)]
    )
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    x, y = make_data(4096, seed)
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    x_test, y_test = make_data(2048, seed + 1)
    routing = layer.gate(x_test, routing=True, top_k=layer.top_k)
    if "indices" in routing:
        load = np.asarray(
            moe_keras.losses.assignment_fraction(routing["indices"], EXPERTS)
        )
    else:  # expert choice: each expert takes the same number of tokens
        load = np.full(EXPERTS, 1.0 / EXPERTS)
    mse = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["loss"]
    return load.max() * EXPERTS, mse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"command: KERAS_BACKEND={keras.backend.backend()} python "
        f"benchmarks/balance_experiment.py {' '.join(sys.argv[1:])}"
    )
    print(
        f"keras {keras.__version__}, E={EXPERTS}, k={TOP_K}, 50% of inputs from one cluster"
    )
    print("| method | max/mean expert load | test MSE |")
    print("|---|---|---|")
    for name in METHODS:
        ratio, mse = run(name, args.epochs, args.seed)
        print(f"| {name} | {ratio:.2f} | {mse:.4f} |")


if __name__ == "__main__":
    main()
