"""Kernel-level time of `moe_keras.kernels.grouped_matmul` against a dense
matmul of the same FLOPs (JAX backend).

For each expert projection of a benchmark size (rows = tokens * k, sorted
by expert), times forward alone and forward + both gradients of every
grouped-matmul implementation that runs here, with equal group sizes and
with half the groups empty (the other half twice as full), beside one
dense `[rows, K] @ [K, N]` of the same FLOPs. Checks each result against
`ragged_dot`'s. Prints a markdown table, the command and the versions:

    KERAS_BACKEND=jax python benchmarks/grouped_matmul_benchmark.py \\
        --configs gpu-e8k2,gpu-e64k8 --dtype bfloat16

On a CPU only `ragged_dot` and `reference` run (`--configs tiny`).
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

# name -> (tokens, features, hidden, experts, k), the dispatch benchmark's.
CONFIGS = {
    "tiny": (512, 128, 128, 8, 2),
    "e8k2": (4096, 256, 512, 8, 2),
    "gpu-e8k2": (32768, 2048, 4096, 8, 2),
    "gpu-e64k8": (16384, 1024, 512, 64, 8),
}


def _time_ms(fn, *args, steps):
    import jax

    jax.block_until_ready(fn(*args))  # compile, warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _shapes(config):
    tokens, features, hidden, experts, k = CONFIGS[config]
    rows = tokens * k
    # SwiGLU experts: a fused gate/up projection, then the down projection.
    return [
        ("up", rows, features, 2 * hidden, experts),
        ("down", rows, hidden, features, experts),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--implementations",
        default="mosaic_gpu,megablox,torch,ragged_dot",
        help="those of moe_keras.kernels.IMPLEMENTATIONS to try",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from moe_keras import kernels

    if keras.backend.backend() != "jax":
        parser.error("this benchmark runs the JAX kernels: KERAS_BACKEND=jax")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"versions: python {platform.python_version()}, jax {jax.__version__}"
        f", keras {keras.__version__}; device: {jax.devices()[0].device_kind}"
    )
    dtype = jnp.dtype(args.dtype)
    print(
        "\n| shape (rows x K -> N, groups) | groups | implementation | "
        "forward ms | x dense | fwd + grads ms | x dense | max rel. err |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        for name, rows, k, n, groups in _shapes(config):
            names = [
                impl
                for impl in args.implementations.split(",")
                if _runs(kernels, impl, args.dtype, k, n)
            ]
            key = jax.random.key(0)
            x = jax.random.normal(key, (rows, k), dtype)
            w = jax.random.normal(key, (groups, k, n), dtype) / np.sqrt(k)
            dense_w = w[0]
            dense = jax.jit(lambda a, b: a @ b)
            dense_train = jax.jit(
                jax.grad(
                    lambda a, b: jnp.sum((a @ b).astype("float32")), (0, 1)
                )
            )
            dense_fwd = _time_ms(dense, x, dense_w, steps=args.steps)
            dense_both = _time_ms(dense_train, x, dense_w, steps=args.steps)
            label = f"{config} {name}: {rows} x {k} -> {n}, {groups}"
            print(
                f"| {label} | - | dense matmul | {dense_fwd:.3f} | 1.00 | "
                f"{dense_both:.3f} | 1.00 | - |"
            )
            even = jnp.full((groups,), rows // groups, jnp.int32)
            skewed = jnp.asarray(
                [2 * (rows // groups) * (g % 2 == 0) for g in range(groups)],
                jnp.int32,
            )
            for sizes_name, sizes in (("equal", even), ("half empty", skewed)):
                want = kernels.grouped_matmul(x, w, sizes, "ragged_dot")
                for impl in names:
                    fwd = jax.jit(
                        lambda a, b, s, impl=impl: kernels.grouped_matmul(
                            a, b, s, impl
                        )
                    )
                    train = jax.jit(
                        jax.grad(
                            lambda a, b, s, impl=impl: jnp.sum(
                                kernels.grouped_matmul(a, b, s, impl).astype(
                                    "float32"
                                )
                            ),
                            (0, 1),
                        )
                    )
                    try:
                        got = fwd(x, w, sizes)
                        t_fwd = _time_ms(fwd, x, w, sizes, steps=args.steps)
                        t_both = _time_ms(train, x, w, sizes, steps=args.steps)
                    except Exception as error:  # a kernel that fails here
                        print(f"| {label} | {sizes_name} | {impl} | failed: "
                              f"{type(error).__name__}: {str(error)[:100]} |"
                              " | | | |")  # fmt: skip
                        continue
                    err = float(
                        jnp.max(jnp.abs(got.astype("float32") - want))
                        / jnp.max(jnp.abs(want.astype("float32")))
                    )
                    print(
                        f"| {label} | {sizes_name} | {impl} | {t_fwd:.3f} | "
                        f"{t_fwd / dense_fwd:.2f} | {t_both:.3f} | "
                        f"{t_both / dense_both:.2f} | {err:.1e} |"
                    )


def _runs(kernels, impl, dtype, k, n):
    try:
        kernels.select_implementation(impl, dtype, [(k, n)])
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
