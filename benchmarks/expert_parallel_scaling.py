"""Per-device cost of an MoE layer's train step as the expert axis grows.

For 1, 2, 4 and 8 devices on a `(1, n)` mesh ("batch", "model") with
`moe_keras.get_layout_map`, compiles the layer's forward and backward
(JAX) and reports, per device, XLA's FLOP count, its scratch memory
(`temp_size_in_bytes`), the collectives in the step, and the median step
time. On virtual CPU devices (the default here) all "devices" share the
host's cores, so the step time shows the overhead of the exchange, not a
speed-up; on a real multi-device host the same script measures both.

    python benchmarks/expert_parallel_scaling.py            # 8 virtual CPUs
    python benchmarks/expert_parallel_scaling.py --real     # the host's own
"""

import argparse
import os
import sys


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--real",
        action="store_true",
        help="use the host's devices instead of 8 virtual CPU devices",
    )
    return parser.parse_args()


ARGS = _parse()
os.environ["KERAS_BACKEND"] = "jax"
if not ARGS.real:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8"
    )

import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import moe_keras  # noqa: E402


def _step(devices):
    keras.distribution.set_distribution(None)
    mesh = None
    if devices > 1:
        mesh = keras.distribution.DeviceMesh(
            (1, devices),
            ["batch", "model"],
            keras.distribution.list_devices()[:devices],
        )
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=moe_keras.get_layout_map(mesh),
                batch_dim_name="batch",
            )
        )
    keras.utils.set_random_seed(0)
    layer = moe_keras.MoE(
        ARGS.experts,
        ARGS.features,
        hidden_units=ARGS.hidden,
        activation="silu",
        gated=True,
        top_k=ARGS.top_k,
        capacity_factor=ARGS.capacity_factor,
        routing_statistics=False,
        name="moe",
    )
    model = keras.Sequential([keras.Input((ARGS.features,)), layer])
    x = (
        np.random.default_rng(0)
        .normal(size=(ARGS.tokens, ARGS.features))
        .astype("float32")
    )
    if mesh is not None:
        x = jax.device_put(
            x,
            keras.distribution.TensorLayout(
                ["batch", None], mesh
            ).backend_layout,
        )
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x):
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.mean(y**2)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(trainable, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    collectives = {
        name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo))
        for name in ("all-to-all", "all-gather", "all-reduce")
    }
    jax.block_until_ready(step(trainable, x))
    times = []
    for _ in range(ARGS.steps):
        start = time.perf_counter()
        jax.block_until_ready(step(trainable, x))
        times.append(time.perf_counter() - start)
    return dict(
        flops=analysis["flops"],
        temp=memory.temp_size_in_bytes if memory is not None else float("nan"),
        collectives=collectives,
        ms=1000 * float(np.median(times)),
    )


def main():
    available = len(jax.devices())
    counts = [n for n in (1, 2, 4, 8) if n <= available]
    rows = {n: _step(n) for n in counts}
    base = rows[1]
    print(
        f"T={ARGS.tokens} d={ARGS.features} hidden={ARGS.hidden} "
        f"E={ARGS.experts} k={ARGS.top_k} "
        f"capacity_factor={ARGS.capacity_factor}, SwiGLU experts, "
        f"forward + backward of the layer, mesh (1, n)"
    )
    print(
        "| devices | GFLOP per device | x 1 device | scratch MB per device "
        "| all-to-all / all-gather / all-reduce | step ms |"
    )
    print("|---|---|---|---|---|---|")
    for n, row in rows.items():
        c = row["collectives"]
        print(
            f"| {n} | {row['flops'] / 1e9:.3f} | "
            f"{row['flops'] / base['flops']:.3f} | "
            f"{row['temp'] / 2**20:.1f} | "
            f"{c['all-to-all']} / {c['all-gather']} / {c['all-reduce']} | "
            f"{row['ms']:.1f} |"
        )
    print(
        f"\ncommand: python {' '.join(sys.argv)}\n"
        f"devices: {jax.devices()[0].device_kind} x {available} "
        f"({'real' if ARGS.real else 'virtual'}); jax {jax.__version__}, "
        f"keras {keras.__version__}"
    )


if __name__ == "__main__":
    main()
