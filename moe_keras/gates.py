"""Routers: layers that score experts for each position and pick among them.

Every gate answers two calls:

- `gate(x)`: gate probabilities `[..., E]`, for standalone use;
- `gate(x, routing=True, top_k=k, training=..., routing_mask=...)`: a dict
  with the router's `logits` and `probs` `[T, E]` (float32), the combine
  `weights` (`[T, k]`, or `[T, E]` for the dense mixture; with a trailing
  `units` axis for per-feature gates), the chosen `indices` `[T, k]` when
  `top_k` is set, and `losses`, the gate's own auxiliary terms by name.

The `MoE` layer only consumes that dict, so gates can be swapped without
touching dispatch or experts.
"""

import keras
from keras import ops

from moe_keras import _config
from moe_keras import _validation
from moe_keras import losses as losses_lib


def top_k_indices(scores, k):
    """Indices `[T, k]` int32 of each row's k largest scores, best first,
    the lower index first among ties (as `ops.top_k`).

    Written as k rounds of argmax: the routers' k is small, and unlike
    the `top_k` op this lowers to plain reductions on every backend, so a
    model exported from JAX (a StableHLO `top_k` that TensorFlow 2.21
    cannot load) serves in TensorFlow.
    """
    num = ops.shape(scores)[-1]
    columns = ops.arange(num, dtype="int32")
    picked = []
    for _ in range(k):
        index = ops.cast(ops.argmax(scores, axis=-1), "int32")  # [T]
        picked.append(index)
        # Out of the running: -inf, and NaN rows stay NaN (their argmax
        # is some valid index either way).
        scores = ops.where(
            columns[None, :] == index[:, None],
            ops.cast(float("-inf"), scores.dtype),
            scores,
        )
    return ops.stack(picked, axis=-1)


def _rate(value, name):
    value = _validation.non_negative_float(value, name)
    if value >= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1); received {name}={value}."
        )
    return value


