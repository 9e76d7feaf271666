"""Train Mixture-of-Experts models on a synthetic multi-task problem.

The data is made of several clusters (sub-tasks). Each cluster sits at its
own centre in input space and has its own rule mapping a point to one of a
few classes, so an expert per cluster is a natural fit: the router can
learn which cluster a point comes from and send it to an expert that has
specialised in that cluster's rule.

The script trains a Sequential and a Functional model built around an
`MoE` layer, and for each a dense baseline (an MLP with about the same
number of *active* parameters per token), then

- prints a side-by-side table: validation accuracy and loss, parameters in
  total and active per token, and mean training step time;
- saves each MoE model as a `.keras` file, reloads it with
  `keras.saving.load_model` and checks the predictions are identical;
- on the TensorFlow and JAX backends, exports a SavedModel with
  `model.export`, reloads it with `tf.saved_model.load(...).serve` and
  checks the numbers;
- logs each MoE layer's routing every epoch (`moe_keras.RoutingMetrics`:
  dead experts, load spread, router gradient norm and more), says after
  training whether any expert went unused and what to do about it;
- writes a bar chart of expert load (each expert's share of the
  validation tokens' top-k assignments) to `<output-dir>/expert_load.png`.

Usage:

    python examples/train.py
    python examples/train.py --model functional --experts 8 --top-k 2
    KERAS_BACKEND=jax python examples/train.py --jit-compile

Exit status: 0 on success, 1 if a reload check fails, 2 for bad flags.
"""

import argparse
import logging
import math
import os
import sys
import time

NUM_FEATURES = 16
NUM_CLUSTERS = 8
NUM_CLASSES = 4
# Width of the MoE block (and of each expert's hidden layer).
UNITS = 32
POLICIES = ("none", "mixed_float16", "mixed_bfloat16")
# Ten times the layer's default: at 0.01 the Sequential model's router
# gives one of its eight experts 0.4% of the assignments (an even share
# is 12.5%); at 0.1 every expert gets at least half an even share, at the
# same accuracy.
LOAD_BALANCE_WEIGHT = 0.1


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are a single line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be >= {minimum}, got {value}"
            )
        return value

    return parse


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, got {text!r}"
        ) from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0, got {text}"
        )
    return value


def _top_k(text):
    """`none` or `0` mean the dense mixture (`top_k=None`)."""
    if text.strip().lower() in ("none", "0"):
        return None
    return _int_at_least(1)(text)


def build_parser():
    parser = _OneLineErrorParser(
        prog=os.path.basename(sys.argv[0]) or "train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=("sequential", "functional", "both"),
        default="both",
        help="which model architecture(s) to train",
    )
    parser.add_argument(
        "--experts", type=_int_at_least(1), default=8, help="number of experts"
    )
    parser.add_argument(
        "--top-k",
        type=_top_k,
        default=2,
        help="experts per token, 1..experts; 0 or 'none' for the dense "
        "mixture of all experts",
    )
    parser.add_argument(
        "--gate",
        choices=("softmax", "sigmoid"),
        default="softmax",
        help="router of the MoE layers",
    )
    parser.add_argument(
        "--dispatch",
        choices=("auto", "dense", "sparse"),
        default="auto",
        help="how tokens reach the experts (auto: sparse for top-k)",
    )
    parser.add_argument(
        "--load-balance-weight",
        type=_non_negative_float,
        default=LOAD_BALANCE_WEIGHT,
        help="weight of the MoE layers' load-balance loss (raise it if "
        "experts go unused)",
    )
    parser.add_argument(
        "--epochs", type=_int_at_least(1), default=10, help="training epochs"
    )
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=64, help="batch size"
    )
    parser.add_argument(
        "--samples",
        type=_int_at_least(20),
        default=12000,
        help="generated examples (80%% train, 20%% validation)",
    )
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile the train step with XLA",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=POLICIES,
        default="none",
        help="Keras dtype policy",
    )
    parser.add_argument(
        "--output-dir",
        default="outputs",
        help="where the .keras files, SavedModels and chart go",
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="random seed"
    )
    return parser


