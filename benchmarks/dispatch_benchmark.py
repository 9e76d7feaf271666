"""Train-step time of sparse MoE against its dense-FFN and keras-hub peers.

Times one compiled training step (forward, backward, optimizer update) of,
side by side in one run:

- `ffn`: a plain SwiGLU feed-forward layer with hidden size `k * hidden`,
  the same active FLOPs per token as the MoE (the bar to reach);
- `sparse cf=1.0`, `sparse cf=1.25`: `MoE(dispatch="sparse")`;
- `dropless`: `MoE(dispatch="sparse", capacity_factor=None)`;
- `dense`: `MoE(dispatch="dense")`, every expert on every token, masked;
- `keras-hub`: keras-hub's `MixtralSparseMoeBlock`, which also computes
  every expert for every token (skipped if keras-hub is not installed).

Each variant runs in its own process so that its peak memory (max RSS, and
the growth of RSS from just before the first step) is its own. Run with
`KERAS_BACKEND=tensorflow` (steps compiled with `jit_compile=True`) or
`KERAS_BACKEND=jax`:

    KERAS_BACKEND=tensorflow python benchmarks/dispatch_benchmark.py
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = {
    "e8k2": dict(tokens=4096, features=256, hidden=512, experts=8, top_k=2),
    "e32k4": dict(tokens=4096, features=256, hidden=128, experts=32, top_k=4),
    "gpu-e8k2": dict(
        tokens=32768, features=2048, hidden=4096, experts=8, top_k=2
    ),
    "gpu-e64k8": dict(
        tokens=16384, features=1024, hidden=512, experts=64, top_k=8
    ),
}
VARIANTS = [
    "ffn",
    "sparse-1.0",
    "sparse-1.25",
    "dropless",
    "dense",
    "keras-hub",
]


def _build(variant, cfg):
    import keras

    from moe_keras import MoE

    d, h, e, k = cfg["features"], cfg["hidden"], cfg["experts"], cfg["top_k"]
    inputs = keras.Input((cfg["tokens"], d), batch_size=1)
    if variant == "ffn":

        class SwiGLU(keras.layers.Layer):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.gate = keras.layers.Dense(k * h, use_bias=False)
                self.up = keras.layers.Dense(k * h, use_bias=False)
                self.down = keras.layers.Dense(d, use_bias=False)

            def call(self, x):
                gated = keras.activations.silu(self.gate(x)) * self.up(x)
                return self.down(gated)

        outputs = SwiGLU()(inputs)
    elif variant == "keras-hub":
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )

        block = MixtralSparseMoeBlock(
            hidden_dim=d, intermediate_dim=h, num_experts=e, top_k=k
        )

        class FirstOutput(keras.layers.Layer):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.block = block

            def call(self, x, training=None):
                return self.block(x, training=training)[0]

        outputs = FirstOutput()(inputs)
    else:
        dispatch, capacity_factor = {
            "sparse-1.0": ("sparse", 1.0),
            "sparse-1.25": ("sparse", 1.25),
            "dropless": ("sparse", None),
            "dense": ("dense", 1.0),
        }[variant]
        outputs = MoE(
            num_experts=e,
            units=d,
            hidden_units=h,
            gated=True,
            activation="silu",
            use_bias=False,
            top_k=k,
            dispatch=dispatch,
            capacity_factor=capacity_factor,
        )(inputs)
    return keras.Model(inputs, outputs)


def _worker(variant, cfg, steps, policy):
    import keras
    import numpy as np

    if policy:
        keras.config.set_dtype_policy(policy)
    model = _build(variant, cfg)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss="mse",
        jit_compile=True,
    )
    rng = np.random.RandomState(0)
    shape = (1, cfg["tokens"], cfg["features"])
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    if keras.backend.backend() == "jax":
        import jax

        x, y = jax.device_put(x), jax.device_put(y)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns a host value: the step is done
        times.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step_ms": 1000 * float(np.median(times)),
        "peak_rss_mb": rss_peak / 1024,
        "step_rss_mb": (rss_peak - rss_before) / 1024,
        "xla_temp_mb": _xla_temp_mb(model, x, y),
    }


def _xla_temp_mb(model, x, y):
    """Scratch memory XLA plans for forward + backward (JAX only): the
    peak of intermediate buffers, which RSS cannot show on JAX since its
    CPU client allocates ahead."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    def loss(trainable, non_trainable, x, y):
        out, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return keras.ops.mean(keras.ops.square(out - y))

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    compiled = jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x, y)
    analysis = compiled.compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20


def _run_variant(variant, config_name, steps, policy):
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--configs",
        config_name,
        "--steps",
        str(steps),
    ]
    if policy:
        cmd += ["--dtype-policy", policy]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"error": tail[0] if tail else f"exit {proc.returncode}"}


def _versions():
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__}
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    else:
        import jax

        versions["jax"] = jax.__version__
    try:
        import keras_hub

        versions["keras_hub"] = keras_hub.__version__
    except ImportError:
        pass
    return backend, versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default="e8k2,e32k4",
        help=f"comma-separated, from {sorted(CONFIGS)}",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype-policy", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config_names = args.configs.split(",")
    for name in config_names:
        if name not in CONFIGS:
            parser.error(
                f"unknown config {name!r}; choose from {sorted(CONFIGS)}"
            )

    if args.worker:
        result = _worker(
            args.worker, CONFIGS[config_names[0]], args.steps, args.dtype_policy
        )
        print("RESULT " + json.dumps(result))
        return

    backend, versions = _versions()
    print(f"command: KERAS_BACKEND={backend} python {' '.join(sys.argv)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    for name in config_names:
        cfg = CONFIGS[name]
        # Useful FLOPs of a train step: 3x the forward's 6*T*d*k*h.
        flops = (
            3
            * 6
            * cfg["tokens"]
            * cfg["features"]
            * cfg["top_k"]
            * cfg["hidden"]
        )
        print(
            f"\n## {name}: tokens={cfg['tokens']} features={cfg['features']} "
            f"hidden={cfg['hidden']} E={cfg['experts']} k={cfg['top_k']}"
            + (f" policy={args.dtype_policy}" if args.dtype_policy else "")
        )
        results = {}
        for variant in args.variants.split(","):
            results[variant] = _run_variant(
                variant, name, args.steps, args.dtype_policy
            )
        base = results.get("ffn", {}).get("step_ms")
        hub = results.get("keras-hub", {}).get("step_ms")
        print(
            "| variant | step ms | x FFN | keras-hub / this | useful TFLOP/s "
            "| peak RSS MB | RSS growth in steps MB | XLA temp MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for variant, r in results.items():
            if "error" in r:
                print(f"| {variant} | failed: {r['error'][:80]} | | | | | | |")
                continue
            ms = r["step_ms"]
            ratio = f"{ms / base:.2f}" if base else "-"
            speedup = f"{hub / ms:.1f}" if hub else "-"
            print(
                f"| {variant} | {ms:.1f} | {ratio} | {speedup} | "
                f"{flops / ms / 1e9:.3f} | {r['peak_rss_mb']:.0f} | "
                f"{r['step_rss_mb']:.0f} | "
                + (f"{r['xla_temp_mb']:.0f} |" if r["xla_temp_mb"] else "- |")
            )


if __name__ == "__main__":
    main()
