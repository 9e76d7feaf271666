"""Cost of the routing plan, by ranking method, as the experts grow.

The plan (`moe_keras.dispatch.RoutePlan`) ranks every (token, choice)
assignment within its expert and builds the slot maps. Its one-hot form
costs `O(tokens * k * E)`, its sorting form `O(tokens * k * log(tokens *
k))`; `dispatch.plan_method` picks between them by E from this table.
Times the plan alone (forward, compiled: `jax.jit` or `tf.function(
jit_compile=True)`), medians of interleaved rounds:

    KERAS_BACKEND=jax python benchmarks/routing_plan.py
    KERAS_BACKEND=tensorflow python benchmarks/routing_plan.py
"""

import argparse
import platform
import time

import keras
import numpy as np

from moe_keras import dispatch

SIZES = [
    (4096, 2, 8),
    (4096, 4, 32),
    (4096, 8, 64),
    (16384, 8, 64),
    (4096, 4, 128),
    (32768, 2, 8),
]


def _compile(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def _block(value):
    keras.ops.convert_to_numpy(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(
        "| tokens | k | E | one_hot ms | sort ms | one_hot / sort | "
        "plan_method picks |"
    )
    print("|---|---|---|---|---|---|---|")
    for tokens, k, experts in SIZES:
        rng = np.random.default_rng(0)
        scores = rng.normal(size=(tokens, experts))
        indices = np.argsort(-scores, axis=-1)[:, :k].astype("int32")
        indices = keras.ops.convert_to_tensor(indices)
        capacity = dispatch.capacity(tokens, k, experts, 1.0)
        fns = {}
        for method in dispatch.PLAN_METHODS:

            def plan(
                indices, method=method, experts=experts, capacity=capacity
            ):
                p = dispatch.RoutePlan(
                    indices, experts, capacity, method=method
                )
                return p.assignment_slot, p.slot_assignment, p.slot_filled

            fns[method] = _compile(plan)
            _block(fns[method](indices)[1])
        times = {method: [] for method in fns}
        for _ in range(args.rounds):
            for method, fn in fns.items():
                start = time.perf_counter()
                _block(fn(indices)[1])
                times[method].append(time.perf_counter() - start)
        one_hot, by_sort = (
            1000 * float(np.median(times[m])) for m in dispatch.PLAN_METHODS
        )
        print(
            f"| {tokens} | {k} | {experts} | {one_hot:.2f} | {by_sort:.2f} "
            f"| {one_hot / by_sort:.2f} | {dispatch.plan_method(experts)} |"
        )
    print(
        f"\nbackend {keras.backend.backend()}, keras {keras.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )


if __name__ == "__main__":
    main()
