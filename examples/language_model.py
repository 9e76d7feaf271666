"""Does an MoE earn its keep? A character-level language model, dense FFN
against MoE FFN at equal active parameters per token.

The corpus is the English text that ships with Python itself, the help
topics of `pydoc_data.topics` (about 465,000 characters, joined in sorted
key order), so the experiment needs no download. The first 90% is training
text and the last 10% validation text, contiguous, so no validation window
overlaps a training one. Tokens are characters; the vocabulary is the set
of characters in the corpus.

Two decoder-only transformers are trained with the same seed, data order,
optimizer, batch size and number of steps. They differ only in their
feed-forward blocks:

- dense: `Dense(top_k * hidden) -> gelu -> Dense(d_model)`;
- MoE: `moe_keras.MoE` with `experts` experts of `Dense(hidden) -> gelu ->
  Dense(d_model)`, top-k routing and the default auxiliary losses,

so a token goes through the same number of FFN weights in both (plus the
MoE's router). The Switch Transformer result is that the MoE reaches a
lower loss in fewer steps at equal active compute; the script measures
whether that holds at this scale, and what the MoE costs in step time.

It prints a table, and writes `lm_experiment.json` (the curves) and
`lm_experiment.png` (validation loss against steps and against training
time) to `--output-dir`. Losses are the language-model cross-entropy in
nats per character, without the MoE's auxiliary losses.

    python examples/language_model.py --jit-compile
    python examples/language_model.py --steps 400 --eval-every 100 --layers 1
    KERAS_BACKEND=jax python examples/language_model.py --output-dir /tmp/lm

The README's figure is `docs/lm_experiment.png`, from
`KERAS_BACKEND=tensorflow python examples/language_model.py --jit-compile
--output-dir docs` (about 20 minutes on a 2-core CPU).

Exit status: 0 on success, 2 for bad flags.
"""

import argparse
import json
import math
import os
import sys
import time

OUTPUT_NAME = "lm_experiment"
TRAIN_FRACTION = 0.9
# Validation only runs forward passes, so it can take bigger batches.
EVAL_BATCH_SIZE = 128
MAX_SEQ_LEN = 4096
VARIANTS = ("dense", "moe")


# --------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are a single line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number_at_least(minimum, kind=int):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, "
                f"got {text!r}"
            ) from None
        # `not >=` also rejects NaN.
        if not value >= minimum:
            raise argparse.ArgumentTypeError(
                f"must be >= {minimum}, got {value}"
            )
        return value

    return parse


def _positive_float(text):
    value = _number_at_least(0.0, float)(text)
    if value == 0.0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"must be positive and finite, got {value}"
        )
    return value


def _capacity_factor(text):
    """A number > 0, or `none` for dropless dispatch."""
    if text.lower() == "none":
        return None
    return _positive_float(text)


def build_parser():
    parser = _OneLineErrorParser(
        prog=os.path.basename(sys.argv[0]) or "language_model.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    count = _number_at_least(1)
    parser.add_argument(
        "--steps", type=count, default=1200, help="training steps per model"
    )
    parser.add_argument(
        "--eval-every",
        type=count,
        default=50,
        help="validation every this many steps; must divide --steps",
    )
    parser.add_argument(
        "--batch-size", type=count, default=32, help="windows per step"
    )
    parser.add_argument(
        "--seq-len",
        type=_number_at_least(2),
        default=128,
        help="characters per window (the context)",
    )
    parser.add_argument(
        "--d-model", type=count, default=128, help="width of the model"
    )
    parser.add_argument(
        "--heads", type=count, default=4, help="attention heads"
    )
    parser.add_argument(
        "--layers", type=count, default=2, help="transformer blocks"
    )
    parser.add_argument(
        "--experts", type=count, default=8, help="experts per MoE layer"
    )
    parser.add_argument(
        "--top-k", type=count, default=2, help="experts per token"
    )
    parser.add_argument(
        "--hidden",
        type=count,
        default=256,
        help="hidden width of one expert; the dense FFN is top-k times wider",
    )
    parser.add_argument(
        "--capacity-factor",
        type=_capacity_factor,
        default=1.25,
        help="the MoE's training capacity factor, or 'none' for dropless "
        "dispatch (validation is dropless either way)",
    )
    parser.add_argument(
        "--overflow",
        choices=("drop", "spill"),
        default="drop",
        help="what the MoE does with an assignment whose expert is full: "
        "drop it, or spill it to the token's next-ranked expert with room",
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=2e-3,
        help="peak AdamW learning rate (linear warmup, cosine decay)",
    )
    parser.add_argument(
        "--timing-rounds",
        type=count,
        default=5,
        help="after training, rounds of 10 steps per model, taken in turns, "
        "for the step times",
    )
    parser.add_argument(
        "--seed",
        type=_number_at_least(0),
        default=0,
        help="seed of the initial weights and of the training windows",
    )
    parser.add_argument(
        "--jit-compile", action="store_true", help="compile steps with XLA"
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "lm"),
        help="where the JSON and PNG go",
    )
    parser.add_argument(
        "--verbose",
        type=_number_at_least(0),
        default=1,
        help="0: only the results; 1: also the training logs",
    )
    return parser