class Gate(keras.layers.Layer):
    """Base class of routers; by itself a learned linear router.

    It scores every expert at every position with `logits = x @ W (+ b)`,
    turns the logits into probabilities (`probabilities`, defined by
    subclasses) and selects the top-k experts. It runs in float32 whatever
    the global dtype policy: routing decisions and the softmax are
    sensitive to rounding, and the router is cheap.

    Args:
        num_experts: int or None. `None` lets the owning `MoE` fill it in.
        use_bias: bool. Defaults to `False`.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer: for the routing weights.
        jitter: float in [0, 1). Switch Transformer router jitter: while
            training, the router's input is multiplied by noise drawn from
            `U(1 - jitter, 1 + jitter)`. Defaults to 0.
        dropout: float in [0, 1). Gate dropout: while training, each
            (position, expert) combine weight is zeroed with this
            probability (the rest scaled by `1 / (1 - dropout)`).
        bias_update_rate: float >= 0. Auxiliary-loss-free load balancing
            (DeepSeek-V3, Wang et al. 2024): a per-expert bias, added to
            the scores for *selection only*, is moved by this step after
            every training batch, up for experts that got less than their
            share of assignments and down for those that got more. It is a
            non-trainable weight, saved with the model. Defaults to 0 (off).
        seed: int or None, seed of the gate's randomness.

    Call arguments:
        inputs: `(..., features)` floats.
        routing, top_k, training, routing_mask, routing_ids: see the module
            docstring; `routing_ids` is only used by id-based gates.
    """

    normalize_top_k = False  # renormalise the k selected weights to sum 1
    learned = True  # a trained router: auxiliary losses apply to it
    expert_choice = False  # experts choose tokens (see ExpertChoiceGate)
    needs_ids = False  # routes by token id (see HashGate)
    uses_randomness = False  # draws random numbers on every call

    def __init__(
        self,
        num_experts=None,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        jitter=0.0,
        dropout=0.0,
        bias_update_rate=0.0,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = _validation.positive_int(
            num_experts, "num_experts", allow_none=True
        )
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.jitter = _rate(jitter, "jitter")
        self.dropout = _rate(dropout, "dropout")
        self.bias_update_rate = _validation.non_negative_float(
            bias_update_rate, "bias_update_rate"
        )
        self.seed = _validation.seed(seed)
        # Only gates that draw random numbers carry a seed state.
        self.seed_generator = None
        if self.uses_randomness or self.jitter > 0 or self.dropout > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.selection_bias = None

    # --- weights ---------------------------------------------------------

    def build(self, input_shape):
        if self.num_experts is None:
            raise ValueError(
                f"Gate '{self.name}' needs `num_experts` before it is built: "
                "pass it to the gate or use the gate inside an `MoE` layer."
            )
        features = _validation.feature_dim(input_shape, self.name)
        self.input_spec = _validation.features_spec(features)
        self.build_router(features)
        if self.bias_update_rate > 0:
            self.selection_bias = self.add_weight(
                name="selection_bias",
                shape=(self.num_experts,),
                initializer="zeros",
                trainable=False,
            )

    def build_router(self, features):
        """Creates the scoring weights; `features` is the input width."""
        self.kernel = self.add_weight(
            name="kernel",
            shape=(features, self.num_experts),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.num_experts,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    # --- scoring ---------------------------------------------------------

    def compute_logits(self, x, training=None, routing_ids=None):
        """Router logits `[T, E]`."""
        if training and self.jitter > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                1.0 - self.jitter,
                1.0 + self.jitter,
                seed=self.seed_generator,
                dtype=x.dtype,
            )
        logits = ops.matmul(x, self.kernel)
        if self.bias is not None:
            logits = logits + self.bias
        return logits

    def probabilities(self, logits):
        """Gate probabilities `[T, E]` from router logits."""
        raise NotImplementedError

    def balance_distribution(self, probs):
        """Router probabilities as a distribution over experts (sums to 1),
        the form the load-balancing loss expects."""
        return probs

    def select(self, probs, top_k):
        """The `top_k` experts of each position and their combine weights,
        `(weights, indices)`, both `[T, top_k]`."""
        scores = probs
        if self.selection_bias is not None:
            scores = probs + self.selection_bias
        indices = top_k_indices(scores, top_k)
        weights = ops.take_along_axis(probs, indices, axis=-1)
        # At k=1 renormalising would make every weight 1 and cut the
        # router off from the task's gradient (Switch keeps p at k=1).
        if self.normalize_top_k and top_k > 1:
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return weights, indices

    # --- routing ---------------------------------------------------------

    def route(self, x, top_k, training=None, mask=None, routing_ids=None):
        """The routing dict of the module docstring for tokens `x` `[T, d]`."""
        logits = self.compute_logits(x, training, routing_ids)
        probs = self.probabilities(logits)
        routing = {"logits": logits, "probs": probs, "losses": {}}
        if top_k is None:
            routing["weights"] = probs
        else:
            routing["weights"], routing["indices"] = self.select(probs, top_k)
            if training and self.selection_bias is not None:
                self._update_selection_bias(routing["indices"], mask)
        if training and self.dropout > 0:
            routing["weights"] = keras.random.dropout(
                routing["weights"], self.dropout, seed=self.seed_generator
            )
        return routing

    def _update_selection_bias(self, indices, mask):
        load = losses_lib.assignment_fraction(indices, self.num_experts, mask)
        step = self.bias_update_rate * ops.sign(1.0 / self.num_experts - load)
        self.selection_bias.assign(self.selection_bias + step)

    def call(
        self,
        inputs,
        training=None,
        routing=False,
        top_k=None,
        routing_mask=None,
        routing_ids=None,
    ):
        if routing:
            return self.route(
                inputs, top_k, training, routing_mask, routing_ids
            )
        return self.probabilities(
            self.compute_logits(inputs, training, routing_ids)
        )

    def compute_output_spec(self, inputs, routing=False, **kwargs):
        if routing:
            return super().compute_output_spec(inputs, routing=True, **kwargs)
        shape = tuple(inputs.shape[:-1]) + (self.num_experts,)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "use_bias": self.use_bias,
                "jitter": self.jitter,
                "dropout": self.dropout,
                "bias_update_rate": self.bias_update_rate,
                "seed": self.seed,
            }
        )
        config.update(
            _config.weight_options(self, _config.ROUTER_WEIGHT_OPTIONS)
        )
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SoftmaxGate(Gate):
    """Softmax router: gate probabilities sum to 1 over the experts.

    With top-k routing (k > 1) the k selected probabilities are
    renormalised to sum to 1, which equals a softmax over the k selected
    logits (as in Mixtral); at k = 1 the probability itself is the weight
    (as in Switch), so the router still learns from the task.
    Arguments as in `Gate`.

    Example:

    >>> gate = SoftmaxGate(num_experts=4)
    >>> gate(np.ones((2, 8), "float32")).shape
    (2, 4)
    """

    normalize_top_k = True

    def probabilities(self, logits):
        return ops.softmax(logits, axis=-1)


