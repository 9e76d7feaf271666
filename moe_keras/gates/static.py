"""Input-independent expert weights: learned (`StaticGate`) or set from
each expert's measured performance (`PerformanceGate`)."""

import keras
import numpy as np
from keras import ops

from moe_keras.gates.base import Gate
from moe_keras.gates.base import broadcast_rows
from moe_keras.gates.learned import SoftmaxGate


@keras.saving.register_keras_serializable(package="moe_keras")
class StaticGate(SoftmaxGate):
    """A learned, input-independent weight per expert: `softmax(w)`.

    Every position gets the same mixture (and, with top-k, the same
    experts); useful as a baseline and for ensembles of experts. The
    logits `w` start at zero (the plain average) and are trained with the
    model.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        kernel_regularizer: regularizer of the logits `w`. Defaults to
            `None`.
        **kwargs: `dropout`, `bias_update_rate`, `seed` and
            `normalize_top_k` as in `Gate` and `SoftmaxGate`, and base layer
            keyword arguments such as `name`. There is no input to score:
            `use_bias`, `jitter`, `hidden_units`, the router input
            transform (`input_norm`, `input_norm_epsilon`,
            `input_multiplier`, `use_input_scale`), `expert_groups`,
            `top_groups` and `routed_scaling_factor` must keep their
            defaults (a `ValueError` otherwise), and `kernel_initializer`,
            `bias_initializer`, `bias_regularizer` and `hidden_activation`
            have no effect.

    Input shape:
        `(tokens, features)`; only the number of rows is read.

    Output shape:
        `(tokens, num_experts)`, the same probabilities on every row; with
        `routing=True`, the routing dict of `Gate`.

    Example:

    >>> gate = StaticGate(num_experts=3)
    >>> probs = gate(np.ones((2, 8), "float32"))
    >>> np.round(keras.ops.convert_to_numpy(probs), 3)
    array([[0.333, 0.333, 0.333],
           [0.333, 0.333, 0.333]], dtype=float32)
    """

    scores_inputs = False

    def build_router(self, features):
        self.hidden_kernel = None
        self.kernel = self.add_weight(
            name="expert_logits",
            shape=(self.num_experts,),
            initializer="zeros",
            regularizer=self.kernel_regularizer,
        )
        self.bias = None

    def compute_logits(self, x, training=None, routing_ids=None):
        return ops.zeros((ops.shape(x)[0], 1), x.dtype) + self.kernel