def parse_args(argv=None):
    """Parses and cross-checks the flags; exits with status 2 on a bad one,
    before TensorFlow or JAX is imported (they log to stderr on import)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(
            f"argument --top-k: must be in [1, --experts={args.experts}], "
            f"got {args.top_k}"
        )
    if args.steps % args.eval_every:
        parser.error(
            f"argument --eval-every: must divide --steps={args.steps}, "
            f"got {args.eval_every}"
        )
    if args.seq_len > MAX_SEQ_LEN:
        parser.error(
            f"argument --seq-len: must be <= {MAX_SEQ_LEN} (the validation "
            f"text is about 46,000 characters), got {args.seq_len}"
        )
    if args.d_model % args.heads:
        parser.error(
            f"argument --heads: must divide --d-model={args.d_model}, "
            f"got {args.heads}"
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


def load_corpus():
    """The help-topic texts of this Python, in a fixed order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def encode(text):
    """`(ids, vocabulary)`: int32 character ids and the sorted characters."""
    import numpy as np

    vocabulary = sorted(set(text))
    index = {char: i for i, char in enumerate(vocabulary)}
    return np.array([index[char] for char in text], dtype="int32"), vocabulary


def split(ids):
    cut = int(TRAIN_FRACTION * len(ids))
    return ids[:cut], ids[cut:]


