"""What each backend supports, as pytest skip marks, and how many
property-test draws each can afford."""

import keras
import pytest
from hypothesis import HealthCheck
from hypothesis import settings

BACKEND = keras.backend.backend()

NO_EXPORT = pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras writes a TF SavedModel from the TensorFlow and JAX backends",
)
NO_JIT = pytest.mark.skipif(
    BACKEND == "torch",
    reason="torch.compile fails on some routers' custom autograd functions",
)


def derandomized(examples, jax_examples):
    """Hypothesis settings drawing the same examples on every backend:
    `examples` of them, the first `jax_examples` on JAX, which compiles
    every new shape of an eager call (the other backends check the rest
    of the backend-agnostic code)."""
    return settings(
        max_examples=jax_examples if BACKEND == "jax" else examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
