"""Learned routers that score the inputs: softmax, sigmoid, any activation
(the classic `gate_fn`), and noisy top-k."""

import keras
from keras import ops

from moe_keras import _validation
from moe_keras import losses as losses_lib
from moe_keras.gates.base import Gate


@keras.saving.register_keras_serializable(package="moe_keras")
class SoftmaxGate(Gate):
    """Softmax router: gate probabilities sum to 1 over the experts.

    With top-k routing (k > 1) the k selected probabilities are
    renormalised to sum to 1, which equals a softmax over the k selected
    logits (as in Mixtral); at k = 1 the probability itself is the weight
    (as in Switch), so the router still learns from the task.
    `normalize_top_k=True` renormalises at k = 1 too. This is the gate of
    `MoE(gate="softmax")`, the default.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        normalize_top_k: bool or None. `None` (the default) renormalises
            the k selected probabilities for k > 1 only; `True` at every k;
            `False` never.
        **kwargs: the other arguments of `Gate`: `use_bias`,
            `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `jitter`, `dropout`, `bias_update_rate`,
            `seed`, `hidden_units`, `hidden_activation`, the router input
            transform (`input_norm`, `input_norm_epsilon`,
            `input_multiplier`, `use_input_scale`), DeepSeek-V3's
            group-limited routing (`expert_groups`, `top_groups`) and
            `routed_scaling_factor`, and base layer keyword arguments such
            as `name`.

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`, probabilities that sum to 1 over the experts;
        with `routing=True`, the routing dict of `Gate`.

    Example:

    >>> gate = SoftmaxGate(num_experts=4)
    >>> x = np.ones((2, 8), "float32")
    >>> tuple(gate(x).shape)
    (2, 4)
    >>> routing = gate(x, routing=True, top_k=2)
    >>> weights = keras.ops.convert_to_numpy(routing["weights"])
    >>> np.round(weights.sum(axis=-1), 3)  # the top 2 renormalised
    array([1., 1.], dtype=float32)
    """

    default_normalize_top_k = True

    def probabilities(self, logits):
        return ops.softmax(logits, axis=-1)


def _normalized_positive(probs):
    """Non-negative gate values as a distribution over experts."""
    probs = ops.maximum(probs, 0.0)
    return probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), 1e-9)


@keras.saving.register_keras_serializable(package="moe_keras")
class SigmoidGate(Gate):
    """Sigmoid router: each expert gets an independent weight in (0, 1).

    Experts do not compete for probability mass, so the dense mixture can
    switch several experts fully on at once; with top-k the selected
    sigmoid scores are used as they are (not renormalised, unless
    `normalize_top_k=True`, as DeepSeek-V3 does). With
    `bias_update_rate > 0` this is DeepSeek-V3's auxiliary-loss-free
    router, and with `expert_groups`, `top_groups`, `normalize_top_k=True`
    and `routed_scaling_factor` too, its whole router. The load-balancing
    loss reads the scores normalised to sum to 1. This is the gate of
    `MoE(gate="sigmoid")`.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        normalize_top_k: bool or None. `None` (the default) and `False`
            keep the k selected scores as they are; `True` renormalises
            them to sum to 1.
        **kwargs: the other arguments of `Gate`: `use_bias`,
            `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `jitter`, `dropout`, `bias_update_rate`,
            `seed`, `hidden_units`, `hidden_activation`, the router input
            transform (`input_norm`, `input_norm_epsilon`,
            `input_multiplier`, `use_input_scale`), DeepSeek-V3's
            group-limited routing (`expert_groups`, `top_groups`) and
            `routed_scaling_factor`, and base layer keyword arguments such
            as `name`. `use_bias=True` adds a
            learned bias to every expert's logit.

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`, each weight in (0, 1); with `routing=True`,
        the routing dict of `Gate`.

    Example:

    >>> gate = SigmoidGate(num_experts=4, kernel_initializer="zeros")
    >>> x = np.ones((1, 8), "float32")
    >>> keras.ops.convert_to_numpy(gate(x)).tolist()  # sigmoid(0) each
    [[0.5, 0.5, 0.5, 0.5]]
    >>> routing = gate(x, routing=True, top_k=2)
    >>> keras.ops.convert_to_numpy(routing["weights"]).tolist()
    [[0.5, 0.5]]
    """

    def probabilities(self, logits):
        return ops.sigmoid(logits)

    def balance_distribution(self, probs):
        return _normalized_positive(probs)