def training_windows(ids, seq_len, count, seed):
    """`count` windows at random offsets: inputs and next-character targets.

    Drawn up front, so both models see exactly the same batches in the
    same order.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len, size=count)
    windows = ids[starts[:, None] + np.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def validation_windows(ids, seq_len):
    """All non-overlapping windows of the validation text, each scored in
    full, so every validation character is predicted once."""
    count = (len(ids) - 1) // seq_len
    inputs = ids[: count * seq_len].reshape(count, seq_len)
    targets = ids[1 : count * seq_len + 1].reshape(count, seq_len)
    return inputs, targets


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def dense_ffn(args, name):
    import keras

    # No biases, here and in the experts: then a token meets exactly the
    # same number of FFN weights in both models.
    return keras.Sequential(
        [
            keras.layers.Dense(
                args.top_k * args.hidden, activation="gelu", use_bias=False
            ),
            keras.layers.Dense(args.d_model, use_bias=False),
        ],
        name=name,
    )


def moe_ffn(args, name):
    from moe_keras import MoE

    return MoE(
        num_experts=args.experts,
        units=args.d_model,
        hidden_units=args.hidden,
        activation="gelu",
        use_bias=False,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        overflow=args.overflow,
        name=name,
    )


def _block(h, args, use_moe, index):
    """Pre-LayerNorm block: causal self-attention, then the FFN, each
    added to the residual stream."""
    import keras

    normed = keras.layers.LayerNormalization(name=f"attn_norm_{index}")(h)
    attended = keras.layers.MultiHeadAttention(
        num_heads=args.heads,
        key_dim=args.d_model // args.heads,
        name=f"attention_{index}",
    )(normed, normed, use_causal_mask=True)
    h = keras.layers.Add(name=f"attn_residual_{index}")([h, attended])
    normed = keras.layers.LayerNormalization(name=f"ffn_norm_{index}")(h)
    ffn = moe_ffn if use_moe else dense_ffn
    transformed = ffn(args, f"{'moe' if use_moe else 'ffn'}_{index}")(normed)
    return keras.layers.Add(name=f"ffn_residual_{index}")([h, transformed])


def build_model(args, vocab_size, use_moe):
    import keras
    from keras import ops

    tokens = keras.Input((args.seq_len,), dtype="int32", name="tokens")
    # Position ids built from the input keep the position table a weight
    # of the graph (a constant arange would be evaluated once, eagerly).
    positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1
    h = keras.layers.Embedding(vocab_size, args.d_model, name="tokens_emb")(
        tokens
    )
    h = h + keras.layers.Embedding(
        args.seq_len, args.d_model, name="positions_emb"
    )(positions)
    for index in range(args.layers):
        h = _block(h, args, use_moe, index)
    h = keras.layers.LayerNormalization(name="final_norm")(h)
    logits = keras.layers.Dense(vocab_size, name="logits")(h)
    name = "moe_lm" if use_moe else "dense_lm"
    return keras.Model(tokens, logits, name=name)


def count_params(model):
    """`(total, active per token, router)` parameter counts.

    A token passes through the router and its top-k experts of each MoE
    layer, so the other experts' weights are not active for it. Parameters
    are the trainable weights (an MoE layer's routing statistics are
    non-trainable state).
    """
    from moe_keras import MoE

    total = active = sum(math.prod(w.shape) for w in model.trainable_weights)
    router = 0
    for layer in model.layers:
        if isinstance(layer, MoE):
            per_expert = layer.experts.count_params() // layer.num_experts
            active -= (layer.num_experts - layer.top_k) * per_expert
            router += layer.gate.count_params()
    return total, active, router


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _step_timer(skip=2):
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time of training steps. The clock restarts every epoch so
        that validation runs are not counted, and the first `skip` steps
        (tracing and compilation) are left out."""

        def __init__(self, skip):
            super().__init__()
            self.skip = skip
            self.durations = []
            self._last = None
            self._steps = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._last = None

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if self._last is not None and self._steps >= self.skip:
                self.durations.append(now - self._last)
            self._last = now
            self._steps += 1

        def mean_s(self):
            if not self.durations:
                return float("nan")
            return sum(self.durations) / len(self.durations)

    return StepTimer(skip)


def _schedule(args):
    import keras

    # A short warmup keeps Adam's first, poorly estimated updates small;
    # the cosine then ends at a tenth of the peak rather than at zero.
    warmup = max(1, args.steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(1, args.steps - warmup),
        alpha=0.1,
    )


