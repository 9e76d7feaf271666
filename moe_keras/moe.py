"""The Mixture-of-Experts layer: a gate, an expert bank and a dispatch."""

import keras
from keras import ops

from moe_keras import _metrics_utils
from moe_keras import _validation
from moe_keras import dispatch as dispatch_lib
from moe_keras import gates as gates_lib
from moe_keras import losses
from moe_keras.experts import DenseExperts

_DISPATCH_MODES = ("auto", "dense", "sparse")


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
      metric `<layer name>_dropped_fraction`.
      With `capacity_factor=None` the sparse dispatch is dropless: the
      assignments are sorted by expert into fixed-size blocks, each expert
      padded to whole blocks, so nothing is dropped and the padding is
      bounded by `num_experts * block` rows.
    - `"auto"` picks sparse for top-k routing with `top_k < num_experts`,
      dense otherwise.

    While training, the layer adds the Switch load-balancing loss and the
    ST-MoE router z-loss (`moe_keras.losses`) with `add_loss`. The router
    computes in float32 under mixed precision; the experts follow the
    layer's dtype policy.

    Args:
        num_experts: int, number of experts.
        units: int, output features of every expert and of the layer.
        hidden_units: int or None. If set, each expert is a two-layer MLP
            `units(hidden) -> activation -> units`.
        activation: activation of the experts' hidden layer (or of their
            output without `hidden_units`). Defaults to `None`.
        gated: bool, GLU experts (SwiGLU with `activation="silu"`).
        use_bias: bool, biases in the experts. Defaults to `True`.
        gate: `"softmax"`, `"sigmoid"` or a `moe_keras.Gate` instance.
        top_k: int in `[1, num_experts]`, or `None` for the dense mixture.
        dispatch: `"auto"`, `"dense"` or `"sparse"`.
        capacity_factor: float > 0, or `None` for dropless sparse dispatch.
            Defaults to 1.25 (Switch Transformer).
        eval_capacity_factor: float > 0 used when not training. Defaults to
            `max(capacity_factor, 2.0)` (dropless if `capacity_factor` is).
        load_balance_weight: float >= 0, weight of the load-balancing loss.
            Defaults to 0.01.
        z_loss_weight: float >= 0, weight of the router z-loss.
            Defaults to 0.001.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, kernel_constraint, bias_constraint: for the
            experts, as in `Dense`.

    Input shape:
        `(batch, ..., features)`, any rank >= 2; routing is per position.
        A Keras mask `(batch, ...)` is honoured: masked positions are not
        routed, take no capacity, count in no loss or metric, output zeros.

    Output shape:
        `(batch, ..., units)`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)),
    ...     MoE(num_experts=4, units=10, gate="sigmoid"),
    ... ])
    >>> model(np.zeros((2, 16), "float32")).shape
    (2, 10)
    """

    def __init__(
        self,
        num_experts,
        units,
        *,
        hidden_units=None,
        activation=None,
        gated=False,
        use_bias=True,
        gate="softmax",
        top_k=None,
        dispatch="auto",
        capacity_factor=1.25,
        eval_capacity_factor=None,
        load_balance_weight=0.01,
        z_loss_weight=0.001,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        if "name" not in kwargs:
            kwargs["name"] = f"moe_{keras.backend.get_uid('moe')}"
        super().__init__(**kwargs)
        self.num_experts = _validation.positive_int(num_experts, "num_experts")
        self.units = _validation.positive_int(units, "units")
        self.top_k = _validation.positive_int(top_k, "top_k", allow_none=True)
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(
                f"`top_k` must be in [1, num_experts={self.num_experts}]; "
                f"received top_k={top_k}."
            )
        self.dispatch = _validation.one_of(
            dispatch, "dispatch", _DISPATCH_MODES
        )
        if dispatch == "sparse" and self.top_k is None:
            raise ValueError(
                "`dispatch='sparse'` routes each position to its top-k "
                "experts, so it needs `top_k`; received top_k=None. Use "
                "dispatch='dense' (or 'auto') for the dense mixture."
            )
        self.capacity_factor = _validation.positive_float(
            capacity_factor, "capacity_factor", allow_none=True
        )
        self.eval_capacity_factor = _validation.positive_float(
            eval_capacity_factor, "eval_capacity_factor", allow_none=True
        )
        self.load_balance_weight = _validation.non_negative_float(
            load_balance_weight, "load_balance_weight"
        )
        self.z_loss_weight = _validation.non_negative_float(
            z_loss_weight, "z_loss_weight"
        )
        self.gate = gates_lib.get(gate, self.num_experts)
        self.experts = DenseExperts(
            num_experts=self.num_experts,
            units=self.units,
            hidden_units=hidden_units,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
            name="experts",
        )
        self.dropped_fraction = keras.metrics.Mean(
            name=f"{self.name}_dropped_fraction"
        )
        self.supports_masking = True

    @property
    def sparse(self):
        """Whether this layer runs the sparse (capacity) dispatch."""
        if self.dispatch == "auto":
            # With k = E every expert runs on every token anyway.
            return self.top_k is not None and self.top_k < self.num_experts
        return self.dispatch == "sparse"

    def _capacity_factor(self, training):
        if training:
            return self.capacity_factor
        if self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        if self.capacity_factor is None:
            return None
        return max(self.capacity_factor, 2.0)

    def build(self, input_shape):
        _validation.feature_dim(input_shape, self.name)
        # A gate revived from a saved config arrives already built.
        for sublayer in (self.gate, self.experts):
            if not sublayer.built:
                sublayer.build(input_shape)

    def call(self, inputs, training=None, mask=None):
        _validation.float_input(inputs.dtype, self.name)
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))  # [tokens, features]
        valid = None
        if mask is not None:
            valid = ops.reshape(ops.cast(mask, "bool"), (-1,))  # [tokens]

        probs, logits = self.gate(x, return_logits=True)  # [tokens, E] f32
        if self.top_k is None:
            weights, indices = probs, None
        else:
            weights, indices = self.gate.select(probs, self.top_k)
        if valid is not None:
            weights = weights * ops.cast(valid, weights.dtype)[:, None]

        if self.sparse:
            y = self._sparse_forward(x, weights, indices, valid, training)
        else:
            if indices is not None:
                weights = dispatch_lib.scatter_weights(
                    weights, indices, self.num_experts
                )
            y = dispatch_lib.dense_combine(self.experts(x), weights)

        if training:
            self._add_router_losses(probs, logits, indices, valid)
        return ops.reshape(y, tuple(shape[:-1]) + (self.units,))

    def _sparse_forward(self, x, weights, indices, valid, training):
        num_tokens = ops.shape(x)[0]
        capacity = dispatch_lib.capacity(
            num_tokens,
            self.top_k,
            self.num_experts,
            self._capacity_factor(training),
        )
        plan = dispatch_lib.RoutePlan(
            indices, self.num_experts, capacity, valid
        )
        buffers = dispatch_lib.dispatch(x, plan)  # [groups, size, features]
        outputs = self.experts(
            buffers, grouped=True, group_experts=plan.group_expert
        )  # [groups, size, units]
        _metrics_utils.update_if_tracked(
            self.dropped_fraction, plan.dropped / ops.maximum(plan.routed, 1.0)
        )
        return dispatch_lib.combine(outputs, weights, plan)

    def _add_router_losses(self, probs, logits, indices, valid):
        if self.load_balance_weight > 0:
            if indices is None:
                # The dense mixture has no choice; its argmax stands in.
                indices = ops.expand_dims(ops.argmax(probs, axis=-1), -1)
            balance = losses.load_balance_loss(
                self.gate.balance_distribution(probs),
                indices,
                self.num_experts,
                mask=valid,
            )
            self.add_loss(self.load_balance_weight * balance)
        if self.z_loss_weight > 0:
            z_loss = losses.router_z_loss(logits, mask=valid)
            self.add_loss(self.z_loss_weight * z_loss)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, inputs, training=None, mask=None):
        _validation.float_input(inputs.dtype, self.name)
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        experts = self.experts.get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "units": self.units,
                "hidden_units": self.experts.hidden_units,
                "activation": experts["activation"],
                "gated": self.experts.gated,
                "use_bias": self.experts.use_bias,
                "gate": keras.saving.serialize_keras_object(self.gate),
                "top_k": self.top_k,
                "dispatch": self.dispatch,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "load_balance_weight": self.load_balance_weight,
                "z_loss_weight": self.z_loss_weight,
            }
        )
        for key in (
            "kernel_initializer",
            "bias_initializer",
            "kernel_regularizer",
            "bias_regularizer",
            "kernel_constraint",
            "bias_constraint",
        ):
            config[key] = experts[key]
        return config
