"""Routing statistics: the record an `MoE` layer keeps of its own routing.

They are kept the way `BatchNormalization` keeps its moving statistics:
non-trainable variables of the layer, assigned in `call`. So they are
right wherever the layer runs, in TensorFlow graphs, inside JAX's
stateless train and test steps (which carry non-trainable variables but
not a layer's own metrics), and on torch, and they add nothing to what
`fit`, `evaluate` or `train_on_batch` return. `moe_keras.RoutingMetrics`
puts them in the logs when asked for; `ExpertLoadCallback` reads the
per-expert load.

Each statistic is a running sum over batches with a count, kept apart
for training calls and for inference calls (evaluation), so that
validation never mixes with the training epoch it follows. What is read
over a whole epoch (dead experts, the load's spread, its smallest and
largest share) is derived from the summed load when read, at no cost per
step.
"""

import keras
import numpy as np
from keras import ops

STATISTICS = (
    "dropped_fraction",
    "load_imbalance",
    "router_entropy",
    "load_balance_loss",
    "z_loss",
    "sequence_balance_loss",
    "aux_loss",
)
# Counted like the statistics (a batch that computed it adds 1), with no
# scalar sum: its sum is the `[E, E]` co-selection variable.
_COUNTED = STATISTICS + ("co_selection",)
PHASES = ("train", "eval")