def train(model, args, data, routing_metrics=False):
    """Trains `model` for `args.steps` steps; returns its curves, parameter
    counts and (with `routing_metrics`, for a model with MoE layers) its
    routing statistics."""
    import keras

    from moe_keras import RoutingMetrics

    x_train, y_train, x_val, y_val = data
    model.compile(
        optimizer=keras.optimizers.AdamW(
            _schedule(args), weight_decay=0.01, global_clipnorm=1.0
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Keras' `loss` also holds the MoE's auxiliary losses while
        # training; this metric is the language-model loss alone.
        metrics=[
            keras.metrics.SparseCategoricalCrossentropy(
                from_logits=True, name="ce"
            )
        ],
        jit_compile=True if args.jit_compile else "auto",
    )
    initial = model.evaluate(
        x_val, y_val, batch_size=EVAL_BATCH_SIZE, return_dict=True, verbose=0
    )
    timer = _step_timer()
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        # Short "epochs" over one pass of the windows, to validate along
        # the way; the data iterator carries on across them.
        steps_per_epoch=args.eval_every,
        epochs=args.steps // args.eval_every,
        shuffle=False,  # the windows are already in random order
        validation_data=(x_val, y_val),
        validation_batch_size=EVAL_BATCH_SIZE,
        callbacks=[timer] + ([RoutingMetrics()] if routing_metrics else []),
        verbose=2 if args.verbose else 0,
    ).history
    seconds = time.perf_counter() - started
    # A check on the schedule of short epochs: exactly `steps` updates.
    if int(model.optimizer.iterations) != args.steps:
        raise RuntimeError(
            f"trained {int(model.optimizer.iterations)} steps, expected "
            f"{args.steps}"
        )
    total, active, router = count_params(model)
    val_ce = [float(initial["ce"])] + [float(v) for v in history["val_ce"]]
    # The MoE layers' routing statistics over the last `eval_every` steps.
    routing = {
        key: float(values[-1])
        for key, values in history.items()
        if key.startswith("moe_")
        and key.endswith(("dropped_fraction", "load_imbalance"))
    }
    return {
        "steps": list(range(0, args.steps + 1, args.eval_every)),
        # Mean over the `eval_every` steps before each evaluation.
        "train_ce": [None] + [float(v) for v in history["ce"]],
        "val_ce": val_ce,
        "val_ppl": [math.exp(v) for v in val_ce],
        "params": total,
        "active_params": active,
        "router_params": router,
        # Mean over the run; it moves with whatever else the machine does
        # meanwhile, so `step_ms` (from `time_steps`) is the one to compare.
        "fit_step_ms": 1000.0 * timer.mean_s(),
        "fit_seconds": seconds,
        "routing": routing,
    }


def time_steps(models, x, y, args, block=10):
    """Median training step time of each model, in ms, with the models
    taking turns in blocks of `block` steps, `args.timing_rounds` times:
    a slowdown of the machine then hits both alike, which two runs one
    after the other do not guarantee. (The models train on; their curves
    are already recorded.)"""
    import statistics

    samples = {name: [] for name in models}
    for _ in range(args.timing_rounds):
        for name, model in models.items():
            timer = _step_timer(skip=0)
            model.fit(
                x[: (block + 1) * args.batch_size],
                y[: (block + 1) * args.batch_size],
                batch_size=args.batch_size,
                epochs=1,
                shuffle=False,
                callbacks=[timer],
                verbose=0,
            )
            samples[name].append(1000.0 * timer.mean_s())
    return {name: statistics.median(ms) for name, ms in samples.items()}


def first_step_reaching(curve, target):
    """First evaluated step whose validation loss is at most `target`."""
    for step, value in zip(curve["steps"], curve["val_ce"]):
        if value <= target:
            return step
    return None


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def print_table(results):
    header = (
        f"{'model':<7}{'params':>11}{'active/tok':>12}{'train CE':>10}"
        f"{'val CE':>9}{'val ppl':>9}{'best val':>10}{'step ms':>9}"
    )
    print("\n" + header)
    print("-" * len(header))
    for name in VARIANTS:
        r = results[name]
        print(
            f"{name:<7}{r['params']:>11,}{r['active_params']:>12,}"
            f"{r['train_ce'][-1]:>10.4f}{r['val_ce'][-1]:>9.4f}"
            f"{r['val_ppl'][-1]:>9.3f}{min(r['val_ce']):>10.4f}"
            f"{r['step_ms']:>9.1f}"
        )
    print(
        "(CE: cross-entropy in nats per character at the last step, train "
        "CE averaged over the last evaluation interval; ppl = exp(val CE); "
        "active/tok includes the MoE's "
        f"{results['moe']['router_params']:,} router weights; step ms: "
        "median, the models timed in turns after training)"
    )
    print(crossing_line(results))
    routing = results["moe"]["routing"]
    if routing:
        print(
            "MoE routing over the last interval: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(routing.items()))
        )