def parse_args(argv=None):
    """Parses and cross-checks the flags; exits with status 2 on a bad one,
    before any model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k > args.experts:
        parser.error(
            f"argument --top-k: must be in [1, --experts={args.experts}] "
            f"(or 0/none), got {args.top_k}"
        )
    if args.dispatch == "sparse" and args.top_k is None:
        parser.error(
            "argument --dispatch: 'sparse' needs --top-k (the dense mixture "
            "of all experts has no sparse form)"
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(
            f"argument --output-dir: {args.output_dir!r} exists and is not "
            "a directory"
        )
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --output-dir: cannot create it ({error})")
    return args


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def make_data(
    samples,
    seed=0,
    features=NUM_FEATURES,
    clusters=NUM_CLUSTERS,
    classes=NUM_CLASSES,
):
    """A multi-task classification set: `(x, y, cluster)`.

    Every point belongs to one of `clusters` well separated blobs (the
    sub-tasks). Inside a blob, the class is given by a blob-specific random
    "teacher" network (one tanh layer of 32 units) applied to the offset
    from the blob's centre, so each sub-task has its own non-linear rule.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, size=(clusters, features))
    w_hidden = rng.normal(size=(clusters, features, 32)) / np.sqrt(features)
    w_out = rng.normal(size=(clusters, 32, classes))
    cluster = rng.integers(clusters, size=samples)
    offset = rng.normal(size=(samples, features))
    hidden = np.tanh(2.0 * np.einsum("nf,nfh->nh", offset, w_hidden[cluster]))
    scores = np.einsum("nh,nhc->nc", hidden, w_out[cluster])
    y = np.argmax(scores, axis=-1).astype("int32")
    x = (centres[cluster] + offset).astype("float32")
    return x, y, cluster.astype("int32")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _moe_block_sizes(args, features_in):
    """(all parameters, parameters active per token) of one MoE block."""
    per_expert = features_in * UNITS + UNITS + UNITS * UNITS + UNITS
    gate = features_in * args.experts
    active_experts = args.experts if args.top_k is None else args.top_k
    return gate + args.experts * per_expert, gate + active_experts * per_expert


def _matching_hidden_width(args, features_in):
    """Hidden width of a `Dense(h) -> Dense(UNITS)` MLP with about the
    active parameters per token of the MoE block it replaces."""
    _, active = _moe_block_sizes(args, features_in)
    return max(1, round((active - UNITS) / (features_in + 1 + UNITS)))


def _block(args, use_moe, features_in, name):
    import keras

    from moe_keras import MoE

    if use_moe:
        return MoE(
            num_experts=args.experts,
            units=UNITS,
            hidden_units=UNITS,
            activation="relu",
            gate=args.gate,
            top_k=args.top_k,
            dispatch=args.dispatch,
            load_balance_weight=args.load_balance_weight,
            # Capacity applies while training; at inference give each
            # expert room for every token (C = tokens), so that no token is
            # dropped and a prediction does not depend on the other rows
            # of its batch.
            eval_capacity_factor=(
                None if args.top_k is None else args.experts / args.top_k
            ),
            name=name,
        )
    hidden = _matching_hidden_width(args, features_in)
    return keras.Sequential(
        [
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(UNITS),
        ],
        name=name,
    )


def build_sequential(args, use_moe=True):
    """`Input -> MoE (or MLP) -> Dense(classes)`, with `model.add`."""
    import keras

    model = keras.Sequential(name=f"{'moe' if use_moe else 'dense'}_sequential")
    model.add(keras.Input((NUM_FEATURES,)))
    model.add(_block(args, use_moe, NUM_FEATURES, "moe" if use_moe else "mlp"))
    model.add(keras.layers.Activation("relu"))
    model.add(
        keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32")
    )
    return model


def build_functional(args, use_moe=True):
    """A stem, then a pre-norm residual MoE (or MLP) block, then the head."""
    import keras

    inputs = keras.Input((NUM_FEATURES,), name="features")
    h = keras.layers.Dense(UNITS, activation="relu", name="stem")(inputs)
    block = _block(args, use_moe, UNITS, "moe" if use_moe else "mlp")
    normed = keras.layers.LayerNormalization(name="pre_norm")(h)
    h = keras.layers.Add(name="residual")([h, block(normed)])
    h = keras.layers.Activation("relu")(h)
    outputs = keras.layers.Dense(
        NUM_CLASSES, activation="softmax", dtype="float32", name="head"
    )(h)
    return keras.Model(
        inputs, outputs, name=f"{'moe' if use_moe else 'dense'}_functional"
    )