@keras.saving.register_keras_serializable(package="moe_keras")
class ActivationGate(Gate):
    """A router whose gate function is any activation: `g = f(x @ W + b)`.

    The classic write-ups give the gate as a function of the router's
    logits (`gate_fn`): a softmax, a sigmoid, a ReLU, a tanh. This gate
    takes that function as `activation`, a Keras activation name or a
    callable on `[T, E]` logits, and uses its values as the combine
    weights as they are (with top-k, the k largest). `MoE(gate=fn)`, with
    `fn` a callable such as `keras.activations.relu`, builds one.

    To save a model with a function of your own, register it with
    `@keras.saving.register_keras_serializable()` (a `lambda` reloads only
    with `safe_mode=False`).

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        activation: str or callable, the gate function. Defaults to
            `"sigmoid"`. Anything else is a `TypeError`, and a name Keras
            does not know a `ValueError`.
        **kwargs: the other arguments of `Gate`: `use_bias`,
            `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `jitter`, `dropout`, `bias_update_rate`,
            `seed`, `hidden_units`, `hidden_activation`, the router input
            transform (`input_norm`, `input_norm_epsilon`,
            `input_multiplier`, `use_input_scale`), DeepSeek-V3's
            group-limited routing (`expert_groups`, `top_groups`) and
            `routed_scaling_factor`, and base layer keyword arguments such
            as `name`. `normalize_top_k=True`
            renormalises the k selected weights (the default keeps them).

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`, the gate function of the logits; with
        `routing=True`, the routing dict of `Gate`.

    Example:

    >>> gate = ActivationGate(num_experts=4, activation="relu", use_bias=True)
    >>> tuple(gate(np.ones((2, 8), "float32")).shape)
    (2, 4)
    >>> layer = MoE(4, 8, gate=keras.activations.relu)
    >>> type(layer.gate).__name__
    'ActivationGate'
    """

    def __init__(self, num_experts=None, activation="sigmoid", **kwargs):
        super().__init__(num_experts=num_experts, **kwargs)
        if isinstance(activation, dict):
            # A saved function: Keras finds it (registered, or a lambda
            # under `safe_mode=False`) or says why it cannot.
            if activation.get("class_name") == "__lambda__":
                self.activation = keras.saving.deserialize_keras_object(
                    activation
                )
            else:
                self.activation = keras.activations.deserialize(activation)
            return
        if activation is None or not (
            isinstance(activation, str) or callable(activation)
        ):
            raise TypeError(
                "`activation` must be an activation name or a callable; "
                f"received activation={activation!r}."
            )
        try:
            self.activation = keras.activations.get(activation)
        except ValueError as error:
            raise ValueError(
                "`activation` must be a Keras activation name or a callable; "
                f"received activation={activation!r}."
            ) from error

    def probabilities(self, logits):
        return self.activation(logits)

    def balance_distribution(self, probs):
        return _normalized_positive(probs)

    def get_config(self):
        config = super().get_config()
        if getattr(self.activation, "__name__", None) == "<lambda>":
            # Keras' activation format keeps a lambda's code but not the
            # marker that lets it load again (`safe_mode=False`).
            config["activation"] = keras.saving.serialize_keras_object(
                self.activation
            )
        else:
            config["activation"] = keras.activations.serialize(self.activation)
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class NoisyTopKGate(SoftmaxGate):
    """Noisy top-k gating (Shazeer et al. 2017).

    From "Outrageously Large Neural Networks". While training,
    learned input-dependent Gaussian noise
    `N(0, 1) * softplus(x @ W_noise)` is added to the logits before the
    top-k is taken. The combine weights are the selected probabilities of
    the softmax over the noisy logits, renormalised as in `SoftmaxGate`:
    for k > 1 that is a softmax over the k selected noisy logits, the
    paper's form; at k = 1 it is the selected probability itself (as in
    Switch, so the router keeps learning from the task), unless
    `normalize_top_k=True`, which gives the paper's form at every k (at
    k = 1 a weight of exactly 1). It adds the paper's two balancing
    losses: the importance loss `importance_weight * CV(sum_t g_t)^2` and
    the load loss `load_weight * CV(sum_t P(t, i))^2`, with `P` the smooth
    probability that expert i stays in the top-k under fresh noise (for
    k < E only). At inference, and for the dense mixture (`top_k=None`),
    it routes as a `SoftmaxGate`, without noise.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        importance_weight: float >= 0, weight of the importance loss.
            Defaults to 0.1.
        load_weight: float >= 0, weight of the load loss. Defaults to 0.1.
        **kwargs: the other arguments of `Gate`: `use_bias`,
            `kernel_initializer`, `bias_initializer`, `kernel_regularizer`,
            `bias_regularizer`, `jitter`, `dropout`, `bias_update_rate`,
            `seed`, `hidden_units`, `hidden_activation`, the router input
            transform (`input_norm`, `input_norm_epsilon`,
            `input_multiplier`, `use_input_scale`), DeepSeek-V3's
            group-limited routing (`expert_groups`, `top_groups`) and
            `routed_scaling_factor`, and base layer keyword arguments such
            as `name`. `normalize_top_k` as in
            `SoftmaxGate`.

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`, the noiseless softmax probabilities; with
        `routing=True`, the routing dict of `Gate`, whose `losses` hold
        `importance_loss` and `noisy_load_loss` while training.

    Example:

    >>> gate = NoisyTopKGate(num_experts=4, normalize_top_k=True, seed=0)
    >>> x = np.ones((2, 8), "float32")
    >>> routing = gate(x, routing=True, top_k=1)
    >>> keras.ops.convert_to_numpy(routing["weights"]).tolist()
    [[1.0], [1.0]]
    >>> routing = gate(x, routing=True, top_k=2, training=True)
    >>> sorted(routing["losses"])
    ['importance_loss', 'noisy_load_loss']
    """

    uses_randomness = True

    def __init__(
        self, num_experts=None, importance_weight=0.1, load_weight=0.1, **kwargs
    ):
        super().__init__(num_experts=num_experts, **kwargs)
        self.importance_weight = _validation.non_negative_float(
            importance_weight, "importance_weight"
        )
        self.load_weight = _validation.non_negative_float(
            load_weight, "load_weight"
        )

    def build_router(self, features):
        super().build_router(features)
        # Zero init: training starts with softplus(0) ~ 0.69 noise everywhere.
        self.noise_kernel = self.add_weight(
            name="noise_kernel",
            shape=(features, self.num_experts),
            initializer="zeros",
            regularizer=self.kernel_regularizer,
        )

    def route(
        self,
        x,
        top_k,
        training=None,
        mask=None,
        routing_ids=None,
        indices=None,
    ):
        # The noise explores the choice of experts; a replayed routing
        # makes that choice, so it routes noiselessly (and so reproduces
        # a recording made at inference).
        if not training or top_k is None or indices is not None:
            return super().route(x, top_k, training, mask, routing_ids, indices)
        clean = self.compute_logits(x, training)
        noise_std = ops.softplus(ops.matmul(x, self.noise_kernel)) + 1e-2
        noisy = clean + noise_std * keras.random.normal(
            ops.shape(clean), seed=self.seed_generator, dtype=clean.dtype
        )
        probs = ops.softmax(noisy, axis=-1)
        scores = self.selection_scores(probs)  # before the bias moves
        weights, indices = self.select(probs, top_k)
        if self.selection_bias is not None:
            self.update_selection_bias(indices, mask)
        dense = ops.einsum(
            "tk,tke->te", weights, ops.one_hot(indices, self.num_experts)
        )
        routing_losses = {}
        if self.importance_weight > 0:
            routing_losses["importance_loss"] = (
                self.importance_weight * losses_lib.importance_loss(dense, mask)
            )
        if self.load_weight > 0 and top_k < self.num_experts:
            routing_losses["noisy_load_loss"] = (
                self.load_weight
                * losses_lib.noisy_load_loss(
                    clean, noisy, noise_std, top_k, mask
                )
            )
        if self.dropout > 0:
            weights = keras.random.dropout(
                weights, self.dropout, seed=self.seed_generator
            )
        return {
            "logits": clean,
            "probs": probs,
            "scores": scores,
            "weights": weights,
            "indices": indices,
            "losses": routing_losses,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "importance_weight": self.importance_weight,
                "load_weight": self.load_weight,
            }
        )
        return config
