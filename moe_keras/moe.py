"""The Mixture-of-Experts layer: a gate, an expert bank and a dispatch."""

import keras
from keras import ops

from moe_keras import _config
from moe_keras import _replay_scope
from moe_keras import _spill as spill_lib
from moe_keras import _validation
from moe_keras import dispatch as dispatch_lib
from moe_keras import distribution as distribution_lib
from moe_keras import gates as gates_lib
from moe_keras import group_dispatch
from moe_keras import kernels
from moe_keras import losses
from moe_keras import statistics as statistics_lib
from moe_keras import voting
from moe_keras.experts import DenseExperts
from moe_keras.experts import ExpertList
from moe_keras.experts import check_gated

_DISPATCH_MODES = ("auto", "dense", "sparse")
_DROP_POLICIES = ("position", "probability")
_OVERFLOWS = ("drop", "spill")
_SPILL_ROUNDS = 2


@keras.saving.register_keras_serializable(package="moe_keras")
class MoE(keras.layers.Layer):
    """Mixture-of-Experts layer: `y = sum_i g_i(x) * expert_i(x)`.

    A router (`gate`) scores the experts at every position. With
    `top_k=None` the output is the dense mixture of all experts weighted by
    the gate, the classic form. With `top_k=k` each position goes to its k
    best experts only.

    How the experts are run is the `dispatch`:

    - `"dense"` computes every expert on every position and weights the
      results (zero weight off the top-k): exact, and cheapest for few
      experts.
    - `"sparse"` places each position's k choices into per-expert buffers
      of `C = ceil(capacity_factor * tokens * k / num_experts)` slots and
      runs the experts on those buffers only, so each position pays for k
      experts, not all. Every shape is static, so it compiles under XLA
      (`jit_compile=True`, JAX). Choices beyond an expert's capacity are
      dropped: they contribute zero (a residual connection around the layer
      carries the position through), and the fraction dropped is the
      statistic `dropped_fraction` (see `RoutingMetrics`).
      With `capacity_factor=None` the sparse dispatch is dropless: the
      assignments are sorted by expert and nothing is dropped. Where a
      grouped-matmul kernel applies (see `grouped_matmul`: JAX on an NVIDIA
      Hopper GPU or a TPU, torch on CUDA) each projection is then one
      grouped matmul over the sorted rows; elsewhere (CPU, TensorFlow, other
      GPUs) the rows are cut into fixed-size blocks, each expert padded to
      whole blocks (the padding bounded by `num_experts * block` rows), which
      is the faster form on a CPU.
    - `"auto"` picks sparse for top-k routing with `top_k < num_experts`
      (and for expert-choice gates), dense otherwise.

    Like `Dense`, the layer keeps a non-finite input (or an overflow inside
    an expert) in its own position's output: dropped assignments, empty
    buffer slots and masked positions are selected away, never multiplied
    by 0, so they come out exactly 0 whatever another token holds.

    While training, the layer adds the Switch load-balancing loss and the
    ST-MoE router z-loss (`moe_keras.losses`) with `add_loss`, plus any
    loss of its gate (e.g. `NoisyTopKGate`'s) and, when asked for,
    DeepSeek-V3's sequence-wise balance loss. The router computes in
    float32 under mixed precision; the experts follow the layer's policy.
    `model.quantize("int8" | "int4" | "float8")` quantizes the stacked
    experts (routed and shared, see `DenseExperts`); the router stays
    float32, and a saved quantized layer loads back quantized.

    The layer keeps a record of its routing (`layer.statistics`, a
    `RoutingStatistics`: dropped fraction, load imbalance, router entropy,
    the auxiliary losses, each expert's load and what it shows (dead
    experts, load spread), and which experts tokens choose together), as
    non-trainable variables updated in `call`, like `BatchNormalization`'s
    moving statistics. It changes nothing that `fit`, `evaluate` or
    `train_on_batch` return; pass `moe_keras.RoutingMetrics()` as a
    callback to see it in the logs.

    Args:
        num_experts: int, number of experts. Defaults to `None`, allowed
            only with `experts`, whose length it must then match.
        units: int, output features of every expert and of the layer.
            Defaults to `None`, allowed only with `experts` (whose output
            width it then is).
        experts: optional list of Keras layers to use as the experts, each
            mapping `(tokens, features)` to `(tokens, units)` (an
            `ExpertList`). Defaults to `None`: stacked `DenseExperts` made
            from `num_experts`, `units`, `hidden_units` and the options
            below.
        hidden_units: int or None. If set, each expert is a two-layer MLP
            `units(hidden) -> activation -> units`. Defaults to `None` (one
            projection).
        activation: activation of the experts' hidden layer (or of their
            output without `hidden_units`). Defaults to `None` (linear).
        gated: `False`, `True` for GLU experts (SwiGLU with
            `activation="silu"`), or `"clamped_swiglu"` for GPT-OSS's
            clamped SwiGLU (see `DenseExperts`). Defaults to `False`.
        glu_alpha: float > 0, the `alpha` of `"clamped_swiglu"`. Defaults
            to `1.702`.
        glu_limit: float > 0, the `limit` of `"clamped_swiglu"`. Defaults
            to `7.0`.
        use_bias: bool, biases in the experts. Defaults to `True`.
        use_output_scale: bool, a learned scalar per routed expert that
            multiplies its output (Gemma 4). Defaults to `False`.
        num_shared_experts: int >= 0, experts every position passes through,
            added to the routed mixture: `y = shared(x) + sum_i g_i e_i(x)`
            (DeepSeekMoE; DeepSpeed's residual MoE). Needs `units`.
            Defaults to 0.
        shared_hidden_units: int or None, hidden size of the shared experts.
            Defaults to `None`: `hidden_units`.
        gate: `"softmax"`, `"sigmoid"`, a gate function (a callable on the
            router's `[tokens, experts]` logits, which makes an
            `ActivationGate`) or a `moe_keras.Gate` instance. Defaults to
            `"softmax"`.
        top_k: int in `[1, num_experts]`, or `None` for the dense mixture.
            Defaults to `None`.
        dispatch: `"auto"`, `"dense"` or `"sparse"`. Defaults to `"auto"`.
        capacity_factor: finite float > 0, or `None` for dropless sparse
            dispatch. Defaults to 1.25 (Switch Transformer).
        eval_capacity_factor: finite float > 0 used when not training.
            Defaults to `None`: dropless inference, so predictions never
            depend on the rest of the batch (expert choice and expert
            lists, which have no dropless form, use
            `max(capacity_factor, 2.0)`).
        grouped_matmul: how dropless dispatch runs the experts, one of
            `moe_keras.kernels.IMPLEMENTATIONS`. `"auto"` (default): JAX's
            Pallas Mosaic GPU kernels on NVIDIA Hopper (bfloat16
            or float16 experts, sizes multiples of 64), JAX's Megablox
            kernels on a TPU, torch's `grouped_mm` on CUDA (bfloat16), and
            otherwise (CPU, TensorFlow, other GPUs, a Keras distribution
            over several devices) `"blocks"`, the padded block layout.
            Naming one forces it, for debugging and
            benchmarks (`"ragged_dot"`: XLA's `jax.lax.ragged_dot`;
            `"reference"`: one matmul per expert, any backend); one that
            cannot run here is a `ValueError` at build naming what is
            missing. Stacked experts only; ignored under `token_groups`
            or a distribution's expert layout, which use capacity buffers.
        token_groups: int or None. With an int G the sparse top-k dispatch
            splits the tokens of a batch into G equal groups (the last
            padded), each routed alone with its own capacity
            `ceil(capacity_factor * (tokens / G) * k / E)` (GShard's
            groups). `None` (default): one group, or under a Keras
            distribution one group per device, laid out for expert
            parallelism (see `moe_keras.get_layout_map`); set G to the
            device count to reproduce a sharded run on one device.
        drop_policy: which assignments an expert keeps when its capacity
            overflows. `"position"` (default): first choices claim slots
            before second choices, then token order (Switch, GShard).
            `"probability"`: the assignments with the highest router
            weight keep the slots, first and second choices pooled, ties
            in the `"position"` order (DeepSpeed's `drop_policy='probs'`,
            V-MoE's priority routing); with `token_groups`, within each
            group. Matters only with a capacity; dropless dispatch ignores
            it. Needs `top_k` and a token-choice gate.
        overflow: what becomes of an assignment the capacity plan (and
            `drop_policy`) left without a slot. `"drop"` (default): it is
            dropped. `"spill"`: it moves to the position's next-ranked
            expert that still has room, ranked by the scores the gate's
            top-k ranked by (its probabilities, plus any selection bias,
            within its `top_groups` under `expert_groups`), skipping the
            experts the position already uses. In each of `spill_rounds`
            rounds every position with an assignment left over offers its
            first one to its next expert; an expert takes offers while it
            has slots, in the `drop_policy` order of the assignments, and
            nothing placed is ever displaced (with `token_groups`, within
            each group). After the rounds, what found no room is dropped,
            and only that counts in `dropped_fraction`. Each assignment's
            combine weight is then the gate's probability of the expert it
            ends at, renormalised over the position's k assignments (those
            dropped included, at their own expert) and scaled as the gate
            does, so with nothing to spill the output is `"drop"`'s. Needs
            `top_k`, a token-choice gate that ranks experts by scores
            (not `HashGate`, `RoundRobinGate`, `RandomGate`), without
            per-feature weights or gate dropout. Without a capacity
            (dropless, the default at inference) and with dense dispatch
            nothing overflows, and it changes nothing.
        spill_rounds: int >= 1, with `overflow="spill"`: how many further
            experts a position may try, at most `num_experts - top_k`.
            Each round costs a sort of the tokens. Defaults to 2.
        load_balance_weight: float >= 0, weight of the load-balancing loss.
            Defaults to 0.01.
        global_load_balance: bool. Under a `tf.distribute` strategy
            (`MirroredStrategy`), count the balance loss's expert
            fractions `f` over the global batch, summed across replicas
            (one all-reduce of E + 2 numbers per layer and step), instead
            of each replica's own; each replica keeps its own `P`,
            weighted by its share of the real (unmasked) tokens, so the
            mean of the replicas' gradients is that of the global batch's
            loss. Defaults to `False` (per replica, as Switch's per-core
            groups). Without such a strategy the loss already counts the
            whole batch, and this changes nothing.
        z_loss_weight: float >= 0, weight of the router z-loss.
            Defaults to 0.001.
        sequence_balance_weight: float >= 0, weight of DeepSeek-V3's
            complementary sequence-wise balance loss
            (`moe_keras.losses.sequence_balance_loss`): the balance of
            each sequence's own top-k choices, read from the gate's
            distribution over experts, averaged over the sequences. A
            sequence is the positions of one sample: the inputs need a
            sequence axis, `(batch, seq, ..., features)`. It needs `top_k`
            and a learned token-choice gate (a `ValueError` otherwise).
            Defaults to 0 (off).
        routing_statistics: bool, keep `layer.statistics`. Defaults to
            `True`; `False` makes no variables and costs nothing.
        log_expert_load: bool, with `RoutingMetrics`, also log each
            expert's load (`<name>_expert_load_<i>`). Defaults to `False`.
        kernel_initializer: initializer of the experts' kernels. Defaults
            to `"glorot_uniform"`, scaled so that each expert starts as a
            `Dense` layer of its size would.
        bias_initializer: initializer of the experts' biases. Defaults to
            `"zeros"`.
        kernel_regularizer: regularizer of the experts' kernels. Defaults
            to `None`.
        bias_regularizer: regularizer of the experts' biases. Defaults to
            `None`.
        kernel_constraint: constraint on the experts' kernels. Defaults to
            `None`.
        bias_constraint: constraint on the experts' biases. Defaults to
            `None`.
        combine: `"weighted"` (the default: `sum_i g_i * expert_i(x)`) or
            `"vote"`: at inference each classifier expert votes for its
            argmax class, counted with the gate's weights, and the
            output is each class's share of the votes (its argmax is
            the majority's class; see `moe_keras.voting`). A vote has
            no gradient: training with it is an error.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: `(batch, ..., features)` floats.
        training: bool or None, whether the call is for training (losses,
            training capacity, the gate's noise and dropout).
        mask: optional `(batch, ...)` Keras mask.
        routing_ids: optional `(batch, ...)` integer ids per position, for
            id-based gates (`HashGate`, `ClusterGate`).
        router_inputs: optional floats of the same shape as `inputs` that
            the gate scores instead of `inputs`, while the experts still
            run on `inputs`: for a router that sees the position before a
            normalisation only the experts get (Gemma 4).
        expert_indices: optional integers, the inputs' shape with the
            features replaced by `top_k`: the experts each position uses,
            replaying a recorded routing instead of the gate's choice
            (top-k token-choice routing only). The combine weights are
            the router's for those experts, so it still gets gradients.
            `moe_keras.RoutingReplayer` passes them to every `MoE` layer
            of a model; `moe_keras.RoutingRecorder` records them.

    Input shape:
        `(batch, ..., features)`, any rank >= 2; routing is per position.
        A Keras mask `(batch, ...)` is honoured: masked positions are not
        routed, take no capacity, count in no loss or statistic, output
        zeros.

    Output shape:
        `(batch, ..., units)`.

    Example:

    >>> layer = MoE(num_experts=4, units=8, top_k=2)
    >>> x = np.ones((2, 3, 5), "float32")  # (batch, sequence, features)
    >>> tuple(layer(x).shape)
    (2, 3, 8)
    >>> layer.sparse  # top-2 of 4 experts: the sparse dispatch
    True

    In a model, with a sigmoid router and the dense mixture:

    >>> model = keras.Sequential([
    ...     keras.Input((5,)),
    ...     MoE(num_experts=4, units=8, gate="sigmoid"),
    ... ])
    >>> tuple(model(np.zeros((6, 5), "float32")).shape)
    (6, 8)
    """

    def __init__(
        self,
        num_experts=None,
        units=None,
        *,
        experts=None,
        hidden_units=None,
        activation=None,
        gated=False,
        glu_alpha=1.702,
        glu_limit=7.0,
        use_bias=True,
        use_output_scale=False,
        num_shared_experts=0,
        shared_hidden_units=None,
        gate="softmax",
        top_k=None,
        dispatch="auto",
        capacity_factor=1.25,
        eval_capacity_factor=None,
        grouped_matmul="auto",
        token_groups=None,
        drop_policy="position",
        overflow="drop",
        spill_rounds=_SPILL_ROUNDS,
        load_balance_weight=0.01,
        global_load_balance=False,
        z_loss_weight=0.001,
        sequence_balance_weight=0.0,
        routing_statistics=True,
        log_expert_load=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        combine="weighted",
        **kwargs,
    ):
        if "name" not in kwargs:
            kwargs["name"] = f"moe_{keras.backend.get_uid('moe')}"
        super().__init__(**kwargs)
        expert_kwargs = dict(
            activation=activation,
            gated=gated,
            glu_alpha=glu_alpha,
            glu_limit=glu_limit,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
        )
        if experts is None:
            if num_experts is None or units is None:
                raise ValueError(
                    "`MoE` needs `num_experts` and `units` (or a list of "
                    f"`experts`); received num_experts={num_experts}, "
                    f"units={units}."
                )
            self.experts = DenseExperts(
                num_experts=num_experts,
                units=units,
                hidden_units=hidden_units,
                use_output_scale=use_output_scale,
                name="experts",
                **expert_kwargs,
            )
        else:
            if use_output_scale:
                raise ValueError(
                    "`use_output_scale` adds a weight to stacked experts; "
                    "with `experts` given as layers, scale inside them."
                )
            self.experts = ExpertList(experts, name="experts")
            if (
                num_experts is not None
                and num_experts != self.experts.num_experts
            ):
                raise ValueError(
                    f"`num_experts={num_experts}` does not match the "
                    f"{self.experts.num_experts} layers given as `experts`."
                )
        self.num_experts = _validation.positive_int(
            self.experts.num_experts, "num_experts"
        )
        self.units = _validation.positive_int(units, "units", allow_none=True)
        self.hidden_units = _validation.positive_int(
            hidden_units, "hidden_units", allow_none=True
        )
        self.activation = keras.activations.get(activation)
        self.gated = check_gated(gated, self.activation)
        self.glu_alpha = _validation.positive_float(glu_alpha, "glu_alpha")
        self.glu_limit = _validation.positive_float(glu_limit, "glu_limit")
        self.use_bias = bool(use_bias)
        self.use_output_scale = bool(use_output_scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

        self.top_k = _validation.positive_int(top_k, "top_k", allow_none=True)
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(
                f"`top_k` must be in [1, num_experts={self.num_experts}]; "
                f"received top_k={top_k}."
            )
        self.dispatch = _validation.one_of(
            dispatch, "dispatch", _DISPATCH_MODES
        )
        self.capacity_factor = _validation.positive_float(
            capacity_factor, "capacity_factor", allow_none=True
        )
        self.eval_capacity_factor = _validation.positive_float(
            eval_capacity_factor, "eval_capacity_factor", allow_none=True
        )
        self.grouped_matmul = _validation.one_of(
            grouped_matmul, "grouped_matmul", kernels.IMPLEMENTATIONS
        )
        if isinstance(self.experts, ExpertList) and grouped_matmul not in (
            "auto",
            "blocks",
        ):
            raise ValueError(
                f"`grouped_matmul={grouped_matmul!r}` runs stacked expert "
                "weights; a list of `experts` has none. Leave it 'auto'."
            )
        self._grouped_matmul = "blocks"  # resolved in `build`
        self.token_groups = _validation.positive_int(
            token_groups, "token_groups", allow_none=True
        )
        self.drop_policy = _validation.one_of(
            drop_policy, "drop_policy", _DROP_POLICIES
        )
        self.overflow = _validation.one_of(overflow, "overflow", _OVERFLOWS)
        self.spill_rounds = _validation.positive_int(
            spill_rounds, "spill_rounds"
        )
        self.load_balance_weight = _validation.non_negative_float(
            load_balance_weight, "load_balance_weight"
        )
        self.global_load_balance = bool(global_load_balance)
        self.z_loss_weight = _validation.non_negative_float(
            z_loss_weight, "z_loss_weight"
        )
        self.sequence_balance_weight = _validation.non_negative_float(
            sequence_balance_weight, "sequence_balance_weight"
        )
        self.gate = gates_lib.get(gate, self.num_experts, self.units)
        self.combine = combine
        self._check_routing()

        self.num_shared_experts = _validation.non_negative_int(
            num_shared_experts, "num_shared_experts"
        )
        self.shared_hidden_units = _validation.positive_int(
            shared_hidden_units, "shared_hidden_units", allow_none=True
        )
        self.shared_experts = None
        if self.num_shared_experts:
            if self.units is None:
                raise ValueError("Shared experts need `units`.")
            self.shared_experts = DenseExperts(
                num_experts=self.num_shared_experts,
                units=self.units,
                hidden_units=self.shared_hidden_units or self.hidden_units,
                name="shared_experts",
                **expert_kwargs,
            )

        self.routing_statistics = bool(routing_statistics)
        self.log_expert_load = bool(log_expert_load)
        self.statistics = None
        self.supports_masking = True

    def _check_routing(self):
        if (
            self.dispatch == "sparse"
            and self.top_k is None
            and not self.gate.expert_choice
        ):
            raise ValueError(
                "`dispatch='sparse'` routes each position to its top-k "
                "experts, so it needs `top_k`; received top_k=None. Use "
                "dispatch='dense' (or 'auto') for the dense mixture."
            )
        if self.gate.expert_choice:
            if self.top_k is not None:
                raise ValueError(
                    "With an ExpertChoiceGate the experts choose tokens: pass "
                    f"top_k=None (received top_k={self.top_k}) and set how "
                    "many tokens each expert takes with `capacity_factor`."
                )
            if self.capacity_factor is None:
                raise ValueError(
                    "An ExpertChoiceGate needs a `capacity_factor` (tokens "
                    "per expert = capacity_factor * tokens / num_experts)."
                )
        if self.drop_policy != "position" and (
            self.gate.expert_choice or self.top_k is None
        ):
            raise ValueError(
                "`drop_policy` picks which top-k assignments an overflowing "
                "expert drops; this layer makes none (it needs top_k and a "
                "token-choice gate). Leave drop_policy='position'; received "
                f"drop_policy={self.drop_policy!r}."
            )
        self._check_overflow()
        if self.token_groups is not None and (
            self.gate.expert_choice or not self.sparse
        ):
            raise ValueError(
                "`token_groups` splits the tokens of the sparse top-k "
                "dispatch into groups with their own capacity; this layer "
                "does not run it (it needs top_k, a token-choice gate and "
                f"dispatch 'auto' or 'sparse'). Received token_groups="
                f"{self.token_groups}."
            )
        if self.gate.expert_groups is not None:
            self.gate.check_groups(self.num_experts, self.top_k)
            if self.top_k is None:
                raise ValueError(
                    "The gate's `expert_groups` limits each position's "
                    "top-k choice to some groups of experts, so it needs "
                    "`top_k`; received top_k=None."
                )
        if self.sequence_balance_weight > 0:
            if self.gate.expert_choice:
                raise ValueError(
                    "`sequence_balance_weight` balances each sequence's "
                    "top-k choices of experts, which an ExpertChoiceGate "
                    "does not make (its experts choose tokens, balanced by "
                    "construction); received sequence_balance_weight="
                    f"{self.sequence_balance_weight}."
                )
            if self.top_k is None:
                raise ValueError(
                    "`sequence_balance_weight` balances each sequence's "
                    "top-k choices of experts, so it needs `top_k`; "
                    "received top_k=None and sequence_balance_weight="
                    f"{self.sequence_balance_weight}."
                )
            if not self.gate.learned:
                raise ValueError(
                    "`sequence_balance_weight` trains a learned router; "
                    f"{type(self.gate).__name__} assigns experts without "
                    "one. Received sequence_balance_weight="
                    f"{self.sequence_balance_weight}."
                )
        if (
            isinstance(self.gate, gates_lib.UniformGate)
            and self.top_k is not None
        ):
            raise ValueError(
                "UniformGate weights every expert equally and takes "
                "top_k=None; use HashGate, RoundRobinGate or RandomGate to "
                "assign k experts by rule."
            )
        if (
            isinstance(self.experts, ExpertList)
            and self.sparse
            and self.capacity_factor is None
            and not self.gate.expert_choice
        ):
            raise ValueError(
                "Dropless dispatch (capacity_factor=None) needs stacked "
                "expert weights; with a list of `experts` set a "
                "`capacity_factor` or use dispatch='dense'."
            )

    def _check_overflow(self):
        if self.overflow == "drop":
            if self.spill_rounds != _SPILL_ROUNDS:
                raise ValueError(
                    "`spill_rounds` bounds how far overflow spills, which "
                    "needs overflow='spill'; received overflow='drop', "
                    f"spill_rounds={self.spill_rounds}."
                )
            return
        gate = self.gate
        if gate.expert_choice or self.top_k is None:
            raise ValueError(
                "overflow='spill' moves a top-k assignment that found its "
                "expert full to the position's next-ranked expert; this "
                "layer makes none (it needs top_k and a token-choice "
                "gate). Use overflow='drop'."
            )
        if not gate.ranks_by_score:
            raise ValueError(
                "overflow='spill' moves overflow to each position's "
                f"next-ranked expert, but {type(gate).__name__} assigns "
                "experts by rule and ranks no others. Use a gate with "
                "scores (e.g. 'softmax') or overflow='drop'."
            )
        # The weights of moved assignments are recomputed from the gate's
        # probabilities: per-feature weights and dropout would be lost.
        if getattr(gate, "per_feature", False):
            raise ValueError(
                "overflow='spill' recomputes the combine weight of a moved "
                "assignment from the gate's probabilities, which cannot "
                f"rebuild {type(gate).__name__}'s per-feature weights. Use "
                "overflow='drop'."
            )
        if gate.dropout > 0:
            raise ValueError(
                "overflow='spill' recomputes the combine weights of the "
                "assignments it moves, which would undo the gate's "
                f"dropout={gate.dropout}. Use gate dropout=0 or "
                "overflow='drop'."
            )

    @property
    def combine(self):
        """`"weighted"` or `"vote"`. Set it before the model's first
        `predict` (or make a new predict function), as any attribute a
        compiled step reads."""
        return self._combine

    @combine.setter
    def combine(self, value):
        value = voting.check_combine(value)
        if value == "vote" and self.built:
            voting.check_layer(self)
        self._combine = value

    @property
    def sparse(self):
        """Whether this layer runs the sparse (buffered) dispatch."""
        if self.dispatch == "auto":
            if self.gate.expert_choice:
                return True
            # With k = E every expert runs on every token anyway.
            return self.top_k is not None and self.top_k < self.num_experts
        return self.dispatch == "sparse"

    def _capacity_factor(self, training):
        if training:
            return self.capacity_factor
        if self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        # Inference is dropless by default, so a prediction never depends
        # on what else is in the batch. Expert choice and expert lists
        # have no dropless form; they get Switch's evaluation factor.
        if self.gate.expert_choice or isinstance(self.experts, ExpertList):
            return max(self.capacity_factor, 2.0)
        return None

    def build(self, input_shape):
        features = _validation.feature_dim(input_shape, self.name)
        self._check_sequence_axis(input_shape)
        self.input_spec = _validation.features_spec(features)
        self._check_layout()
        # Sublayers revived from a saved config arrive already built.
        for sublayer in (self.experts, self.gate, self.shared_experts):
            if sublayer is not None and not sublayer.built:
                if sublayer is self.gate and isinstance(
                    sublayer, gates_lib.FeatureGate
                ):
                    sublayer.units = sublayer.units or self.experts.units
                sublayer.build(input_shape)
        if self.units is None:
            self.units = self.experts.units
        elif self.experts.units != self.units:
            raise ValueError(
                f"The experts output {self.experts.units} features but the "
                f"layer has units={self.units}."
            )
        if isinstance(self.experts, DenseExperts):
            self._grouped_matmul = kernels.select_implementation(
                self.grouped_matmul,
                self.experts.compute_dtype,
                self._expert_projections(features),
            )
        if self.combine == "vote":
            # Fails at build, not at the first predict, where a layer can
            # never vote (regression or shared experts, expert choice).
            voting.check_layer(self)
        if self.routing_statistics:
            self.statistics = statistics_lib.RoutingStatistics(
                self, self.num_experts
            )

    def _check_sequence_axis(self, input_shape):
        if self.sequence_balance_weight > 0 and len(input_shape) < 3:
            raise ValueError(
                f"Layer '{self.name}' has sequence_balance_weight="
                f"{self.sequence_balance_weight}, which balances the experts "
                "over each sequence: its inputs need a sequence axis, "
                "`(batch, seq, ..., features)`; received input_shape="
                f"{tuple(input_shape)}."
            )

    # Routing statistics are a running record, like metrics, and are not
    # saved: so `.keras` files from before they existed load unchanged,
    # and a reloaded layer starts a fresh record. (The layer has no other
    # variables of its own; its sublayers save theirs.)
    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass

    def call(
        self,
        inputs,
        training=None,
        mask=None,
        routing_ids=None,
        inputs_mask=None,
        router_inputs=None,
        expert_indices=None,
    ):
        # With `routing_ids` Keras passes the inputs' mask as `inputs_mask`.
        mask = mask if mask is not None else inputs_mask
        _validation.float_input(inputs.dtype, self.name)
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))  # [tokens, features]
        valid = None
        if mask is not None:
            valid = ops.reshape(ops.cast(mask, "bool"), (-1,))  # [tokens]
        x = self._on_token_devices(x)
        scored = x
        if router_inputs is not None:
            scored = self._router_inputs(router_inputs, inputs)
        scope = _replay_scope.current()
        if not self._replayable:
            scope = None  # nothing to record or replay: routed as usual
        forced = self._forced_indices(expert_indices, inputs, scope)
        replay = {} if forced is None else {"indices": forced}

        routing = self.gate(
            scored,
            training=training,
            routing=True,
            top_k=self.top_k,
            routing_mask=valid,
            routing_ids=routing_ids,
            **replay,
        )
        if scope is not None and scope.replay is None:
            scope.record(self, routing["indices"])
        if self.combine == "vote":
            # Voting fusion: each expert votes its class (inference only).
            y = voting.vote(self, x, routing, training)
            load = dropped = None
        elif self.gate.expert_choice:
            y, load, dropped = self._expert_choice(
                x, routing["probs"], valid, training
            )
        else:
            y, dropped = self._token_choice(x, routing, valid, training)
            load = None
        if self.shared_experts is not None:
            y = y + ops.sum(self.shared_experts(x), axis=-2)
        # Experts given as layers keep their own dtype policy.
        y = ops.cast(y, self.compute_dtype)
        if valid is not None:
            # A select, not a product with the mask: padding outputs 0
            # even where its input is not finite.
            y = dispatch_lib.zero_unless(valid, y)
        sequence_length = None
        if self.sequence_balance_weight > 0 and training:
            self._check_sequence_axis(inputs.shape)
            # A sequence is the positions of one sample.
            sequence_length = 1
            for size in shape[1:-1]:
                sequence_length = sequence_length * size
        auxiliary = self._add_losses(routing, valid, training, sequence_length)
        if self.statistics is not None:
            if load is None:
                load = self._token_load(routing, valid)
            self.statistics.update(
                training,
                load,
                indices=routing.get("indices"),
                valid=valid,
                dropped_fraction=dropped,
                load_imbalance=ops.max(load) * self.num_experts,
                router_entropy=losses.router_entropy(routing["probs"], valid),
                **auxiliary,
            )
        return ops.reshape(y, tuple(shape[:-1]) + (self.units,))

    @property
    def _replayable(self):
        """Whether each position makes a top-k choice of experts, which
        a routing recorder records and a replayer replays."""
        return self.top_k is not None and not self.gate.expert_choice

    def _forced_indices(self, expert_indices, inputs, scope):
        """`[tokens, top_k]` int32 experts to replay, or `None`: the
        `expert_indices` argument, else a replaying scope's entry."""
        name = "expert_indices"
        if expert_indices is None and scope is not None:
            expert_indices = scope.forced(self)
            name = "routing"
        if expert_indices is None:
            return None
        if not self._replayable:
            raise ValueError(
                f"MoE layer '{self.name}' was given `expert_indices`, but "
                "it makes no per-position top-k choice of experts to "
                "replay (it has top_k=None, the dense mixture, or an "
                "ExpertChoiceGate, whose experts choose tokens)."
            )
        _replay_scope.check_indices(
            expert_indices, self.num_experts, self.top_k, name, self.name
        )
        if name == "expert_indices":
            # Given directly: the inputs' shape, features replaced by k.
            expected = tuple(inputs.shape[:-1]) + (self.top_k,)
            shape = tuple(expert_indices.shape)
            if len(shape) != len(expected) or any(
                a is not None and b is not None and a != b
                for a, b in zip(shape, expected)
            ):
                raise ValueError(
                    f"`expert_indices` of MoE layer '{self.name}' must have "
                    f"the inputs' shape with the features replaced by "
                    f"top_k, {expected}; received shape {shape}."
                )
        indices = ops.reshape(
            ops.cast(expert_indices, "int32"), (-1, self.top_k)
        )
        return self._on_token_devices(indices)

    def _router_inputs(self, router_inputs, inputs):
        """`router_inputs` as `[tokens, features]`, checked against the
        inputs' shape."""
        known = [
            (a, b)
            for a, b in zip(router_inputs.shape, inputs.shape)
            if a is not None and b is not None
        ]
        if len(router_inputs.shape) != len(inputs.shape) or any(
            a != b for a, b in known
        ):
            raise ValueError(
                f"Layer {self.name}: `router_inputs` must have the shape of "
                f"the inputs, {tuple(inputs.shape)}; received shape "
                f"{tuple(router_inputs.shape)}."
            )
        _validation.float_input(router_inputs.dtype, self.name)
        features = ops.shape(inputs)[-1]
        return self._on_token_devices(
            ops.reshape(router_inputs, (-1, features))
        )

    # --- token choice: each position picks its experts -------------------

    def _token_choice(self, x, routing, valid, training):
        # Masked positions need no zero weight: the sparse plan does not
        # route them, and `call` zeroes their output.
        weights, indices = routing["weights"], routing.get("indices")
        if not self.sparse:
            if indices is not None:
                weights = dispatch_lib.scatter_weights(
                    weights, indices, self.num_experts
                )
            return dispatch_lib.dense_combine(self.experts(x), weights), None
        capacity_factor = self._capacity_factor(training)
        layout = distribution_lib.dispatch_layout(self._experts_path())
        groups = self.token_groups or (layout.num_devices if layout else 1)
        if groups > 1:
            return self._grouped_token_choice(
                x, routing, valid, capacity_factor, groups, layout
            )
        capacity = dispatch_lib.capacity(
            ops.shape(x)[0], self.top_k, self.num_experts, capacity_factor
        )
        sorted_rows = capacity is None and self._grouped_matmul != "blocks"
        plan = dispatch_lib.RoutePlan(
            indices,
            self.num_experts,
            capacity,
            valid,
            custom_gradient=dispatch_lib.custom_gradients(training),
            sorted_rows=sorted_rows,
            priority=self._drop_priority(weights, capacity),
        )
        dropped = None
        if capacity is not None:
            dropped = plan.dropped / ops.maximum(plan.routed, 1.0)
        if self._spills(capacity):
            indices, weights, placed = self._spill_overflow(
                routing["probs"],
                self._spill_scores(routing),
                weights,
                indices,
                ops.reshape(plan.kept, (-1, self.top_k)),
                valid,
                capacity,
                groups=1,
            )
            routed = plan.routed
            # Every placed assignment fits: the plan drops nothing more.
            plan = dispatch_lib.RoutePlan(
                indices,
                self.num_experts,
                capacity,
                placed,
                custom_gradient=dispatch_lib.custom_gradients(training),
            )
            dropped = (routed - plan.routed) / ops.maximum(routed, 1.0)
        buffers = dispatch_lib.dispatch(x, plan)  # [groups, size, features]
        expert_kwargs = {"group_experts": plan.group_expert}
        if sorted_rows:
            # One group of rows sorted by expert, for a grouped matmul.
            buffers = buffers[0]  # [tokens * k, features]
            expert_kwargs = {
                "group_sizes": plan.group_sizes,
                "implementation": self._grouped_matmul,
            }
        if self._experts_scale_rows(weights):
            # The experts weight their own hidden activations: the combine
            # is then a plain gather-sum, and the step keeps no slot-sized
            # product of outputs for the gate weights' gradient.
            row_weights = dispatch_lib.slot_weights(weights, plan)
            outputs = self.experts(
                buffers,
                grouped=True,
                group_weights=row_weights[0] if sorted_rows else row_weights,
                **expert_kwargs,
            )
            return dispatch_lib.combine(outputs, None, plan), dropped
        outputs = self.experts(
            buffers, grouped=True, **expert_kwargs
        )  # [groups, size, units], or [rows, units] sorted
        return dispatch_lib.combine(outputs, weights, plan), dropped

    def _drop_priority(self, weights, capacity):
        """The `[tokens, k]` priority of the assignments for a slot, or
        `None` for the default order (also wherever nothing is dropped)."""
        if self.drop_policy == "probability" and capacity is not None:
            return weights
        return None

    def _spills(self, capacity):
        """Whether overflow spills here: `overflow="spill"`, a capacity,
        and experts past the top-k to spill to."""
        return (
            self.overflow == "spill"
            and capacity is not None
            and self.top_k < self.num_experts
        )

    def _spill_scores(self, routing):
        scores = routing.get("scores")
        if scores is None:
            raise ValueError(
                f"Layer {self.name} has overflow='spill', which moves "
                "overflow down each position's ranking of experts, but its "
                f"gate {type(self.gate).__name__} returned no `scores` to "
                "rank by in its routing dict (see `Gate.route`)."
            )
        return scores

    def _spill_overflow(
        self, probs, scores, weights, indices, kept, valid, capacity, groups
    ):
        """`overflow="spill"` (see `moe_keras._spill`): the assignments
        `kept` `[tokens, k]` stay, the others move to the next-ranked
        experts with room, within each of `groups` equal token groups.

        Returns `(indices, weights, placed)`, all `[tokens, k]`: each
        assignment's final expert, its combine weight there (the gate's
        probability, normalised over the token's k final experts and
        scaled as the gate does, so spilling nothing changes nothing) and
        whether it has a slot."""
        rounds = min(self.spill_rounds, self.num_experts - self.top_k)
        ranked, usable = spill_lib.candidates(scores, indices, rounds)
        routed = ops.ones(ops.shape(indices), "bool")
        if valid is not None:
            routed = ops.logical_and(routed, ops.cast(valid, "bool")[:, None])
        priority = self._drop_priority(weights, capacity)

        def split(t):  # [tokens, ...] -> [groups, tokens / groups, ...]
            return ops.reshape(t, (groups, -1) + tuple(t.shape[1:]))

        indices, placed = spill_lib.spill(
            split(indices),
            split(kept),
            split(routed),
            split(ranked),
            split(usable),
            capacity,
            self.num_experts,
            None if priority is None else split(priority),
        )
        indices = ops.reshape(indices, (-1, self.top_k))
        weights, _ = self.gate.select(probs, self.top_k, indices)
        return indices, weights, ops.reshape(placed, (-1, self.top_k))

    def _grouped_token_choice(
        self, x, routing, valid, capacity_factor, groups, layout
    ):
        """Sparse dispatch in `groups` token groups (see `group_dispatch`),
        laid out for expert parallelism under a Keras distribution."""
        weights, indices = routing["weights"], routing["indices"]
        probs = scores = None
        if self.overflow == "spill":
            probs, scores = routing["probs"], self._spill_scores(routing)
        num_tokens, features = ops.shape(x)[0], ops.shape(x)[1]
        padding = (-num_tokens) % groups
        if not isinstance(padding, int) or padding:
            # Padding tokens fill the last group; they are not routed.
            def pad(t):
                return ops.pad(t, ((0, padding),) + ((0, 0),) * (t.ndim - 1))

            present = ops.ones((num_tokens,), "int32")
            if valid is not None:
                present = ops.cast(valid, "int32")
            x, indices, weights = pad(x), pad(indices), pad(weights)
            valid = ops.cast(pad(present), "bool")
            if scores is not None:
                probs, scores = pad(probs), pad(scores)
        size = (num_tokens + padding) // groups
        capacity = dispatch_lib.capacity(
            size, self.top_k, self.num_experts, capacity_factor
        )

        def split(t):  # [tokens, ...] -> [groups, size, ...]
            return ops.reshape(t, (groups, size) + tuple(t.shape[1:]))

        plan = group_dispatch.GroupRoutePlan(
            split(indices),
            self.num_experts,
            capacity,
            None if valid is None else split(valid),
            partitioned=layout is not None,
            priority=(
                None
                if self._drop_priority(weights, capacity) is None
                else split(weights)
            ),
        )
        routed, dropped = plan.routed, plan.dropped
        if self._spills(capacity):
            indices, weights, placed = self._spill_overflow(
                probs,
                scores,
                weights,
                indices,
                ops.reshape(plan.kept, (-1, self.top_k)),
                valid,
                capacity,
                groups,
            )
            plan = group_dispatch.GroupRoutePlan(
                split(indices),
                self.num_experts,
                capacity,
                split(placed),
                partitioned=layout is not None,
            )
            dropped = routed - plan.routed
        buffers = group_dispatch.dispatch(split(x), plan)  # [G, E, C, d]
        if layout is not None:
            buffers = layout.token_side(buffers)
        buffers = ops.transpose(buffers, (1, 0, 2, 3))  # [E, G, C, d]
        if layout is not None:
            buffers = layout.expert_side(buffers)
        slots = groups * plan.capacity
        expert_kwargs = {}
        if layout is not None and layout.expert_axis is not None:
            # A per-expert loop would slice weights that live elsewhere.
            expert_kwargs["batched"] = True
        outputs = self.experts(
            ops.reshape(buffers, (self.num_experts, slots, features)),
            grouped=True,
            **expert_kwargs,
        )  # [E, G * C, units]
        outputs = ops.reshape(
            outputs, (self.num_experts, groups, plan.capacity, self.units)
        )
        if layout is not None:
            outputs = layout.expert_side(outputs)
        outputs = ops.transpose(outputs, (1, 0, 2, 3))  # [G, E, C, units]
        if layout is not None:
            outputs = layout.token_side(outputs)
        y = group_dispatch.combine(outputs, split(weights), plan)
        y = ops.reshape(y, (-1, self.units))[:num_tokens]  # [tokens, u]
        if capacity_factor is None:
            return y, None
        return y, dropped / ops.maximum(routed, 1.0)

    def _on_token_devices(self, x):
        """Under an expert layout, each device routes the tokens of its
        own group: the router's work is split over every device, not
        repeated along the experts axis, and its weight gradient is a sum
        of per-device parts rather than a gather of every token."""
        if not (self.sparse and not self.gate.expert_choice):
            return x
        layout = distribution_lib.dispatch_layout(self._experts_path())
        if layout is None or self.token_groups not in (
            None,
            layout.num_devices,
        ):
            return x
        return layout.tokens(x)

    def _experts_path(self):
        return f"{self.path}/experts"

    def _check_layout(self):
        """Fails early where a distribution's expert layout cannot apply."""
        layout = distribution_lib.dispatch_layout(self._experts_path())
        if layout is None:
            return
        if self.token_groups and self.token_groups % layout.num_devices:
            raise ValueError(
                f"`token_groups={self.token_groups}` must be a multiple of "
                f"the {layout.num_devices} devices of the distribution's "
                f"mesh (layer {self.name})."
            )
        if isinstance(self.experts, DenseExperts):
            self._check_weight_layouts(layout)
        if layout.expert_axis is None:
            return
        if isinstance(self.experts, ExpertList):
            raise ValueError(
                f"The layout map shards the experts of layer {self.name} "
                f"over {layout.expert_axis!r}, but its experts are a list "
                "of separate layers, which cannot be split along an "
                "experts axis. Use stacked experts (`num_experts`, "
                "`units`, `hidden_units`) or keep this layer replicated: "
                f"layout_map['{self._experts_path()}/dispatch_buffers'] "
                "= (None, 'batch', None, None)."
            )
        shards = layout.expert_shards()
        if self.num_experts % shards:
            raise ValueError(
                f"Layer {self.name} has num_experts={self.num_experts}, "
                f"which the {shards} devices of mesh axis "
                f"{layout.expert_axis!r} cannot split evenly; use a "
                "multiple of the axis size."
            )

    def _check_weight_layouts(self, layout):
        """The expert weights must sit where the dispatch sends tokens:
        else every step moves weight slices between devices."""
        path = self._experts_path()
        names = self.experts.weight_names()
        axes = distribution_lib.weight_expert_axes(path, names)
        wrong = sorted(n for n, a in axes.items() if a != layout.expert_axis)
        if not wrong:
            return
        data_axis = layout.expert_side_group_axes[:1] or (None,)
        entries = [
            f"layout_map['{path}/{distribution_lib.DISPATCH_KEY}'] = "
            f"{(layout.expert_axis, *data_axis, None, None)!r}"
        ] + [
            f"layout_map['{path}/{name}'] = "
            f"{(layout.expert_axis,) + (None,) * (2 if 'kernel' in name else 1)!r}"
            for name in names
        ]
        raise ValueError(
            f"The layout map puts the dispatch of layer {self.name} on "
            f"experts axis {layout.expert_axis!r} but the experts axis of "
            f"its weights {wrong} elsewhere: a layer's expert weights and "
            "its dispatch must agree (replicated is None for all of "
            "them). Set them together, e.g.:\n" + "\n".join(entries)
        )

    def _token_load(self, routing, valid):
        """`[E]`: each expert's share of the assignments (of the gate
        distribution, for the dense mixture, which assigns nothing)."""
        if "indices" in routing:
            return losses.assignment_fraction(
                routing["indices"], self.num_experts, valid
            )
        return losses._masked_mean(
            self.gate.balance_distribution(routing["probs"]), valid
        )

    def _expert_projections(self, features):
        """`(in, out)` features of each expert matmul."""
        experts = self.experts
        first = experts.hidden_units or experts.units
        width = 2 * first if experts.gated else first
        if experts.hidden_units is None:
            return [(features, width)]
        return [(features, width), (experts.hidden_units, experts.units)]

    def _experts_scale_rows(self, weights):
        return (
            isinstance(self.experts, DenseExperts)
            and self.experts.hidden_units is not None
            and len(weights.shape) == 2
        )

    # --- expert choice: each expert picks its tokens -----------------------

    def _expert_choice(self, x, probs, valid, training):
        num_tokens = ops.shape(x)[0]
        capacity = dispatch_lib.capacity(
            num_tokens, 1, self.num_experts, self._capacity_factor(training)
        )
        if isinstance(num_tokens, int) and num_tokens == 0:
            # An empty batch: no expert picks anything.
            empty = ops.zeros((0, self.units), self.compute_dtype)
            return empty, ops.zeros((self.num_experts,)), 0.0
        tokens, weights = self.gate.choose(probs, capacity, valid)  # [E, C]
        if valid is not None:
            weights = weights * ops.take(ops.cast(valid, weights.dtype), tokens)
        if self.sparse:
            buffers = ops.take(x, ops.reshape(tokens, (-1,)), axis=0)
            buffers = ops.reshape(
                buffers, (self.num_experts, capacity, ops.shape(x)[-1])
            )
            outputs = self.experts(buffers, grouped=True)  # [E, C, units]
            weighted = outputs * ops.cast(weights, outputs.dtype)[..., None]
            y = ops.segment_sum(
                ops.reshape(weighted, (-1, self.units)),
                ops.reshape(tokens, (-1,)),
                num_segments=num_tokens,
            )
        else:
            dense = dispatch_lib.expert_choice_weights(
                tokens, weights, num_tokens
            )
            y = dispatch_lib.dense_combine(self.experts(x), dense)
        # Each expert's real load: its share of the (unmasked) picks.
        picked = ops.ones(ops.shape(tokens), "float32")
        if valid is not None:
            picked = ops.take(ops.cast(valid, "float32"), tokens)
        per_expert = ops.sum(picked, axis=1)  # [E]
        load = per_expert / ops.maximum(ops.sum(per_expert), 1.0)
        # A token is dropped when no expert took it.
        taken = ops.segment_sum(
            ops.reshape(picked, (-1,)),
            ops.reshape(tokens, (-1,)),
            num_segments=num_tokens,
        )
        routed = (
            ops.cast(valid, "float32")
            if valid is not None
            else ops.ones_like(taken)
        )
        dropped = ops.sum(ops.cast(taken <= 0, "float32") * routed)
        return y, load, dropped / ops.maximum(ops.sum(routed), 1.0)

    # --- auxiliary losses ------------------------------------------------------

    def _add_losses(self, routing, valid, training, sequence_length=None):
        """Adds the auxiliary losses while training; returns them by name
        (with their weights) for the routing statistics (which keep those
        they know, and every one in `aux_loss`). `sequence_length`: the
        positions of each sample, for the sequence-wise balance loss."""
        if not training:
            return {}
        probs, logits = routing["probs"], routing["logits"]
        added = {}
        if self.gate.learned:
            if self.load_balance_weight > 0 and not self.gate.expert_choice:
                chosen = routing.get("indices")
                if chosen is None:
                    # The dense mixture has no choice; its argmax stands in.
                    chosen = ops.expand_dims(ops.argmax(probs, axis=-1), -1)
                added["load_balance_loss"] = (
                    self.load_balance_weight
                    * losses.load_balance_loss(
                        self.gate.balance_distribution(probs),
                        chosen,
                        self.num_experts,
                        mask=valid,
                        total=(
                            distribution_lib.replica_sum
                            if self.global_load_balance
                            else None
                        ),
                    )
                )
            if self.z_loss_weight > 0:
                added["z_loss"] = self.z_loss_weight * losses.router_z_loss(
                    logits, mask=valid
                )
            if self.sequence_balance_weight > 0:
                added["sequence_balance_loss"] = (
                    self.sequence_balance_weight
                    * losses.sequence_balance_loss(
                        self.gate.balance_distribution(probs),
                        routing["indices"],
                        self.num_experts,
                        sequence_length,
                        mask=valid,
                    )
                )
        total = 0.0
        for value in list(added.values()) + list(routing["losses"].values()):
            self.add_loss(value)
            total = total + value
        added["aux_loss"] = total
        return added

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, inputs, training=None, mask=None, **kwargs):
        _validation.float_input(inputs.dtype, self.name)
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "units": self.units,
                "hidden_units": self.hidden_units,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "glu_alpha": self.glu_alpha,
                "glu_limit": self.glu_limit,
                "use_bias": self.use_bias,
                "use_output_scale": self.use_output_scale,
                "num_shared_experts": self.num_shared_experts,
                "shared_hidden_units": self.shared_hidden_units,
                "gate": keras.saving.serialize_keras_object(self.gate),
                "top_k": self.top_k,
                "dispatch": self.dispatch,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "grouped_matmul": self.grouped_matmul,
                "token_groups": self.token_groups,
                "drop_policy": self.drop_policy,
                "overflow": self.overflow,
                "spill_rounds": self.spill_rounds,
                "load_balance_weight": self.load_balance_weight,
                "global_load_balance": self.global_load_balance,
                "z_loss_weight": self.z_loss_weight,
                "sequence_balance_weight": self.sequence_balance_weight,
                "routing_statistics": self.routing_statistics,
                "log_expert_load": self.log_expert_load,
                "combine": self.combine,
            }
        )
        config.update(
            _config.weight_options(self, _config.EXPERT_WEIGHT_OPTIONS)
        )
        if isinstance(self.experts, ExpertList):
            config["experts"] = self.experts.get_config()["experts"]
        # The stacked experts are made by `__init__` with the layer's dtype
        # policy; a quantized bank records its own (and its config), so
        # that it is rebuilt quantized before its weights load.
        for name in ("experts", "shared_experts"):
            sublayer = getattr(self, name)
            if (
                isinstance(sublayer, DenseExperts)
                and sublayer.quantization_mode is not None
            ):
                policy = sublayer.dtype_policy
                if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
                    policy = policy[sublayer.path]
                config[f"{name}_quantization"] = {
                    "dtype": keras.dtype_policies.serialize(policy),
                    "config": keras.saving.serialize_keras_object(
                        sublayer.quantization_config
                    ),
                }
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        quantized = {
            name: config.pop(f"{name}_quantization", None)
            for name in ("experts", "shared_experts")
        }
        layer = super().from_config(config)
        for name, quantization in quantized.items():
            sublayer = getattr(layer, name)
            if quantization is None or sublayer is None:
                continue
            # Unbuilt, the layer only takes the policy: its `build` then
            # makes the quantized variables.
            sublayer.quantization_config = (
                keras.saving.deserialize_keras_object(quantization["config"])
            )
            sublayer.dtype_policy = keras.dtype_policies.deserialize(
                quantization["dtype"]
            )
        return layer