@keras.saving.register_keras_serializable(package="moe_keras")
class SigmoidGate(Gate):
    """Sigmoid router: each expert gets an independent weight in (0, 1).

    Experts do not compete for probability mass, so the dense mixture can
    switch several experts fully on at once; with top-k the selected
    sigmoid scores are used as they are (not renormalised). With
    `bias_update_rate > 0` this is DeepSeek-V3's auxiliary-loss-free
    router. Arguments as in `Gate`.

    Example:

    >>> gate = SigmoidGate(num_experts=4)
    >>> gate(np.ones((2, 8), "float32")).shape
    (2, 4)
    """

    def probabilities(self, logits):
        return ops.sigmoid(logits)

    def balance_distribution(self, probs):
        return probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), 1e-9)


@keras.saving.register_keras_serializable(package="moe_keras")
class NoisyTopKGate(SoftmaxGate):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural
    Networks").

    While training, learned input-dependent Gaussian noise
    `N(0, 1) * softplus(x @ W_noise)` is added to the logits before the
    top-k is taken, and the weights are a softmax over the k selected noisy
    logits. It adds the paper's two balancing losses: the importance loss
    `importance_weight * CV(sum_t g_t)^2` and the load loss
    `load_weight * CV(sum_t P(t, i))^2`, with `P` the smooth probability
    that expert i stays in the top-k under fresh noise. Other arguments as
    in `Gate`.

    Args:
        importance_weight: float >= 0. Defaults to 0.1.
        load_weight: float >= 0. Defaults to 0.1.
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

    def route(self, x, top_k, training=None, mask=None, routing_ids=None):
        if not training or top_k is None:
            return super().route(x, top_k, training, mask, routing_ids)
        clean = self.compute_logits(x, training)
        noise_std = ops.softplus(ops.matmul(x, self.noise_kernel)) + 1e-2
        noisy = clean + noise_std * keras.random.normal(
            ops.shape(clean), seed=self.seed_generator, dtype=clean.dtype
        )
        probs = ops.softmax(noisy, axis=-1)
        weights, indices = self.select(probs, top_k)
        if self.selection_bias is not None:
            self._update_selection_bias(indices, mask)
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


