import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_state():
    """Each test starts from the default dtype policy and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
