"""Updating a layer's own metrics from inside `call`."""

from keras import backend
from keras.src.backend.common import stateless_scope


def update_if_tracked(metric, value):
    """`metric.update_state(value)` wherever the metric's state is readable.

    On TensorFlow (and in eager calls) a layer metric updated in `call`
    shows in `fit`/`evaluate` logs. JAX's `fit` runs the forward pass in a
    stateless scope that carries the model's weights but not its metric
    state (keras-team/keras#21639), so reading the metric there fails; the
    update is skipped in that case rather than breaking training.
    """
    if backend.backend() == "jax" and stateless_scope.in_stateless_scope():
        scope = stateless_scope.get_stateless_scope()
        if any(scope.get_current_value(v) is None for v in metric.variables):
            if any(
                getattr(v, "_value", None) is None for v in metric.variables
            ):
                return
    metric.update_state(value)