def moe_layers(model):
    from moe_keras import MoE

    return [layer for layer in model.layers if isinstance(layer, MoE)]


def count_params(model):
    """(total parameters, parameters active per token).

    A token goes through the router and its top-k experts only (all experts
    for the dense mixture), so the other experts' weights are not active.
    Parameters are the trainable weights: an MoE layer's routing
    statistics are non-trainable state, like a BatchNormalization's.
    """
    total = sum(math.prod(w.shape) for w in model.trainable_weights)
    active = total
    for layer in moe_layers(model):
        per_expert = layer.experts.count_params() // layer.num_experts
        used = layer.num_experts if layer.top_k is None else layer.top_k
        active -= (layer.num_experts - used) * per_expert
    return total, active


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time between consecutive training steps, leaving out the
        first two steps (tracing and compilation)."""

        def __init__(self):
            super().__init__()
            self.durations = []
            self._last = None
            self._seen = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._last = None

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if self._last is not None and self._seen >= 2:
                self.durations.append(now - self._last)
            self._last = now
            self._seen += 1

        def mean_ms(self):
            if not self.durations:
                return float("nan")
            return 1000.0 * sum(self.durations) / len(self.durations)

    return StepTimer()


def train(model, args, data):
    import keras

    import moe_keras

    x_train, y_train, x_val, y_val = data
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True if args.jit_compile else "auto",
    )
    timer = _step_timer()
    callbacks = [timer]
    if moe_layers(model):
        # Routing statistics in the epoch logs, and the gradient that
        # reaches each router, measured on one batch per epoch.
        batch = (x_train[: args.batch_size], y_train[: args.batch_size])
        callbacks.append(moe_keras.RoutingMetrics(gradient_data=batch))
    print(f"\n== {model.name} ==", flush=True)
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=callbacks,
        verbose=2,
    )
    for layer in moe_layers(model):
        report_routing(model, layer, history.history)
    result = model.evaluate(
        x_val, y_val, batch_size=args.batch_size, return_dict=True, verbose=0
    )
    total, active = count_params(model)
    return {
        "accuracy": float(result["accuracy"]),
        "loss": float(result["loss"]),
        "params": total,
        "active": active,
        "step_ms": timer.mean_ms(),
    }


def report_routing(model, layer, logs):
    """Prints the last epoch's routing of `layer` (from `RoutingMetrics`),
    and what to do if some experts went unused or nearly so."""
    name, experts = layer.name, layer.num_experts

    def last(key):
        return logs[f"{name}_{key}"][-1]

    dead = round(last("dead_experts") * experts)
    smallest, uniform = last("min_expert_load"), 1.0 / experts
    line = (
        f"[{model.name}] routing, last epoch: {dead} of {experts} experts "
        f"dead (no assignment); load CV {last('load_cv'):.3f}; expert "
        f"load min {smallest:.3f} max {last('max_expert_load'):.3f} "
        f"(uniform {uniform:.3f})"
    )
    if f"{name}_router_grad_norm" in logs:
        line += f"; router gradient norm {last('router_grad_norm'):.3g}"
    print(line)
    if dead or smallest < 0.25 * uniform:
        print(
            f"[{model.name}] some experts get (almost) no tokens: their "
            "weights stop training. Raise --load-balance-weight (now "
            f"{layer.load_balance_weight}), or train longer; in your own "
            "models also try router jitter (SoftmaxGate(jitter=0.01)), "
            "the auxiliary-loss-free bias (bias_update_rate=1e-3) or "
            "fewer experts. A router gradient norm of 0 means no loss "
            "reaches the router at all."
        )


def print_table(rows):
    header = (
        f"{'model':<12}{'variant':<9}{'val acc':>9}{'val loss':>10}"
        f"{'params':>10}{'active/tok':>12}{'step ms':>9}"
    )
    print("\n" + header)
    print("-" * len(header))
    for kind, variant, r in rows:
        print(
            f"{kind:<12}{variant:<9}{r['accuracy']:>9.4f}{r['loss']:>10.4f}"
            f"{r['params']:>10,}{r['active']:>12,}{r['step_ms']:>9.2f}"
        )
    print(
        "(active/tok: router + top-k experts; step ms: mean wall time of a "
        "training step after compilation)"
    )


# --------------------------------------------------------------------------
# Saving, export and routing
# --------------------------------------------------------------------------


def check_keras_file(model, x, path):
    import keras
    import numpy as np

    model.save(path)
    reloaded = keras.saving.load_model(path)
    expected = model.predict(x, verbose=0)
    got = reloaded.predict(x, verbose=0)
    same = np.array_equal(expected, got)
    print(
        f"[{model.name}] saved {path}; reloaded predictions identical: {same}"
        + (
            ""
            if same
            else f" (max |diff| {np.max(np.abs(expected - got)):.3g})"
        )
    )
    return same


def check_saved_model(model, x, path):
    import keras
    import numpy as np

    if keras.backend.backend() not in ("tensorflow", "jax"):
        print(
            f"[{model.name}] SavedModel export skipped on the "
            f"{keras.backend.backend()} backend: Keras writes a TensorFlow "
            "SavedModel from the TensorFlow and JAX backends."
        )
        return True
    import shutil

    import tensorflow as tf

    shutil.rmtree(path, ignore_errors=True)
    model.export(path, verbose=False)
    # Keep the loaded object alive while its function runs: it owns the
    # variables the function reads. A model exported from JAX carries
    # custom gradients that the SavedModel does not keep; loading warns
    # about them, but serving never asks for a gradient.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        reloaded = tf.saved_model.load(path)
    finally:
        absl_logger.setLevel(level)
    served = reloaded.serve(x).numpy()
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    mixed = keras.config.dtype_policy().name != "float32"
    tolerance = dict(rtol=2e-2, atol=2e-2) if mixed else dict(atol=1e-5)
    ok = bool(np.allclose(served, expected, **tolerance))
    print(
        f"[{model.name}] exported SavedModel {path}; serve() matches "
        f"predict(): {ok} (max |diff| {np.max(np.abs(served - expected)):.3g})"
    )
    return ok


def expert_load(model, x):
    """Per MoE layer: each expert's share of the top-k assignments of the
    tokens `x` (of the gate weight, for the dense mixture), and each
    token's top choice, from the layer's router on its own inputs."""
    import keras
    import numpy as np

    import moe_keras

    loads = {}
    for layer in moe_layers(model):
        # One direct call: `predict` on a throwaway model would trace a new
        # step function for each (and TensorFlow warns about retracing).
        features = keras.Model(model.inputs[0], layer.input)(x, training=False)
        routing = layer.gate(features, routing=True, top_k=layer.top_k)
        probs = keras.ops.convert_to_numpy(routing["probs"])
        if "indices" in routing:
            share = moe_keras.losses.assignment_fraction(
                routing["indices"], layer.num_experts
            )
        else:
            share = keras.ops.mean(routing["probs"], axis=0)
        top = np.argmax(probs.reshape(-1, layer.num_experts), axis=-1)
        loads[layer.name] = (keras.ops.convert_to_numpy(share), top)
    return loads


def plot_expert_load(loads_by_model, num_experts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.2 * num_experts + 3, 3.5))
    width = 0.8 / max(len(loads_by_model), 1)
    positions = np.arange(num_experts)
    for i, (name, load) in enumerate(loads_by_model.items()):
        ax.bar(
            positions + (i - (len(loads_by_model) - 1) / 2) * width,
            load,
            width,
            label=name,
        )
    ax.axhline(1.0 / num_experts, color="gray", ls="--", lw=1, label="uniform")
    ax.set_xticks(positions, [f"expert {e}" for e in positions])
    ax.set_ylabel("share of assignments")
    ax.set_title("Expert load on the validation data")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------


def quiet_tensorflow_logs():
    """Keeps TensorFlow's C++ log to what needs attention; call it before
    TensorFlow is imported (a `TF_CPP_MIN_LOG_LEVEL` already set wins).

    On a machine without an NVIDIA GPU, TensorFlow's CUDA probe logs
    `failed call to cuInit` as an error although nothing failed (training
    runs on the CPU as intended), and oneDNN logs an error-level note
    about int32 kernels; there only fatal messages are shown. Hiding the
    GPU (`CUDA_VISIBLE_DEVICES=""`) does not stop the probe.
    """
    has_gpu = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_gpu else "3")


def configure_tensorflow():
    """Turns off grappler's remapper on the TensorFlow backend.

    In TensorFlow 2.21 on CPU the remapper fuses the dense baseline's
    `Add` + `ReLU` into a node that its own MLIR pass cannot import
    (`tfg_optimizer_hook ... has an empty op name`): it logs six errors
    and gives up optimising the whole step function. Without the remapper
    the rest of grappler runs, and the steps measured no slower.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"remapping": False})
        tf.get_logger().addFilter(_NotManyModelsRetracing())


