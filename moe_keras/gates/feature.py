"""Per-feature gates: a separate combine weight for every output feature of
every expert."""

import keras
from keras import ops

from moe_keras import _validation
from moe_keras.gates.base import broadcast_rows
from moe_keras.gates.learned import SoftmaxGate


@keras.saving.register_keras_serializable(package="moe_keras")
class FeatureGate(SoftmaxGate):
    """A gate that weights every feature of an expert's output separately.

    The combine weight of expert e at feature f is `w[e, f] = p_e *
    sigmoid(v[e, f])`, so `y = sum_e w_e * h_e` element-wise:

    - `input_dependent=True` (the default): `p = softmax(x @ W)` is the
      routing probability (used for selection and the balancing losses, as
      in `SoftmaxGate`) and `v = x @ W_f`, so the weights follow the input;
    - `input_dependent=False`: `p = softmax(a)` and `v` are learned
      vectors, the same for every input (`w_i * h_i` with `w_i` a learned
      vector, as `StaticGate` is per expert).

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        units: int or None, the experts' output width. Defaults to `None`,
            which lets the owning `MoE` fill it in.
        input_dependent: bool, whether the weights are functions of the
            input. Defaults to `True`.
        **kwargs: the other arguments of `Gate` and `SoftmaxGate`, and base
            layer keyword arguments such as `name`. `use_bias`, `jitter`
            and `hidden_units` apply with `input_dependent=True` only (a
            `ValueError` otherwise); `hidden_units` and `use_bias` shape
            the routing probabilities `p`, not the feature weights `v`.

    Input shape:
        `(..., features)` with `input_dependent=True`; `(tokens, features)`
        otherwise.

    Output shape:
        The routing probabilities `p`, `(..., num_experts)`. With
        `routing=True`, the routing dict of `Gate`, whose `weights` are per
        feature: `(tokens, num_experts, units)`, or `(tokens, top_k, units)`
        with `top_k`.

    Example:

    >>> gate = FeatureGate(num_experts=3, units=4, input_dependent=False)
    >>> routing = gate(np.ones((2, 8), "float32"), routing=True)
    >>> tuple(routing["weights"].shape)
    (2, 3, 4)
    """

    per_feature = True  # weights `[T, E, units]`, not `[T, E]`

    def __init__(
        self, num_experts=None, units=None, input_dependent=True, **kwargs
    ):
        if not isinstance(input_dependent, bool):
            raise TypeError(
                "`input_dependent` must be True or False; received "
                f"input_dependent={input_dependent!r}."
            )
        # Set before Gate.__init__, which checks `scores_inputs`.
        self.input_dependent = input_dependent
        super().__init__(num_experts=num_experts, **kwargs)
        self.units = _validation.positive_int(units, "units", allow_none=True)

    @property
    def scores_inputs(self):
        return self.input_dependent

    def build_router(self, features):
        if self.units is None:
            raise ValueError(
                f"FeatureGate '{self.name}' needs `units` (the experts' "
                "output width); pass it or use the gate inside an `MoE`."
            )
        if not self.input_dependent:
            self.hidden_kernel = self.bias = None
            self.kernel = self.add_weight(
                name="expert_logits",
                shape=(self.num_experts,),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
            )
            self.feature_kernel = self.add_weight(
                name="feature_logits",
                shape=(self.num_experts, self.units),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
            )
            return
        super().build_router(features)
        self.feature_kernel = self.add_weight(
            name="feature_kernel",
            shape=(features, self.num_experts * self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )

    def compute_logits(self, x, training=None, routing_ids=None):
        if not self.input_dependent:
            return broadcast_rows(x, self.kernel)  # [T, E]
        return super().compute_logits(x, training, routing_ids)

    def route(
        self,
        x,
        top_k,
        training=None,
        mask=None,
        routing_ids=None,
        indices=None,
    ):
        routing = super().route(x, top_k, training, mask, routing_ids, indices)
        if self.input_dependent:
            per_feature = ops.sigmoid(ops.matmul(x, self.feature_kernel))
            per_feature = ops.reshape(
                per_feature, (-1, self.num_experts, self.units)
            )  # [T, E, units]
        else:
            per_feature = broadcast_rows(
                x, ops.sigmoid(self.feature_kernel)
            )  # [T, E, units]
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
        config["input_dependent"] = self.input_dependent
        return config
