"""Learned weights per cluster: routing by a cluster (or token) id, with
each cluster's own router."""

import keras
from keras import ops

from moe_keras import _validation
from moe_keras.gates.learned import SoftmaxGate


@keras.saving.register_keras_serializable(package="moe_keras")
class ClusterGate(SoftmaxGate):
    """A softmax router per cluster, the cluster given as an id.

    Each position's weights come from the router of its cluster. Where
    `HashGate` sends a cluster id to fixed experts with equal weights,
    this gate learns the weights of each cluster:

    - `input_dependent=True` (the default): cluster c has its own linear
      router, `logits = x @ W_c (+ b_c)`, so the weights depend on the
      input within each cluster;
    - `input_dependent=False`: cluster c has a learned logit per expert,
      `logits = a_c`, the same for every input of that cluster (starting
      at zero, the plain average).

    The weights are the softmax of these logits (top-k as in
    `SoftmaxGate`). Call the `MoE` layer (or the gate) with `routing_ids=`
    (one integer cluster id per position, in `[0, num_clusters)`; ids
    outside are clipped into that range).

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        num_clusters: int >= 1, the number of cluster ids. Required,
            despite its default of `None`.
        input_dependent: bool, whether each cluster's weights are functions
            of the input. Defaults to `True`.
        **kwargs: the other arguments of `Gate` and `SoftmaxGate`, and base
            layer keyword arguments such as `name`. `hidden_units` does not
            apply (a `ValueError`); `use_bias`, `jitter` and the
            initializers act with `input_dependent=True` only.

    Input shape:
        `(tokens, features)`, with `routing_ids` of shape `(tokens,)`.

    Output shape:
        `(tokens, num_experts)`, the softmax probabilities; with
        `routing=True`, the routing dict of `Gate`.

    Example:

    >>> gate = ClusterGate(num_experts=3, num_clusters=5)
    >>> ids = np.array([0, 4])
    >>> tuple(gate(np.ones((2, 8), "float32"), routing_ids=ids).shape)
    (2, 3)
    """

    needs_ids = True

    def __init__(
        self,
        num_experts=None,
        num_clusters=None,
        input_dependent=True,
        **kwargs,
    ):
        if kwargs.get("hidden_units") is not None:
            raise ValueError(
                "`hidden_units` does not apply to ClusterGate (each cluster "
                f"has a linear router); received "
                f"hidden_units={kwargs['hidden_units']}."
            )
        super().__init__(num_experts=num_experts, **kwargs)
        self.num_clusters = _validation.positive_int(
            num_clusters, "num_clusters"
        )
        if not isinstance(input_dependent, bool):
            raise TypeError(
                "`input_dependent` must be True or False; received "
                f"input_dependent={input_dependent!r}."
            )
        self.input_dependent = input_dependent

    def build_router(self, features):
        self.hidden_kernel = None
        self.bias = None
        if self.input_dependent:
            self.kernel = self.add_weight(
                name="cluster_kernel",
                shape=(self.num_clusters, features, self.num_experts),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
            )
            if self.use_bias:
                self.bias = self.add_weight(
                    name="cluster_bias",
                    shape=(self.num_clusters, self.num_experts),
                    initializer=self.bias_initializer,
                    regularizer=self.bias_regularizer,
                )
        else:
            self.kernel = self.add_weight(
                name="cluster_logits",
                shape=(self.num_clusters, self.num_experts),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
            )

    def cluster_ids(self, routing_ids):
        if routing_ids is None:
            raise ValueError(
                f"ClusterGate '{self.name}' routes by cluster id: call the "
                "MoE layer (or the gate) with `routing_ids=` (one integer "
                "id per position)."
            )
        ids = ops.reshape(ops.cast(routing_ids, "int32"), (-1,))  # [T]
        return ops.clip(ids, 0, self.num_clusters - 1)

    def compute_logits(self, x, training=None, routing_ids=None):
        ids = self.cluster_ids(routing_ids)
        if not self.input_dependent:
            return ops.take(self.kernel, ids, axis=0)  # [T, E]
        x = self.router_input(x, training)
        kernels = ops.take(self.kernel, ids, axis=0)  # [T, features, E]
        logits = ops.einsum("td,tde->te", x, kernels)
        if self.bias is not None:
            logits = logits + ops.take(self.bias, ids, axis=0)
        return logits

    def get_config(self):
        config = super().get_config()
        config["num_clusters"] = self.num_clusters
        config["input_dependent"] = self.input_dependent
        return config
