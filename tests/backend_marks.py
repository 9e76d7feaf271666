"""What each backend supports, as pytest skip marks."""

import keras
import pytest

BACKEND = keras.backend.backend()

NO_EXPORT = pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras writes a TF SavedModel from the TensorFlow and JAX backends",
)
NO_JIT = pytest.mark.skipif(
    BACKEND == "torch",
    reason="torch.compile fails on some routers' custom autograd functions",
)
