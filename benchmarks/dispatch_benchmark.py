"""Train-step time of sparse MoE against its dense-FFN and keras-hub peers.

Times one compiled training step (forward, backward, optimizer update) of,
side by side in one run:

- `ffn`: a plain SwiGLU feed-forward layer with hidden size `k * hidden`,
  the same active FLOPs per token as the MoE (the bar to reach);
- `sparse cf=1.0`, `sparse cf=1.25`: `MoE(dispatch="sparse")`;
- `dropless`: `MoE(dispatch="sparse", capacity_factor=None)`, whose
  `grouped_matmul="auto"` runs a grouped-matmul kernel on a GPU or TPU
  and the padded block layout elsewhere; `dropless-NAME` (not in the
  default list) forces `grouped_matmul=NAME`, e.g. `dropless-blocks` for
  the block layout on a GPU, side by side with the kernel;
- `dense`: `MoE(dispatch="dense")`, every expert on every token, masked;
- `keras-hub`: keras-hub's `MixtralSparseMoeBlock`, which also computes
  every expert for every token (skipped if keras-hub is not installed);
- `ragged` (JAX only, not in the default list): a dropless MoE written
  directly on `jax.lax.ragged_dot` (tokens sorted by expert, one ragged
  matmul per projection), to measure that op against our dispatch.

Step times come from one process holding every variant, timed in turns
(one step of each, round after round), so a noisy neighbour slows all of
them alike and the ratios hold; the table gives the median and the
fastest step. Memory comes from a separate process per variant, so that
its peak (max RSS, and the growth of RSS from just before the first step)
is its own. Run with `KERAS_BACKEND=tensorflow` (steps compiled with
`jit_compile=True`), `KERAS_BACKEND=jax`, or `KERAS_BACKEND=torch`
(eager, Keras' default on torch):

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
    "e64k8": dict(tokens=4096, features=256, hidden=64, experts=64, top_k=8),
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
    elif variant == "ragged":
        outputs = _RaggedMoE(e, k, h, d)(inputs)
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
        grouped_matmul = "auto"
        if variant.startswith("dropless-"):
            variant, grouped_matmul = variant.split("-", 1)
        dispatch, capacity_factor = {
            "sparse-1.0": ("sparse", 1.0),
            "sparse-1.25": ("sparse", 1.25),
            "dropless": ("sparse", None),
            "dense": ("dense", 1.0),
        }[variant]
        outputs = MoE(
            grouped_matmul=grouped_matmul,
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


def _ragged_moe_class():
    import jax
    import keras

    class RaggedMoE(keras.layers.Layer):
        """Top-k SwiGLU experts on `jax.lax.ragged_dot` (JAX backend)."""

        def __init__(self, experts, top_k, hidden, units, **kwargs):
            super().__init__(**kwargs)
            self.e, self.k, self.h, self.u = experts, top_k, hidden, units

        def build(self, shape):
            d = shape[-1]
            self.router = self.add_weight(shape=(d, self.e))
            self.w_in = self.add_weight(shape=(self.e, d, 2 * self.h))
            self.w_out = self.add_weight(shape=(self.e, self.h, self.u))

        def call(self, x):
            jnp = jax.numpy
            tokens = jnp.reshape(x, (-1, x.shape[-1]))
            probs = jax.nn.softmax(tokens @ self.router.value, axis=-1)
            weights, experts = jax.lax.top_k(probs, self.k)
            weights = weights / jnp.sum(weights, -1, keepdims=True)
            order = jnp.argsort(jnp.reshape(experts, (-1,)), stable=True)
            token_of = order // self.k
            sizes = jnp.bincount(jnp.reshape(experts, (-1,)), length=self.e)
            h = jax.lax.ragged_dot(tokens[token_of], self.w_in.value, sizes)
            gate, up = jnp.split(h, 2, axis=-1)
            out = jax.lax.ragged_dot(
                jax.nn.silu(gate) * up, self.w_out.value, sizes
            )
            out = out * jnp.reshape(weights, (-1,))[order][:, None]
            y = jnp.zeros((tokens.shape[0], self.u), out.dtype)
            y = y.at[token_of].add(out)
            return jnp.reshape(y, x.shape[:-1] + (self.u,))

    return RaggedMoE


def _RaggedMoE(*args):
    return _ragged_moe_class()(*args)


def _compiled(variant, cfg):
    import keras

    model = _build(variant, cfg)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss="mse",
        # XLA on TensorFlow and JAX; torch runs eagerly, Keras' default
        # there (torch.compile recompiles the routing step over and over).
        jit_compile=keras.backend.backend() != "torch",
    )
    return model


def _data(cfg):
    import keras
    import numpy as np

    rng = np.random.RandomState(0)
    shape = (1, cfg["tokens"], cfg["features"])
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=shape).astype("float32")
    # Already on the device, as a data pipeline would hand them over: no
    # variant pays a host-to-device copy inside its step.
    if keras.backend.backend() == "jax":
        import jax

        x, y = jax.device_put(x), jax.device_put(y)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        x, y = tf.constant(x), tf.constant(y)
    return x, y


def _peak_rss_mb():
    """Peak resident memory of this process in MB.

    Read from /proc where there is one: `ru_maxrss` would count the
    parent's memory too, which a forked child starts from.
    """
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmHWM"].split()[0]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_worker(variant, cfg):
    """Peak memory of a few steps of one variant, alone in its process."""
    model = _compiled(variant, cfg)
    x, y = _data(cfg)
    peak_before = _peak_rss_mb()
    for _ in range(3):
        model.train_on_batch(x, y)
    peak = _peak_rss_mb()
    return {
        "peak_rss_mb": peak,
        "step_rss_mb": peak - peak_before,
        "xla_temp_mb": _xla_temp_mb(model, x, y),
    }


def _step(model, x, y):
    """One training step, as `fit` runs it; returns once it has finished.

    On TensorFlow, `train_on_batch` would also reset every metric after
    each step, one eager assignment per metric variable, which `fit` does
    once an epoch: that would charge a layer with metrics several
    milliseconds a step for nothing `fit` does. So the step runs through
    the train function `fit` calls.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        model.make_train_function()
        logs = model.train_function(iter([(x, y)]))
        return float(logs["loss"])
    return model.train_on_batch(x, y)