def _check_scores(scores, name="scores", num_experts=None):
    """Scores as a float32 NumPy vector: finite, >= 0, not all 0."""
    try:
        values = np.asarray(scores, dtype="float64")
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{name}` must be a list of numbers, one per expert; received "
            f"{name}={scores!r}."
        ) from error
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"`{name}` must be a non-empty list of numbers, one per "
            f"expert; received {name}={scores!r}."
        )
    if num_experts is not None and values.size != num_experts:
        raise ValueError(
            f"`{name}` must have one entry per expert ({num_experts}); "
            f"received {values.size} entries: {name}={scores!r}."
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(
            f"`{name}` must be finite and non-negative (higher is better); "
            f"received {name}={scores!r}."
        )
    if not values.sum() > 0:
        raise ValueError(
            f"`{name}` must not be all zero (the weights are "
            f"scores / sum(scores)); received {name}={scores!r}."
        )
    return values.astype("float32")


@keras.saving.register_keras_serializable(package="moe_keras")
class PerformanceGate(Gate):
    """Performance-based expert weights: `W_e = p_e / sum_j p_j`.

    `p_e` is a measured score of expert e, higher for better (for example
    each expert's validation accuracy alone). The weights do not depend on
    the input and are not trained by gradient descent: they are a
    non-trainable weight (saved with the model) set from `scores`, by
    `set_scores`, or after every epoch by
    `moe_keras.ExpertPerformanceCallback`, which measures them. With
    `top_k=k` the k best-scored experts are used, weighted by their
    scores renormalised over the k (`normalize_top_k=False` keeps
    `p_e / sum_j p_j` over all experts instead). No auxiliary loss
    applies (nothing here is learned). The selection does not depend on
    the input, so with `top_k` only the k selected experts run and train:
    train with `top_k=None` (every expert learns, weighted by its score)
    until the scores are measured, or give scores from elsewhere; equal
    scores select the first k experts.

    Args:
        scores: optional list of E finite non-negative numbers, not all
            zero (a `ValueError` otherwise). Defaults to `None`: equal
            scores (the plain average).
        num_experts: int or None, the number of experts. Defaults to
            `None`: the length of `scores`, or, without scores, filled in
            by the owning `MoE`.
        **kwargs: `normalize_top_k` (`None`, the default, renormalises the
            k selected weights at every k), `dropout`, `bias_update_rate`
            and `seed` as in `Gate`, and base layer keyword arguments such
            as `name`. The router options do not apply: `use_bias`,
            `jitter` and `hidden_units` must keep their defaults (a
            `ValueError` otherwise), and the initializers, regularizers and
            `hidden_activation` have no effect.

    Input shape:
        `(tokens, features)`; only the number of rows is read.

    Output shape:
        `(tokens, num_experts)`, `scores / sum(scores)` on every row; with
        `routing=True`, the routing dict of `Gate`.

    Example:

    >>> gate = PerformanceGate(scores=[0.9, 0.6, 0.5])
    >>> x = np.ones((1, 4), "float32")
    >>> np.round(keras.ops.convert_to_numpy(gate(x)), 3)
    array([[0.45, 0.3 , 0.25]], dtype=float32)
    >>> gate.set_scores([1.0, 1.0, 2.0])
    >>> np.round(keras.ops.convert_to_numpy(gate(x)), 3)
    array([[0.25, 0.25, 0.5 ]], dtype=float32)
    """

    learned = False
    scores_inputs = False

    def __init__(self, scores=None, num_experts=None, **kwargs):
        super().__init__(num_experts=num_experts, **kwargs)
        self.initial_scores = None
        if scores is not None:
            values = _check_scores(scores, "scores", self.num_experts)
            self.initial_scores = [float(v) for v in values]
            self.num_experts = self.num_experts or len(values)
        self.scores = None

    def build_router(self, features):
        self.hidden_kernel = self.kernel = self.bias = None
        if self.initial_scores is not None:
            initial = self.initial_scores
            if len(initial) != self.num_experts:
                raise ValueError(
                    f"PerformanceGate '{self.name}' has {len(initial)} "
                    f"scores but num_experts={self.num_experts}."
                )
            initializer = keras.initializers.Constant(np.asarray(initial))
        else:
            initializer = "ones"
        self.scores = self.add_weight(
            name="scores",
            shape=(self.num_experts,),
            initializer=initializer,
            trainable=False,
        )

    def set_scores(self, scores):
        """Sets the experts' scores `p` (E non-negative numbers, not all
        zero); the combine weights become `p / sum(p)`."""
        if self.scores is None:
            raise ValueError(
                f"PerformanceGate '{self.name}' is not built yet: call the "
                "model once (or pass `scores=` to the gate) first."
            )
        self.scores.assign(_check_scores(scores, "scores", self.num_experts))

    def compute_logits(self, x, training=None, routing_ids=None):
        # The gate's "logits" are the scores themselves, per position.
        return broadcast_rows(x, self.scores)  # [T, E]

    def probabilities(self, logits):
        total = ops.sum(logits, axis=-1, keepdims=True)
        return logits / ops.maximum(total, 1e-30)

    def normalizes(self, top_k):
        if self.normalize_top_k is not None:
            return self.normalize_top_k
        return True

    def get_config(self):
        config = super().get_config()
        config["scores"] = self.initial_scores
        return config