def crossing_line(results):
    """One sentence: how soon the better model (lower final validation
    loss) reaches the other's final validation loss, in steps and time."""
    better, other = sorted(VARIANTS, key=lambda n: results[n]["val_ce"][-1])
    target = results[other]["val_ce"][-1]
    reached = first_step_reaching(results[better], target)
    last = results[other]["steps"][-1]
    if results[better]["val_ce"][-1] == target:
        return "Both models end at the same validation loss."
    names = {"dense": "dense", "moe": "MoE"}
    return (
        f"The {names[better]} model reaches the {names[other]} model's "
        f"final val CE "
        f"({target:.4f}) at step {reached} of {last}: "
        f"{reached * results[better]['step_ms'] / 1000:.0f} s of training "
        f"against {last * results[other]['step_ms'] / 1000:.0f} s."
    )


def plot_curves(results, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colours = {"dense": "tab:blue", "moe": "tab:orange"}
    labels = {
        "dense": "dense FFN",
        "moe": f"MoE FFN (E={args.experts}, k={args.top_k})",
    }
    for name in VARIANTS:
        r = results[name]
        seconds = [step * r["step_ms"] / 1000 for step in r["steps"]]
        for ax, xs in ((axes[0], r["steps"]), (axes[1], seconds)):
            ax.plot(xs, r["val_ce"], color=colours[name], label=labels[name])
            ax.plot(
                xs[1:],
                r["train_ce"][1:],
                color=colours[name],
                ls="--",
                lw=1,
                alpha=0.7,
                label=f"{labels[name]}, train",
            )
    # The first points (untrained, about log(vocab)) would squash the rest.
    low = min(min(r["val_ce"] + r["train_ce"][1:]) for r in results.values())
    start = min(results[name]["val_ce"][1] for name in VARIANTS)
    axes[0].set_ylim(low - 0.05, start + 0.1)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time at the mean step time (s)")
    axes[0].set_ylabel("cross-entropy (nats / char)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(
        f"Char-level LM on pydoc_data.topics: {args.layers} layers, "
        f"d_model={args.d_model}, seq={args.seq_len}, batch={args.batch_size}"
        f"; solid: validation, dashed: training"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # Before TensorFlow starts: without an NVIDIA GPU its CUDA probe logs
    # `failed call to cuInit` as an error though nothing failed.
    gpu = os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu else "3")

    import keras

    ids, vocabulary = encode(load_corpus())
    train_ids, val_ids = split(ids)
    x_train, y_train = training_windows(
        train_ids, args.seq_len, args.steps * args.batch_size, args.seed
    )
    x_val, y_val = validation_windows(val_ids, args.seq_len)
    data = (x_train, y_train, x_val, y_val)
    print(
        f"backend={keras.backend.backend()} corpus={len(ids):,} chars "
        f"(train {len(train_ids):,}, validation {len(val_ids):,}) "
        f"vocab={len(vocabulary)} jit_compile={args.jit_compile}",
        flush=True,
    )

    results, models = {}, {}
    for name in VARIANTS:
        keras.utils.set_random_seed(args.seed)
        models[name] = build_model(args, len(vocabulary), name == "moe")
        if args.verbose:
            print(f"\n== {models[name].name} ==", flush=True)
        results[name] = train(
            models[name], args, data, routing_metrics=name == "moe"
        )
    for name, ms in time_steps(models, x_train, y_train, args).items():
        results[name]["step_ms"] = ms

    print_table(results)
    summary = {
        "config": {
            key: value for key, value in vars(args).items() if key != "verbose"
        },
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": sys.version.split()[0],
        "vocab_size": len(vocabulary),
        "uniform_ce": math.log(len(vocabulary)),
        **results,
    }
    json_path = os.path.join(args.output_dir, f"{OUTPUT_NAME}.json")
    with open(json_path, "w") as file:
        json.dump(summary, file, indent=1)
    png_path = os.path.join(args.output_dir, f"{OUTPUT_NAME}.png")
    plot_curves(results, args, png_path)
    print(f"wrote {json_path} and {png_path}")
    summary["json"], summary["png"] = json_path, png_path
    return summary


if __name__ == "__main__":
    main()