def _time_variants(variants, cfg, steps, train_on_batch=False):
    """Median and fastest step of each variant, timed in turns; with
    `train_on_batch`, also the median `train_on_batch` call (which resets
    the model's metrics after the step), timed in the same rounds."""
    import numpy as np

    x, y = _data(cfg)
    models, times = {}, {}
    for variant in variants:
        try:
            models[variant] = _compiled(variant, cfg)
            for _ in range(3):  # compile and warm up
                _step(models[variant], x, y)
        except Exception as error:  # e.g. keras-hub missing
            times[variant] = {"error": f"{type(error).__name__}: {error}"}
            models.pop(variant, None)
    samples = {variant: [] for variant in models}
    tob = {variant: [] for variant in models}
    for _ in range(steps):
        for variant, model in models.items():
            start = time.perf_counter()
            _step(model, x, y)
            samples[variant].append(time.perf_counter() - start)
            if train_on_batch:
                start = time.perf_counter()
                model.train_on_batch(x, y)
                tob[variant].append(time.perf_counter() - start)
    for variant, values in samples.items():
        times[variant] = {
            "step_ms": 1000 * float(np.median(values)),
            "min_ms": 1000 * float(np.min(values)),
        }
        if train_on_batch:
            times[variant]["tob_ms"] = 1000 * float(np.median(tob[variant]))
    return times


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


def _memory(variant, config_name, policy):
    cmd = [
        sys.executable,
        __file__,
        "--memory-worker",
        variant,
        "--configs",
        config_name,
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
    module = {"tensorflow": "tensorflow"}.get(backend, backend)
    versions[module] = __import__(module).__version__
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
    parser.add_argument(
        "--train-on-batch",
        action="store_true",
        help="also time train_on_batch, in the same rounds",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the memory processes (one compile per variant each)",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config_names = args.configs.split(",")
    for name in config_names:
        if name not in CONFIGS:
            parser.error(
                f"unknown config {name!r}; choose from {sorted(CONFIGS)}"
            )

    if args.dtype_policy:
        import keras

        keras.config.set_dtype_policy(args.dtype_policy)
    if args.memory_worker:
        result = _memory_worker(args.memory_worker, CONFIGS[config_names[0]])
        print("RESULT " + json.dumps(result))
        return

    backend, versions = _versions()
    print(f"command: KERAS_BACKEND={backend} python {' '.join(sys.argv)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    # Settings that change step times without showing in the command.
    for name in ("TF_CPU_ALLOCATOR_USE_BFC", "XLA_FLAGS"):
        if os.environ.get(name):
            print(f"environment: {name}={os.environ[name]}")
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
        variants = args.variants.split(",")
        memory = {
            v: (
                {"error": "not measured"}
                if args.no_memory
                else _memory(v, name, args.dtype_policy)
            )
            for v in variants
        }
        results = _time_variants(variants, cfg, args.steps, args.train_on_batch)
        base = results.get("ffn", {}).get("step_ms")
        hub = results.get("keras-hub", {}).get("step_ms")
        tob_base = results.get("ffn", {}).get("tob_ms")
        tob_head = " train_on_batch ms | tob x FFN | tob - FFN ms |"
        print(
            "| variant | step ms (median) | fastest ms | x FFN | "
            "keras-hub / this | useful TFLOP/s | peak RSS MB | "
            "RSS growth in steps MB | XLA temp MB |"
            + (tob_head if args.train_on_batch else "")
        )
        columns = 9 + (3 if args.train_on_batch else 0)
        print("|" + "---|" * columns)
        for variant in variants:
            r, m = results[variant], memory[variant]
            if "error" in r:
                print(
                    f"| {variant} | failed: {r['error'][:80]} |"
                    + " |" * (columns - 2)
                )
                continue
            ms = r["step_ms"]
            ratio = f"{ms / base:.2f}" if base else "-"
            speedup = f"{hub / ms:.1f}" if hub else "-"
            if "error" in m:
                mem = "- | - | - |"
            else:
                temp = m["xla_temp_mb"]
                mem = f"{m['peak_rss_mb']:.0f} | {m['step_rss_mb']:.0f} | " + (
                    f"{temp:.0f} |" if temp is not None else "- |"
                )
            tob = ""
            if args.train_on_batch:
                t = r["tob_ms"]
                tob = (
                    f" {t:.1f} | {t / tob_base:.2f} | {t - tob_base:+.1f} |"
                    if tob_base
                    else f" {t:.1f} | - | - |"
                )
            print(
                f"| {variant} | {ms:.1f} | {r['min_ms']:.1f} | {ratio} | "
                f"{speedup} | {flops / ms / 1e9:.3f} | " + mem + tob
            )


if __name__ == "__main__":
    main()