class _NotManyModelsRetracing(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls ... triggered
    tf.function retracing" warning. TensorFlow counts the traces of every
    function made from the same code together, so the step functions of
    the four models trained here (one trace each, a second for a partial
    last batch) read to it as one function retracing; small runs, with
    few steps between traces, then print it though nothing retraces."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def main(argv=None):
    args = parse_args(argv)
    quiet_tensorflow_logs()
    import keras
    import numpy as np

    configure_tensorflow()

    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision != "none":
        keras.config.set_dtype_policy(args.mixed_precision)
    top_k = "dense mixture" if args.top_k is None else f"top-{args.top_k}"
    print(
        f"backend={keras.backend.backend()} keras={keras.__version__} "
        f"policy={keras.config.dtype_policy().name} experts={args.experts} "
        f"routing={top_k} gate={args.gate} dispatch={args.dispatch}"
    )

    x, y, cluster = make_data(args.samples, seed=args.seed)
    split = int(0.8 * len(x))
    data = (x[:split], y[:split], x[split:], y[split:])
    x_val, cluster_val = x[split:], cluster[split:]
    print(
        f"data: {split} train / {len(x) - split} validation points, "
        f"{NUM_CLUSTERS} clusters x {NUM_CLASSES} classes, "
        f"majority-class rate {np.bincount(y).max() / len(y):.3f}"
    )

    builders = {"sequential": build_sequential, "functional": build_functional}
    kinds = list(builders) if args.model == "both" else [args.model]
    rows, loads, ok = [], {}, True
    for kind in kinds:
        moe_model = builders[kind](args, use_moe=True)
        rows.append((kind, "MoE", train(moe_model, args, data)))
        keras.utils.set_random_seed(args.seed)
        dense_model = builders[kind](args, use_moe=False)
        rows.append((kind, "dense", train(dense_model, args, data)))

        out = args.output_dir
        ok &= check_keras_file(
            moe_model, x_val, os.path.join(out, f"{moe_model.name}.keras")
        )
        ok &= check_saved_model(
            moe_model, x_val, os.path.join(out, f"{moe_model.name}_savedmodel")
        )
        for layer_name, (load, top) in expert_load(moe_model, x_val).items():
            loads[f"{kind}/{layer_name}"] = load
            # How consistently each cluster goes to a single expert.
            purity = [
                np.bincount(top[cluster_val == c], minlength=args.experts).max()
                / max(np.sum(cluster_val == c), 1)
                for c in range(NUM_CLUSTERS)
            ]
            print(
                f"[{moe_model.name}] expert load (share of assignments) "
                f"{np.array2string(load, precision=3)}; share of each "
                f"cluster sent to its most used expert "
                f"{np.array2string(np.array(purity), precision=2)}"
            )

    print_table(rows)
    chart = os.path.join(args.output_dir, "expert_load.png")
    plot_expert_load(loads, args.experts, chart)
    print(f"\nexpert load chart: {chart}")
    if not ok:
        print("FAILED: a reload check did not match", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
