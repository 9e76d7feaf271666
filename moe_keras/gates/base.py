"""The router base class and the helpers every gate family shares."""

import inspect

import keras
from keras import ops

from moe_keras import _config
from moe_keras import _validation
from moe_keras import losses as losses_lib


def top_k_indices(scores, k):
    """Indices `[T, k]` int32 of each row's k largest scores, best first,
    the lower index first among ties.

    Written as k rounds of argmax-like reductions: the routers' k is
    small, and unlike the `top_k` op this lowers to plain reductions on
    every backend, so a model exported from JAX (a StableHLO `top_k` that
    TensorFlow 2.21 cannot load) serves in TensorFlow. The tie rule is
    explicit rather than left to `argmax` (whose choice among ties
    TensorFlow does not promise), so that a routing recorded on one
    backend replays on another.
    """
    num = ops.shape(scores)[-1]
    columns = ops.arange(num, dtype="int32")
    picked = []
    taken = ops.zeros_like(scores) > 0  # [T, E] bool: picked already
    for _ in range(k):
        first = ops.cast(ops.argmax(scores, axis=-1), "int32")  # [T]
        # The best score by a gather, not `max`, which fails on an empty
        # batch in TensorFlow.
        best = ops.take_along_axis(scores, first[:, None], axis=-1)
        # Not `scores == best` alone: in a row of -inf a picked column
        # (set to -inf) would tie with the rest and be picked again.
        candidate = ops.logical_and(scores == best, ops.logical_not(taken))
        # The candidates' columns are distinct, so their minimum is
        # unique: `argmin` finds the lowest without a tie to break.
        lowest = ops.cast(
            ops.argmin(ops.where(candidate, columns[None, :], num), axis=-1),
            "int32",
        )
        # A NaN row has no column equal to its max: its argmax, some
        # valid index, stands in (and NaN rows stay NaN).
        index = ops.where(ops.any(candidate, axis=-1), lowest, first)  # [T]
        picked.append(index)
        hit = columns[None, :] == index[:, None]
        taken = ops.logical_or(taken, hit)
        scores = ops.where(hit, ops.cast(float("-inf"), scores.dtype), scores)
    return ops.stack(picked, axis=-1)


def rate(value, name):
    """A float in [0, 1), such as a dropout or jitter rate."""
    value = _validation.non_negative_float(value, name)
    if value >= 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1); received {name}={value}."
        )
    return value