class RoutingStatistics:
    """Running sums of per-batch routing statistics of one `MoE` layer.

    An `MoE` layer made with `routing_statistics=True` (the default) makes
    one when it builds, as `layer.statistics`, and adds each batch to it in
    `call`: to the `"train"` record when training and to the `"eval"`
    record otherwise. `result(phase)` reads a record's means;
    `RoutingMetrics` and `ExpertLoadCallback` read them between epochs.

    Statistics (each the mean over the batches that computed it):
        dropped_fraction: assignments dropped for lack of capacity, over
            assignments routed (only where a capacity applies).
        load_imbalance: max over mean expert load, 1 when balanced.
        router_entropy: mean entropy (nats) of the router's distribution.
        load_balance_loss, z_loss, sequence_balance_loss, aux_loss: the
            auxiliary losses the layer added, with their weights (training
            only, each where its weight is non-zero); `aux_loss` is their
            sum with any loss of the gate.
        expert_load: `[E]`, the fraction of assignments each expert took.

    Read from the epoch's load, `expert_load` (where any assignment was
    counted):
        dead_experts: the fraction of the E experts that took no
            assignment at all (load exactly 0). For the dense mixture,
            whose load is the mean gate weight, only an expert the router
            never weights counts.
        load_cv: coefficient of variation of `expert_load`, its standard
            deviation over its mean (the mean is 1/E): 0 when balanced,
            `sqrt(E - 1)` when one expert takes everything.
        min_expert_load, max_expert_load: the smallest and largest share
            of the assignments an expert took (1/E each when balanced).

    Where the router picks experts per token (top-k, any gate with
    indices):
        co_selection: `[E, E]`, the fraction of the (unmasked) tokens
            that chose both expert i and expert j, averaged over the
            batches; its diagonal is the fraction of tokens that chose i
            (k times its `expert_load`). Expert choice and the dense
            mixture have none.

    Args:
        layer: the owning layer; the variables are its weights, made here
            (call from `build`).
        num_experts: int, E.

    Example:

    >>> layer = MoE(4, 8, top_k=2)
    >>> _ = layer(np.ones((6, 5), "float32"))  # an inference call
    >>> result = layer.statistics.result("eval")
    >>> sorted(result)  # dropless inference: nothing dropped to count
    ['co_selection', 'dead_experts', 'expert_load', 'load_cv',
     'load_imbalance', 'max_expert_load', 'min_expert_load',
     'router_entropy']
    >>> round(float(result["expert_load"].sum()), 3)
    1.0
    >>> result["co_selection"].shape  # tokens that chose both i and j
    (4, 4)
    >>> layer.statistics.result("train")["expert_load"].tolist()  # no batch
    [0.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, layer, num_experts):
        self.num_experts = num_experts
        self._variables = {}

        def state(name, shape):
            # Summed on read, like a metric's variables: under tf.distribute
            # each replica adds its own batches, with no cross-replica sync
            # inside `call` (one there would stall the replica threads
            # mid-step and let them read each other's `add_loss` losses).
            # `add_weight` has no `synchronization` argument.
            with keras.name_scope(layer.name, caller=layer):
                variable = keras.Variable(
                    initializer="zeros",
                    shape=shape,
                    dtype="float32",
                    trainable=False,
                    autocast=False,
                    aggregation="sum",
                    synchronization="on_read",
                    name=name,
                )
            layer._track_variable(variable)
            return variable

        for phase in PHASES:
            self._variables[phase] = dict(
                sums=state(f"{phase}_statistics_sum", (len(STATISTICS),)),
                counts=state(f"{phase}_statistics_count", (len(_COUNTED),)),
                load=state(f"{phase}_expert_load_sum", (num_experts,)),
                batches=state(f"{phase}_batches", ()),
                co_selection=state(
                    f"{phase}_co_selection_sum", (num_experts, num_experts)
                ),
            )

    @property
    def variables(self):
        return [v for phase in PHASES for v in self._variables[phase].values()]

    def update(self, training, load, indices=None, valid=None, **values):
        """Adds one batch: `load` `[E]`, the experts each token chose
        (`indices`, `[tokens, k]`, or `None` where the router picks no
        experts per token) with the `[tokens]` mask `valid` (or `None`),
        and scalar `values` by name (those left out or `None` were not
        computed for this batch)."""
        state = self._variables["train" if training else "eval"]
        present = [values.get(name) is not None for name in STATISTICS]
        batch = ops.stack(
            [
                ops.cast(values[name], "float32") if here else 0.0
                for name, here in zip(STATISTICS, present)
            ]
        )
        # A record, not part of the loss: under tf.distribute the
        # cross-replica mean of an assign would otherwise stay on the tape.
        batch = ops.stop_gradient(batch)
        load = ops.stop_gradient(ops.cast(load, "float32"))
        state["sums"].assign(state["sums"] + batch)
        present.append(indices is not None)
        state["counts"].assign(
            state["counts"] + ops.convert_to_tensor(present, "float32")
        )
        if indices is not None:
            state["co_selection"].assign(
                state["co_selection"]
                + co_selection(indices, self.num_experts, valid)
            )
        state["load"].assign(state["load"] + load)
        state["batches"].assign(state["batches"] + 1.0)

    def result(self, phase="train"):
        """`{name: mean}` over the batches since the last reset, for the
        statistics computed in that phase, `expert_load` (`[E]` NumPy
        array; zeros before any batch), what is read from it (once any
        assignment was counted) and `co_selection` (`[E, E]`, where the
        router chose experts per token)."""
        state = self._variables[_phase(phase)]
        sums = np.asarray(ops.convert_to_numpy(state["sums"]))
        counts = np.asarray(ops.convert_to_numpy(state["counts"]))
        counts, co_selection_batches = counts[:-1], counts[-1]
        batches = float(ops.convert_to_numpy(state["batches"]))
        out = {
            name: float(total / count)
            for name, total, count in zip(STATISTICS, sums, counts)
            if count > 0
        }
        load = np.asarray(ops.convert_to_numpy(state["load"]))
        load = load / max(batches, 1.0)
        out["expert_load"] = load
        if load.sum() > 0:
            # Exactly 0: a single assignment in the epoch gives an expert
            # a share of at least 1 / (tokens * k) of its batch.
            out["dead_experts"] = float(np.mean(load == 0.0))
            out["load_cv"] = float(np.std(load) / np.mean(load))
            out["min_expert_load"] = float(load.min())
            out["max_expert_load"] = float(load.max())
        if co_selection_batches > 0:
            pairs = np.asarray(ops.convert_to_numpy(state["co_selection"]))
            out["co_selection"] = pairs / co_selection_batches
        return out

    def snapshot(self, phase):
        """One phase's variable values, NumPy, for `restore`."""
        return {
            name: np.array(ops.convert_to_numpy(variable))
            for name, variable in self._variables[_phase(phase)].items()
        }

    def restore(self, phase, values):
        """Puts back the values `snapshot` took."""
        for name, variable in self._variables[_phase(phase)].items():
            variable.assign(values[name])

    def reset(self, phase=None):
        """Zeroes one phase's statistics, or both with `phase=None`."""
        for name in PHASES if phase is None else (_phase(phase),):
            for variable in self._variables[name].values():
                variable.assign(ops.zeros(variable.shape, variable.dtype))


def co_selection(indices, num_experts, valid=None):
    """`[E, E]`: the fraction of the tokens (those `valid` marks, all
    without it) whose chosen experts, `indices` `[tokens, k]`, include
    both i and j; the diagonal is the fraction that chose i."""
    # [tokens, E] rows of 0/1: a token chooses k distinct experts.
    chose = ops.sum(ops.one_hot(indices, num_experts, dtype="float32"), 1)
    tokens = ops.cast(ops.shape(chose)[0], "float32")
    if valid is not None:
        valid = ops.cast(valid, "float32")
        chose = chose * valid[:, None]
        tokens = ops.sum(valid)
    pairs = ops.matmul(ops.transpose(chose), chose)
    return ops.stop_gradient(pairs / ops.maximum(tokens, 1.0))


def _phase(phase):
    if phase not in PHASES:
        raise ValueError(
            f"`phase` must be one of {list(PHASES)}; received phase={phase!r}."
        )
    return phase
