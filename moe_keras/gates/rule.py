"""Rule-based assignment: routers with no learned scores (hash, round-robin,
random, uniform)."""

import keras
from keras import ops

from moe_keras import _validation
from moe_keras.gates.base import Gate
from moe_keras.gates.base import top_k_indices


class _FixedGate(Gate):
    """A router with no learned scores: it assigns experts by rule and
    weights the k chosen ones uniformly (1/k; 1/E for the dense mixture).

    Gates whose rule depends on the call or on the position in the batch
    take `inference`: their own rule (the default) or `"hash"`, which at
    inference assigns each position by a fixed hash of its input (the top
    k of `x @ R`, with `R` a Gaussian projection drawn once from `seed`
    and saved with the model), so a prediction depends on that input
    only.
    """

    learned = False
    scores_inputs = False
    ranks_by_score = False  # assigns by rule: no next-best expert
    inference_modes = ()  # the first is the default

    def __init__(self, num_experts=None, inference=None, **kwargs):
        super().__init__(num_experts=num_experts, **kwargs)
        if not self.inference_modes:
            if inference is not None:
                raise ValueError(
                    f"{type(self).__name__} is deterministic already and "
                    f"takes no `inference` mode; received "
                    f"inference={inference!r}."
                )
            self.inference = None
        else:
            if inference is None:
                inference = self.inference_modes[0]
            self.inference = _validation.one_of(
                inference, "inference", self.inference_modes
            )
        self.projection = None

    def build_router(self, features):
        self.hidden_kernel = self.kernel = self.bias = None
        if self.inference == "hash":
            self.projection = self.add_weight(
                name="hash_projection",
                shape=(features, self.num_experts),
                initializer=keras.initializers.RandomNormal(seed=self.seed),
                trainable=False,
            )

    def assign(self, x, top_k, training, routing_ids):
        """`[T, top_k]` int32 expert indices, distinct per position."""
        raise NotImplementedError

    def compute_logits(self, x, training=None, routing_ids=None):
        # Uniform scores: the standalone gate is a plain average.
        return ops.zeros((ops.shape(x)[0], self.num_experts), x.dtype)

    def probabilities(self, logits):
        return ops.softmax(logits, axis=-1)

    def route(
        self,
        x,
        top_k,
        training=None,
        mask=None,
        routing_ids=None,
        indices=None,
    ):
        logits = self.compute_logits(x, training, routing_ids)
        routing = {"logits": logits, "losses": {}}
        if top_k is None:
            routing["probs"] = routing["weights"] = self.probabilities(logits)
            return routing
        # A replayed assignment (`indices`) is weighted 1/k as any other.
        if indices is None and not training and self.inference == "hash":
            # [T, E] -> [T, k]: a function of each position's input alone.
            indices = top_k_indices(ops.matmul(x, self.projection), top_k)
        elif indices is None:
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

    def get_config(self):
        config = super().get_config()
        if self.inference_modes:
            config["inference"] = self.inference
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class HashGate(_FixedGate):
    """Hash routing (Roller et al. 2021): experts fixed by a hash of a token id.

    From "Hash Layers For Large Sparse Models": each token id always goes
    to the same experts, chosen by a fixed hash of the id (the k experts
    from the hashed one on, each weighted `1 / k`); no router is learned.
    Call the `MoE` layer with `routing_ids=` (integer ids, one per
    position, e.g. the input token ids). For learned weights per id
    (cluster), see `ClusterGate`.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        inference: must be `None`: the assignment is deterministic already
            (a `ValueError` otherwise).
        **kwargs: `seed` (int or None, default `None`) picks the hash, and
            base layer keyword arguments such as `name`. Nothing is
            learned: `use_bias`, `jitter` and `hidden_units` must keep their
            defaults (a `ValueError` otherwise), and the other arguments of
            `Gate` have no effect.

    Input shape:
        `(tokens, features)`, with `routing_ids` of shape `(tokens,)` when
        routing.

    Output shape:
        `(tokens, num_experts)`: equal probabilities `1 / num_experts`. With
        `routing=True` and `top_k`, the routing dict of `Gate`, with the
        assigned `indices` and weights `1 / top_k`.

    Example:

    >>> gate = HashGate(num_experts=4)
    >>> ids = np.array([7, 3, 7])
    >>> routing = gate(np.ones((3, 5), "float32"), routing=True, top_k=1,
    ...                routing_ids=ids)
    >>> keras.ops.convert_to_numpy(routing["indices"]).tolist()
    [[0], [1], [0]]
    >>> layer = MoE(4, 8, gate=HashGate(seed=1), top_k=2)
    >>> x, ids = np.ones((6, 5), "float32"), np.arange(6)
    >>> tuple(layer(x, routing_ids=ids).shape)
    (6, 8)
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
    """Round-robin assignment: position t goes to expert `t mod E`.

    The t-th position of the (flattened) batch goes to expert `t mod E`
    and the next k - 1, each weighted `1 / k`. No router is learned.

    A position's experts depend on where it sits in the batch, so by
    default a prediction changes with the batch it is in.
    `inference="hash"` assigns each position at inference by a fixed hash
    of its input instead (the top k of `x @ R`, with `R` a Gaussian
    projection drawn once from `seed` and saved with the model), so a
    prediction depends on that input only; training keeps round-robin.
    The default stays `"position"` so models saved before this option load
    unchanged.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        inference: `"position"` or `"hash"`, the assignment at inference.
            Defaults to `None`, which means `"position"`.
        **kwargs: `seed` (int or None, default `None`) draws the projection
            of `inference="hash"`, and base layer keyword arguments such as
            `name`. Nothing is learned: `use_bias`, `jitter` and
            `hidden_units` must keep their defaults (a `ValueError`
            otherwise), and the other arguments of `Gate` have no effect.

    Input shape:
        `(tokens, features)`.

    Output shape:
        `(tokens, num_experts)`: equal probabilities `1 / num_experts`. With
        `routing=True` and `top_k`, the routing dict of `Gate`, with the
        assigned `indices` and weights `1 / top_k`.

    Example:

    >>> gate = RoundRobinGate(num_experts=3)
    >>> routing = gate(np.ones((4, 5), "float32"), routing=True, top_k=2)
    >>> keras.ops.convert_to_numpy(routing["indices"]).tolist()
    [[0, 1], [1, 2], [2, 0], [0, 1]]
    >>> layer = MoE(4, 8, gate=RoundRobinGate(inference="hash"), top_k=2)
    >>> tuple(layer(np.ones((6, 5), "float32")).shape)
    (6, 8)
    """

    inference_modes = ("position", "hash")

    def assign(self, x, top_k, training, routing_ids):
        positions = ops.arange(ops.shape(x)[0], dtype="int32")
        return self._spread(ops.mod(positions, self.num_experts), top_k)


@keras.saving.register_keras_serializable(package="moe_keras")
class RandomGate(_FixedGate):
    """Random assignment: k distinct experts per position, drawn every call.

    Every call draws k distinct experts per position uniformly at random
    (from the gate's seed generator), each weighted `1 / k`. No router is
    learned.

    By default inference draws too, so predictions vary from call to call
    (an ensemble over random routings, if that is wanted).
    `inference="hash"` makes inference deterministic: each position goes
    to the experts a fixed hash of its input picks (the top k of `x @ R`,
    with `R` a Gaussian projection drawn once from `seed` and saved with
    the model), so the same input always gets the same prediction,
    whatever the call or batch; training keeps drawing. The default stays
    `"random"` so models saved before this option load unchanged.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        inference: `"random"` or `"hash"`, the assignment at inference.
            Defaults to `None`, which means `"random"`.
        **kwargs: `seed` (int or None, default `None`) seeds the draws and
            the projection of `inference="hash"`, and base layer keyword
            arguments such as `name`. Nothing is learned: `use_bias`,
            `jitter` and `hidden_units` must keep their defaults (a
            `ValueError` otherwise), and the other arguments of `Gate` have
            no effect.

    Input shape:
        `(tokens, features)`.

    Output shape:
        `(tokens, num_experts)`: equal probabilities `1 / num_experts`. With
        `routing=True` and `top_k`, the routing dict of `Gate`, with the
        assigned `indices` and weights `1 / top_k`.

    Example:

    >>> gate = RandomGate(num_experts=3, seed=0, inference="hash")
    >>> x = np.ones((4, 5), "float32")
    >>> def experts():
    ...     routing = gate(x, routing=True, top_k=1)
    ...     return keras.ops.convert_to_numpy(routing["indices"])
    >>> bool((experts() == experts()).all())  # the same, call after call
    True
    >>> layer = MoE(4, 8, gate=RandomGate(seed=0, inference="hash"), top_k=2)
    >>> tuple(layer(np.ones((6, 5), "float32")).shape)
    (6, 8)
    """

    uses_randomness = True
    inference_modes = ("random", "hash")

    def assign(self, x, top_k, training, routing_ids):
        scores = keras.random.uniform(
            (ops.shape(x)[0], self.num_experts), seed=self.seed_generator
        )
        return top_k_indices(scores, top_k)


@keras.saving.register_keras_serializable(package="moe_keras")
class UniformGate(_FixedGate):
    """Uniform weighting: the dense mixture is the plain average of experts.

    Every expert gets the weight `1 / num_experts` at every position. It
    takes `top_k=None` (the `MoE` layer raises a `ValueError` otherwise);
    use `HashGate`, `RoundRobinGate` or `RandomGate` to assign k experts by
    rule.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        inference: must be `None`: the weights are deterministic already
            (a `ValueError` otherwise).
        **kwargs: base layer keyword arguments such as `name`. Nothing is
            learned: `use_bias`, `jitter` and `hidden_units` must keep their
            defaults (a `ValueError` otherwise), and the other arguments of
            `Gate` have no effect.

    Input shape:
        `(tokens, features)`.

    Output shape:
        `(tokens, num_experts)`: equal probabilities `1 / num_experts`, also
        the combine `weights` of the routing dict with `routing=True`.

    Example:

    >>> gate = UniformGate(num_experts=4)
    >>> keras.ops.convert_to_numpy(gate(np.ones((1, 5), "float32"))).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    >>> layer = MoE(4, 8, gate=UniformGate())
    >>> tuple(layer(np.ones((6, 5), "float32")).shape)
    (6, 8)
    """

    def assign(self, x, top_k, training, routing_ids):
        raise ValueError(
            "UniformGate weights all experts; it takes top_k=None."
        )
