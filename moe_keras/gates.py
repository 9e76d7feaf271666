"""Routers: layers that score experts for each position and pick among them."""

import keras
from keras import ops

from moe_keras import _validation


class Gate(keras.layers.Layer):
    """Base class of a learned linear router.

    A gate scores every expert for every position with one linear map
    `logits = x @ W (+ b)`, turns the logits into gate probabilities
    (`probabilities`), and selects the top-k experts (`select`). It runs in
    float32 by default, whatever the global dtype policy: routing decisions
    and the softmax are sensitive to rounding, and the router is cheap.

    Args:
        num_experts: int or None, number of experts. `None` lets the `MoE`
            layer that owns the gate fill it in.
        use_bias: bool. Defaults to `False`.
        kernel_initializer: initializer of the routing kernel.
            Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of the bias. Defaults to `"zeros"`.
        kernel_regularizer, bias_regularizer: optional regularizers.

    Call arguments:
        inputs: `(..., features)` floats.
        return_logits: bool; if `True` return `(probabilities, logits)`.

    Output shape:
        `(..., num_experts)` gate probabilities (float32).
    """

    #: Whether the selected top-k weights are renormalised to sum to 1.
    normalize_top_k = False

    def __init__(
        self,
        num_experts=None,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
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

    def build(self, input_shape):
        if self.num_experts is None:
            raise ValueError(
                f"Gate '{self.name}' needs `num_experts` before it is built: "
                "pass it to the gate or use the gate inside an `MoE` layer."
            )
        features = _validation.feature_dim(input_shape, self.name)
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

    def call(self, inputs, return_logits=False):
        logits = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            logits = logits + self.bias
        probs = self.probabilities(logits)
        if return_logits:
            return probs, logits
        return probs

    def probabilities(self, logits):
        """Gate probabilities `[..., E]` from router logits."""
        raise NotImplementedError

    def balance_distribution(self, probs):
        """Router probabilities as a distribution over experts (sums to 1),
        the form the load-balancing loss expects."""
        return probs

    def select(self, probs, top_k):
        """The `top_k` experts of each position and their combine weights.

        Returns:
            `(weights, indices)`, both `[..., top_k]`; weights are float32.
        """
        weights, indices = ops.top_k(probs, top_k)
        if self.normalize_top_k:
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return weights, ops.cast(indices, "int32")

    def compute_output_spec(self, inputs, return_logits=False):
        shape = tuple(inputs.shape[:-1]) + (self.num_experts,)
        spec = keras.KerasTensor(shape, dtype=self.compute_dtype)
        return (
            (spec, keras.KerasTensor(shape, dtype=self.compute_dtype))
            if return_logits
            else spec
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(
                    self.bias_regularizer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SoftmaxGate(Gate):
    """Softmax router: gate probabilities sum to 1 over the experts.

    With top-k routing the k selected probabilities are renormalised to sum
    to 1, which equals a softmax over the k selected logits (Mixtral,
    Switch with k=1 aside). Arguments as in `Gate`.

    Example:

    >>> gate = SoftmaxGate(num_experts=4)
    >>> probs = gate(np.ones((2, 8), "float32"))
    >>> probs.shape
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
    sigmoid scores are used as they are (not renormalised). Arguments as in
    `Gate`.

    Example:

    >>> gate = SigmoidGate(num_experts=4)
    >>> gate(np.ones((2, 8), "float32")).shape
    (2, 4)
    """

    def probabilities(self, logits):
        return ops.sigmoid(logits)

    def balance_distribution(self, probs):
        return probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), 1e-9)


_GATES = {"softmax": SoftmaxGate, "sigmoid": SigmoidGate}


def get(identifier, num_experts):
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
    return identifier