def optional_bool(value, name):
    """`True`, `False` or `None` (the gate's own default)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be True, False or None; received "
            f"{name}={value!r} (of type {type(value).__name__})."
        )
    return value


def broadcast_rows(x, row):
    """`row` `[..]` repeated for each of the `T` rows of `x` `[T, d]`."""
    return ops.zeros((ops.shape(x)[0],) + (1,) * len(row.shape), x.dtype) + row


class Gate(keras.layers.Layer):
    """Base class of routers: a learned linear router and top-k selection.

    It scores every expert at every position with `logits = x @ W (+ b)`
    (or, with `hidden_units`, through a one-hidden-layer MLP), turns the
    logits into probabilities (`probabilities`, which subclasses define)
    and selects the top-k experts. It runs in float32 whatever the global
    dtype policy: routing decisions and the softmax are sensitive to
    rounding, and the router is cheap.

    A subclass defines `probabilities(logits)`; one that scores experts
    otherwise overrides `build_router` and `compute_logits` too (see
    `StaticGate`), and one that routes otherwise overrides `route`, which
    returns the routing dict described below. The `MoE` layer only
    consumes that dict, so gates can be swapped without touching dispatch
    or experts.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        use_bias: bool, whether the router adds a learned bias to each
            expert's logit. Defaults to `False`.
        kernel_initializer: initializer of the router's kernels. Defaults
            to `"glorot_uniform"`.
        bias_initializer: initializer of the router's biases. Defaults to
            `"zeros"`.
        kernel_regularizer: regularizer of the router's kernels. Defaults
            to `None`.
        bias_regularizer: regularizer of the router's biases. Defaults to
            `None`.
        jitter: float in [0, 1). Switch Transformer router jitter: while
            training, the router's input is multiplied by noise drawn from
            `U(1 - jitter, 1 + jitter)`. Defaults to 0.
        dropout: float in [0, 1). Gate dropout: while training, each
            combine weight (a position's weight for one expert) is zeroed
            with this probability, the rest scaled by `1 / (1 - dropout)`.
            Defaults to 0.
        bias_update_rate: float >= 0. Auxiliary-loss-free load balancing
            (DeepSeek-V3, Wang et al. 2024): a per-expert bias, added to
            the scores for *selection only*, is moved by this step after
            every training batch with top-k routing, up for experts that
            got less than their share of assignments and down for those
            that got more. It is a non-trainable weight, saved with the
            model. Defaults to 0 (off).
        seed: int or None, seed of the gate's randomness (jitter, dropout,
            noise). Defaults to `None`.
        hidden_units: int or None. If set, the router is an MLP ("the
            teacher network is an MLP"):
            `logits = hidden_activation(x @ W_h + b_h) @ W (+ b)`.
            Defaults to `None` (a linear router).
        hidden_activation: activation of the router's hidden layer.
            Defaults to `"relu"`.
        input_norm: `None` or `"rms"`. `"rms"` divides the router's input
            by its root mean square over the features,
            `x / sqrt(mean(x^2) + input_norm_epsilon)`, with no learned
            scale, before the logits. Defaults to `None`.
        input_norm_epsilon: float > 0, the epsilon of `input_norm`.
            Defaults to `1e-6`.
        input_multiplier: float, a constant the router's input is
            multiplied by (after `input_norm`). Defaults to 1.0.
        use_input_scale: bool, whether the router's input is multiplied by
            a learned per-feature scale (the weight `input_scale`,
            `[features]`, initialised to ones) after `input_norm` and
            `input_multiplier`. Gemma 4's router is `input_norm="rms"`,
            `input_multiplier=features ** -0.5`, `use_input_scale=True`.
            Defaults to `False`.
        normalize_top_k: bool or None. Whether the k selected weights are
            renormalised to sum to 1. `None` (the default) keeps each
            gate's own rule (`SoftmaxGate`: for k > 1 only; `SigmoidGate`:
            never; `PerformanceGate`: always); `True` always (a softmax
            over the k selected logits, Shazeer et al. 2017; at k = 1 every
            weight is then 1); `False` never.
        expert_groups: int or None. DeepSeek-V3's group-limited routing
            (`n_group` in transformers): the experts split into this many
            equal groups of consecutive experts, each scored per position
            by the sum of its two highest selection scores (the scores
            top-k ranks by, `selection_bias` included; a group of one
            expert by that one), and the top-k is taken among the experts
            of the `top_groups` best groups only (ties to the lower group
            index). Given together with `top_groups`. It must divide
            `num_experts`, and `top_k` must not exceed
            `top_groups * num_experts / expert_groups` (a `ValueError` at
            build, or at the first routed call). Defaults to `None` (no
            groups).
        top_groups: int or None, how many groups each position may route
            to (`topk_group` in transformers), in `[1, expert_groups]`.
            Defaults to `None`.
        routed_scaling_factor: finite float > 0, a constant the combine
            weights are multiplied by, after any top-k renormalisation (the
            dense mixture's weights too); the probabilities the balancing
            losses read are left as they are (DeepSeek-V3). Defaults to
            1.0. Gates that do not score their inputs, and expert choice,
            take none of `expert_groups`, `top_groups` and
            `routed_scaling_factor` (a `ValueError`).
        **kwargs: base layer keyword arguments, such as `name`. The dtype
            policy defaults to `"float32"`.

    Call arguments:
        inputs: `(..., features)` floats; `(tokens, features)` with
            `routing=True`.
        training: bool or None. Jitter, dropout, noise and the
            selection-bias update act only while training.
        routing: bool. `False` (default): return the gate probabilities.
            `True`: return the routing dict.
        top_k: int or None, with `routing=True`: how many experts each
            position selects; `None` for the dense mixture.
        routing_mask: optional `(tokens,)` bool, with `routing=True`:
            padding positions, which the selection-bias update and the
            gate's own losses leave out.
        routing_ids: optional integer ids, one per position, for id-based
            gates (`HashGate`, `ClusterGate`); other gates ignore them.
        indices: optional `(tokens, top_k)` int32, with `routing=True` and
            `top_k`: the experts each position uses, replaying a recorded
            routing (see `moe_keras.RoutingReplayer`) instead of the
            gate's own choice. The combine weights are then the gate's
            probabilities of those experts, renormalised and scaled as its
            own choice would be, so the router still gets gradients.

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`: the gate probabilities. With `routing=True`,
        a dict: the router's `logits` and `probs`, `(tokens, num_experts)`
        float32; the combine `weights`, `(tokens, top_k)` (or
        `(tokens, num_experts)` with `top_k=None`); the selected `indices`,
        `(tokens, top_k)` int32, and the `scores` they were ranked by
        (`selection_scores`), `(tokens, num_experts)`, when `top_k` is
        set; and `losses`, the gate's own auxiliary losses by name.

    Example:

    >>> class ReluGate(Gate):
    ...     def probabilities(self, logits):
    ...         return keras.ops.relu(logits)
    >>> gate = ReluGate(num_experts=4)
    >>> x = np.ones((3, 8), "float32")
    >>> tuple(gate(x).shape)
    (3, 4)
    >>> routing = gate(x, routing=True, top_k=2)
    >>> sorted(routing)
    ['indices', 'logits', 'losses', 'probs', 'scores', 'weights']
    >>> tuple(routing["indices"].shape)
    (3, 2)
    """

    default_normalize_top_k = False  # renormalise the k selected (k > 1)
    learned = True  # a trained router: auxiliary losses apply to it
    expert_choice = False  # experts choose tokens (see ExpertChoiceGate)
    needs_ids = False  # routes by token id (see HashGate)
    uses_randomness = False  # draws random numbers on every call
    scores_inputs = True  # the scores are a function of the inputs
    ranks_by_score = True  # top-k is the best k of `selection_scores`

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
        hidden_units=None,
        hidden_activation="relu",
        normalize_top_k=None,
        input_norm=None,
        input_norm_epsilon=1e-6,
        input_multiplier=1.0,
        use_input_scale=False,
        expert_groups=None,
        top_groups=None,
        routed_scaling_factor=1.0,
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
        self.jitter = rate(jitter, "jitter")
        self.dropout = rate(dropout, "dropout")
        self.bias_update_rate = _validation.non_negative_float(
            bias_update_rate, "bias_update_rate"
        )
        self.seed = _validation.seed(seed)
        self.hidden_units = _validation.positive_int(
            hidden_units, "hidden_units", allow_none=True
        )
        self.input_norm = _validation.one_of(
            input_norm, "input_norm", (None, "rms")
        )
        self.input_norm_epsilon = _validation.positive_float(
            input_norm_epsilon, "input_norm_epsilon"
        )
        self.input_multiplier = _validation.finite_float(
            input_multiplier, "input_multiplier"
        )
        self.use_input_scale = bool(use_input_scale)
        self.expert_groups = _validation.positive_int(
            expert_groups, "expert_groups", allow_none=True
        )
        self.top_groups = _validation.positive_int(
            top_groups, "top_groups", allow_none=True
        )
        if (self.expert_groups is None) != (self.top_groups is None):
            raise ValueError(
                "`expert_groups` and `top_groups` go together (how many "
                "groups the experts split into, and how many of them each "
                "position may use): give both or neither; received "
                f"expert_groups={expert_groups}, top_groups={top_groups}."
            )
        if self.expert_groups is not None and (
            self.top_groups > self.expert_groups
        ):
            raise ValueError(
                f"`top_groups` must be at most `expert_groups`; received "
                f"top_groups={top_groups}, expert_groups={expert_groups}."
            )
        self.routed_scaling_factor = _validation.positive_float(
            routed_scaling_factor, "routed_scaling_factor"
        )
        # The group limit and the scaling act on a selection by learned
        # scores of the inputs: gates that assign by rule (or score no
        # input) or whose experts choose tokens would silently ignore them.
        selection_options = (
            ("expert_groups", self.expert_groups, None),
            ("top_groups", self.top_groups, None),
            ("routed_scaling_factor", self.routed_scaling_factor, 1.0),
        )
        if not self.scores_inputs:
            for option, value, unset in (
                ("hidden_units", self.hidden_units, None),
                ("use_bias", self.use_bias, False),
                ("jitter", self.jitter, 0.0),
                ("input_norm", self.input_norm, None),
                ("input_multiplier", self.input_multiplier, 1.0),
                ("use_input_scale", self.use_input_scale, False),
            ) + selection_options:
                if value != unset:
                    raise ValueError(
                        f"`{option}` acts on a router of the inputs, but "
                        f"{type(self).__name__} does not score its inputs; "
                        f"received {option}={value!r}."
                    )
        if self.expert_choice:
            for option, value, unset in selection_options:
                if value != unset:
                    raise ValueError(
                        f"`{option}` acts on each position's top-k choice "
                        f"of experts, which {type(self).__name__} does not "
                        "make (its experts choose their tokens); received "
                        f"{option}={value!r}."
                    )
        self.check_groups(self.num_experts)
        self.hidden_activation = keras.activations.get(hidden_activation)
        self.normalize_top_k = optional_bool(normalize_top_k, "normalize_top_k")
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
        self.check_groups(self.num_experts)
        features = _validation.feature_dim(input_shape, self.name)
        self.input_spec = _validation.features_spec(features)
        self.input_scale = None
        if self.use_input_scale:
            self.input_scale = self.add_weight(
                name="input_scale", shape=(features,), initializer="ones"
            )
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
        self.hidden_kernel = self.hidden_bias = None
        if self.hidden_units is not None:
            self.hidden_kernel = self.add_weight(
                name="hidden_kernel",
                shape=(features, self.hidden_units),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
            )
            self.hidden_bias = self.add_weight(
                name="hidden_bias",
                shape=(self.hidden_units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
            features = self.hidden_units
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

    def router_input(self, x, training):
        """The router's input: `input_norm`, `input_multiplier` and the
        learned `input_scale`, then Switch jitter while training."""
        if self.input_norm == "rms":
            mean_square = ops.mean(ops.square(x), axis=-1, keepdims=True)
            x = x * ops.rsqrt(mean_square + self.input_norm_epsilon)
        if self.input_multiplier != 1.0:
            x = x * self.input_multiplier
        if self.input_scale is not None:
            x = x * self.input_scale
        if training and self.jitter > 0:
            x = x * keras.random.uniform(
                ops.shape(x),
                1.0 - self.jitter,
                1.0 + self.jitter,
                seed=self.seed_generator,
                dtype=x.dtype,
            )
        return x

    # The name before the input transform joined the jitter.
    jittered = router_input

    def compute_logits(self, x, training=None, routing_ids=None):
        """Router logits `[T, E]`."""
        x = self.router_input(x, training)
        if self.hidden_kernel is not None:
            # [T, hidden]: the MLP router's hidden layer.
            x = self.hidden_activation(
                ops.matmul(x, self.hidden_kernel) + self.hidden_bias
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

    def normalizes(self, top_k):
        """Whether the `top_k` selected weights are renormalised."""
        if self.normalize_top_k is not None:
            return self.normalize_top_k
        # At k=1 renormalising would make every weight 1 and cut the
        # router off from the task's gradient (Switch keeps p at k=1).
        return self.default_normalize_top_k and top_k > 1

    def check_groups(self, num_experts=None, top_k=None):
        """Raises a `ValueError` where group-limited routing cannot apply:
        `num_experts` not a multiple of `expert_groups`, or `top_k` more
        than the experts of `top_groups` groups. `None` is not checked."""
        if self.expert_groups is None or num_experts is None:
            return
        groups = self.expert_groups
        if num_experts % groups:
            raise ValueError(
                f"`expert_groups={groups}` must divide the number of experts "
                f"into equal groups; received num_experts={num_experts}, "
                f"expert_groups={groups} (gate '{self.name}')."
            )
        if top_k is None:
            return
        eligible = self.top_groups * (num_experts // groups)
        if top_k > eligible:
            raise ValueError(
                f"`top_k={top_k}` is more than the experts a position may "
                f"use under `top_groups={self.top_groups}` of "
                f"`expert_groups={groups}`: top_groups * num_experts / "
                f"expert_groups = {self.top_groups} * {num_experts} / "
                f"{groups} = {eligible} (gate '{self.name}'). Lower `top_k` "
                "or raise `top_groups`."
            )

    def group_scores(self, scores):
        """`[T, expert_groups]`: each group's score, the sum of its two
        highest `scores` `[T, E]` (a group of one expert: that one)."""
        size = self.num_experts // self.expert_groups
        grouped = ops.reshape(scores, (-1, self.expert_groups, size))
        best = ops.max(grouped, axis=-1)  # [T, G]
        if size == 1:
            return best
        # The runner-up: the maximum once the first argmax is out (a tie
        # for first counts twice, as `top_k` would count it).
        first = ops.cast(ops.argmax(grouped, axis=-1), "int32")
        columns = ops.arange(size, dtype="int32")
        rest = ops.where(
            columns[None, None, :] == first[..., None],
            ops.cast(float("-inf"), scores.dtype),
            grouped,
        )
        return best + ops.max(rest, axis=-1)

    def limit_to_groups(self, scores):
        """`scores` `[T, E]` with every expert outside each position's
        `top_groups` best groups (by `group_scores`, the lower group index
        first among ties) set to `-inf`: DeepSeek-V3's group-limited
        routing."""
        groups = self.expert_groups
        if self.top_groups == groups:
            return scores  # every group is eligible
        # One row more than the batch: reductions over an empty batch fail
        # on some backends (torch's max), and the row is cut off after.
        tokens = ops.shape(scores)[0]
        padded = ops.concatenate(
            [scores, ops.zeros((1, self.num_experts), scores.dtype)], axis=0
        )
        chosen = top_k_indices(self.group_scores(padded), self.top_groups)
        # [T, M] -> [T, G] -> [T, E]: 1 for the experts of a chosen group.
        eligible = ops.max(ops.one_hot(chosen, groups), axis=1)[:tokens]
        eligible = ops.repeat(eligible, self.num_experts // groups, axis=-1)
        return ops.where(
            eligible > 0.5, scores, ops.cast(float("-inf"), scores.dtype)
        )

    def scale(self, weights):
        """The combine weights times `routed_scaling_factor`."""
        if self.routed_scaling_factor == 1.0:
            return weights
        return weights * self.routed_scaling_factor

    def selection_scores(self, probs):
        """`[T, E]`: the scores the top-k ranks experts by, `probs` plus
        any `selection_bias`, and `-inf` outside each position's
        `top_groups` under `expert_groups`."""
        scores = probs
        if self.selection_bias is not None:
            scores = probs + self.selection_bias
        if self.expert_groups is not None:
            scores = self.limit_to_groups(scores)
        return scores

    def select(self, probs, top_k, indices=None):
        """The `top_k` experts of each position and their combine weights,
        `(weights, indices)`, both `[T, top_k]`.

        With `indices` (`[T, top_k]` int32, a replayed routing) those are
        the experts: the weights are then their probabilities, renormalised
        and scaled as a choice of the gate's own would be, so the router
        still learns from them."""
        if indices is None:
            if self.expert_groups is not None:
                self.check_groups(self.num_experts, top_k)
            indices = top_k_indices(self.selection_scores(probs), top_k)
        weights = ops.take_along_axis(probs, indices, axis=-1)
        if self.normalizes(top_k):
            total = ops.sum(weights, axis=-1, keepdims=True)
            weights = weights / ops.maximum(total, 1e-30)
        return self.scale(weights), indices

    # --- routing ---------------------------------------------------------

    def route(
        self,
        x,
        top_k,
        training=None,
        mask=None,
        routing_ids=None,
        indices=None,
    ):
        """The routing dict of the package docstring for tokens `x`
        `[T, d]`; `indices` (`[T, top_k]` int32) replays a routing (see
        `select`)."""
        logits = self.compute_logits(x, training, routing_ids)
        probs = self.probabilities(logits)
        routing = {"logits": logits, "probs": probs, "losses": {}}
        if top_k is None:
            if self.expert_groups is not None:
                raise ValueError(
                    f"Gate '{self.name}' has `expert_groups`, which limits "
                    "each position's top-k choice to some groups of "
                    "experts: route with `top_k`; received top_k=None (the "
                    "dense mixture chooses no experts)."
                )
            routing["weights"] = self.scale(probs)
        else:
            # Read before the selection bias moves: what the top-k ranked
            # by, for an `MoE` that spills overflow down the ranking.
            routing["scores"] = self.selection_scores(probs)
            routing["weights"], routing["indices"] = self.select(
                probs, top_k, indices
            )
            # Under a replayed routing too: the bias then follows the load
            # the experts really get.
            if training and self.selection_bias is not None:
                self.update_selection_bias(routing["indices"], mask)
        if training and self.dropout > 0:
            routing["weights"] = keras.random.dropout(
                routing["weights"], self.dropout, seed=self.seed_generator
            )
        return routing

    def check_replay(self, top_k):
        """Raises where this gate cannot route with given `indices`."""
        if top_k is None or self.expert_choice:
            raise ValueError(
                f"Gate '{self.name}' was given `indices` to replay, but it "
                "makes no per-position top-k choice of experts here (the "
                "dense mixture, top_k=None, or experts choosing tokens): "
                "there is nothing to replay."
            )
        params = inspect.signature(self.route).parameters
        if "indices" not in params:
            raise ValueError(
                f"Gate '{self.name}' ({type(self).__name__}) routes with its "
                "own `route`, which takes no `indices`, so it cannot replay "
                "a recorded routing: accept `indices=None` in `route` and "
                "pass it on to `select`."
            )

    def update_selection_bias(self, indices, mask):
        load = losses_lib.assignment_fraction(indices, self.num_experts, mask)
        step = self.bias_update_rate * ops.sign(1.0 / self.num_experts - load)
        self.selection_bias.assign(self.selection_bias + step)

    # Kept for code written against the single-module `gates.py`.
    _update_selection_bias = update_selection_bias

    def call(
        self,
        inputs,
        training=None,
        routing=False,
        top_k=None,
        routing_mask=None,
        routing_ids=None,
        indices=None,
    ):
        if routing:
            extra = {}
            if indices is not None:
                self.check_replay(top_k)
                extra["indices"] = indices
            return self.route(
                inputs, top_k, training, routing_mask, routing_ids, **extra
            )
        return self.probabilities(
            self.compute_logits(inputs, training, routing_ids)
        )

    def compute_output_spec(self, inputs, routing=False, **kwargs):
        if routing:
            return super().compute_output_spec(inputs, routing=True, **kwargs)
        shape = tuple(inputs.shape[:-1]) + (self.num_experts,)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    @classmethod
    def from_config(cls, config):
        scores_inputs = cls.scores_inputs
        if not isinstance(scores_inputs, bool):  # decided per instance
            scores_inputs = config.get("input_dependent", True)
        if not scores_inputs:
            # Files saved before these options were rejected here carry
            # them; they never acted, so they load as they computed.
            config = {**config, "use_bias": False, "jitter": 0.0}
        return super().from_config(config)

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
                "hidden_units": self.hidden_units,
                "hidden_activation": keras.activations.serialize(
                    self.hidden_activation
                ),
                "normalize_top_k": self.normalize_top_k,
                "input_norm": self.input_norm,
                "input_norm_epsilon": self.input_norm_epsilon,
                "input_multiplier": self.input_multiplier,
                "use_input_scale": self.use_input_scale,
                "expert_groups": self.expert_groups,
                "top_groups": self.top_groups,
                "routed_scaling_factor": self.routed_scaling_factor,
            }
        )
        config.update(
            _config.weight_options(self, _config.ROUTER_WEIGHT_OPTIONS)
        )
        return config
