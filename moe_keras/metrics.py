"""Routing metrics that an `MoE` layer keeps about itself."""

import keras
from keras import backend
from keras import ops
from keras.src.backend.common import stateless_scope


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertLoad(keras.metrics.Metric):
    """Mean fraction of routing assignments each expert received, `[E]`.

    `load()` returns the vector. In `fit`/`evaluate` logs the metric shows
    one entry per expert (`<name>_<i>`) only when `log_per_expert=True`,
    since 64 experts would flood a progress bar; `ExpertLoadCallback`
    reads the vector either way.
    """

    def __init__(
        self, num_experts, log_per_expert=False, name="expert_load", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.num_experts = num_experts
        self.log_per_expert = log_per_expert
        self.total = self.add_variable(
            shape=(num_experts,), initializer="zeros", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", name="count"
        )

    def update_state(self, fractions):
        self.total.assign(self.total + ops.cast(fractions, self.dtype))
        self.count.assign(self.count + 1.0)

    def load(self):
        return self.total / ops.maximum(self.count, 1.0)

    def result(self):
        if not self.log_per_expert:
            return {}
        load = self.load()
        return {f"{self.name}_{i}": load[i] for i in range(self.num_experts)}

    def get_config(self):
        return {
            "num_experts": self.num_experts,
            "log_per_expert": self.log_per_expert,
            "name": self.name,
            "dtype": self.dtype,
        }


def update_if_tracked(metric, *values):
    """`metric.update_state(*values)` wherever the metric's state is readable.

    On TensorFlow (and in eager calls) a layer metric updated in `call`
    shows in `fit`/`evaluate` logs. JAX's `fit` runs the forward pass in a
    stateless scope that carries the model's weights but not its metric
    state (keras-team/keras#21639), so reading the metric there fails; the
    update is skipped in that case rather than breaking training.
    """
    if backend.backend() == "jax" and stateless_scope.in_stateless_scope():
        scope = stateless_scope.get_stateless_scope()
        for v in metric.variables:
            if scope.get_current_value(v) is None and v._value is None:
                return
    metric.update_state(*values)