@keras.saving.register_keras_serializable(package="moe_keras")
class FeatureGate(SoftmaxGate):
    """A gate that weights every feature of an expert's output separately.

    The combine weight of expert e at feature f is
    `p_e(x) * sigmoid(x @ W_f)[e, f]`: the softmax routing probability
    `p_e` (used for selection and the balancing losses, as in
    `SoftmaxGate`) modulated per output feature, so
    `y = sum_e w_e * h_e` element-wise. `units` is filled in by the owning
    `MoE`. Other arguments as in `Gate`.
    """

    def __init__(self, num_experts=None, units=None, **kwargs):
        super().__init__(num_experts=num_experts, **kwargs)
        self.units = _validation.positive_int(units, "units", allow_none=True)

    def build_router(self, features):
        if self.units is None:
            raise ValueError(
                f"FeatureGate '{self.name}' needs `units` (the experts' "
                "output width); pass it or use the gate inside an `MoE`."
            )
        super().build_router(features)
        self.feature_kernel = self.add_weight(
            name="feature_kernel",
            shape=(features, self.num_experts * self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )

    def route(self, x, top_k, training=None, mask=None, routing_ids=None):
        routing = super().route(x, top_k, training, mask, routing_ids)
        per_feature = ops.sigmoid(ops.matmul(x, self.feature_kernel))
        per_feature = ops.reshape(
            per_feature, (-1, self.num_experts, self.units)
        )
        if top_k is not None:
            # [T, k, units]: the modulation of each chosen expert.
            per_feature = ops.take_along_axis(
                per_feature, routing["indices"][..., None], axis=1
            )
        routing["weights"] = routing["weights"][..., None] * per_feature
        return routing

    def get_config(self):
        config = super().get_config()
        config["units"] = self.units
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class StaticGate(SoftmaxGate):
    """A learned, input-independent weight per expert: `softmax(w)`.

    Every position gets the same mixture (and, with top-k, the same
    experts); useful as a baseline and for ensembles of experts. Arguments
    as in `Gate` (`use_bias`, `jitter` do not apply).
    """

    def build_router(self, features):
        self.kernel = self.add_weight(
            name="expert_logits",
            shape=(self.num_experts,),
            initializer="zeros",
            regularizer=self.kernel_regularizer,
        )
        self.bias = None

    def compute_logits(self, x, training=None, routing_ids=None):
        return ops.zeros((ops.shape(x)[0], 1), x.dtype) + self.kernel


class _FixedGate(Gate):
    """A router with no learned scores: it assigns experts by rule and
    weights the k chosen ones uniformly (1/k; 1/E for the dense mixture)."""

    learned = False

    def build_router(self, features):
        self.kernel = None
        self.bias = None

    def assign(self, x, top_k, training, routing_ids):
        """`[T, top_k]` int32 expert indices, distinct per position."""
        raise NotImplementedError

    def compute_logits(self, x, training=None, routing_ids=None):
        # Uniform scores: the standalone gate is a plain average.
        return ops.zeros((ops.shape(x)[0], self.num_experts), x.dtype)

    def probabilities(self, logits):
        return ops.softmax(logits, axis=-1)

    def route(self, x, top_k, training=None, mask=None, routing_ids=None):
        logits = self.compute_logits(x, training, routing_ids)
        routing = {"logits": logits, "losses": {}}
        if top_k is None:
            routing["probs"] = routing["weights"] = self.probabilities(logits)
            return routing
        indices = self.assign(x, top_k, training, routing_ids)
        routing["indices"] = indices
        routing["weights"] = ops.full(
            ops.shape(indices), 1.0 / top_k, "float32"
        )
        routing["probs"] = ops.mean(
            ops.one_hot(indices, self.num_experts), axis=1
        )
        return routing

    def _spread(self, first, top_k):
        """k distinct experts starting from `first` `[T]`."""
        offsets = ops.arange(top_k, dtype="int32")[None, :]
        return ops.mod(
            ops.cast(first, "int32")[:, None] + offsets, self.num_experts
        )


@keras.saving.register_keras_serializable(package="moe_keras")
class HashGate(_FixedGate):
    """Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse
    Models"): each token id always goes to the same experts, chosen by a
    fixed hash of the id; no router is learned. Call the `MoE` layer with
    `routing_ids=` (integer ids, one per position, e.g. the input token
    ids). Arguments as in `Gate`; `seed` picks the hash.
    """

    needs_ids = True

    def assign(self, x, top_k, training, routing_ids):
        if routing_ids is None:
            raise ValueError(
                f"HashGate '{self.name}' routes by token id: call the MoE "
                "layer with `routing_ids=` (one integer id per position)."
            )
        ids = ops.reshape(ops.cast(routing_ids, "int32"), (-1,))
        # A multiplicative hash modulo a prime, in int32 without overflow.
        prime = 32749
        salt = (self.seed or 0) % prime
        hashed = ops.mod(ops.mod(ids, prime) * 7703 + salt, prime)
        return self._spread(ops.mod(hashed, self.num_experts), top_k)


@keras.saving.register_keras_serializable(package="moe_keras")
class RoundRobinGate(_FixedGate):
    """Round-robin assignment: the t-th position of the (flattened) batch
    goes to expert `t mod E` (and the next k - 1). No router is learned.
    """

    def assign(self, x, top_k, training, routing_ids):
        positions = ops.arange(ops.shape(x)[0], dtype="int32")
        return self._spread(ops.mod(positions, self.num_experts), top_k)


@keras.saving.register_keras_serializable(package="moe_keras")
class RandomGate(_FixedGate):
    """Random assignment: every call draws k distinct experts per position
    uniformly at random (from the gate's seed generator). No router is
    learned; predictions vary from call to call unless that is wanted.
    """

    uses_randomness = True

    def assign(self, x, top_k, training, routing_ids):
        scores = keras.random.uniform(
            (ops.shape(x)[0], self.num_experts), seed=self.seed_generator
        )
        return top_k_indices(scores, top_k)


@keras.saving.register_keras_serializable(package="moe_keras")
class UniformGate(_FixedGate):
    """Uniform weighting: the dense mixture is the plain average of all
    experts (`top_k` must be None; use another fixed gate to assign)."""

    def assign(self, x, top_k, training, routing_ids):
        raise ValueError(
            "UniformGate weights all experts; it takes top_k=None."
        )


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertChoiceGate(SoftmaxGate):
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with
    Expert Choice Routing").

    Instead of each token picking k experts, each expert picks the `C`
    tokens that score it highest, `C = ceil(capacity_factor * tokens / E)`
    (the `MoE` layer's `capacity_factor`, on average how many experts each
    token gets). Load is balanced by construction, so no balancing loss is
    added; a token chosen by no expert gets zero output (the residual
    carries it). Use with `top_k=None`. Arguments as in `Gate`.
    """

    expert_choice = True

    def choose(self, probs, capacity, mask=None):
        """`(token_indices, weights)`, both `[E, C]`: the C tokens each
        expert takes and their gate probabilities for it."""
        scores = ops.transpose(probs)  # [E, T]
        if mask is not None:
            # Padding ranks below every real token (probabilities are >= 0).
            scores = ops.where(ops.cast(mask, "bool")[None, :], scores, -1.0)
        weights, tokens = ops.top_k(scores, capacity)
        weights = ops.maximum(weights, 0.0)
        return ops.cast(tokens, "int32"), weights


_GATES = {"softmax": SoftmaxGate, "sigmoid": SigmoidGate}


def get(identifier, num_experts, units=None):
    """A gate instance from a name, an instance or a serialized config."""
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        _validation.one_of(identifier, "gate", _GATES)
        return _GATES[identifier](num_experts=num_experts, name="gate")
    if not isinstance(identifier, Gate):
        raise TypeError(
            "`gate` must be 'softmax', 'sigmoid' or a `moe_keras.Gate` "
            f"instance; received gate={identifier!r}."
        )
    if identifier.num_experts is None:
        identifier.num_experts = num_experts
    elif identifier.num_experts != num_experts:
        raise ValueError(
            f"The gate has num_experts={identifier.num_experts} but the "
            f"layer has num_experts={num_experts}; they must match."
        )
    if isinstance(identifier, FeatureGate):
        if identifier.units is None:
            identifier.units = units
        elif identifier.units != units:
            raise ValueError(
                f"The FeatureGate has units={identifier.units} but the "
                f"layer has units={units}; they must match."
            )
    return identifier
