import numpy as np
import pytest

from moe_keras import losses
from tests import reference


def _numpy_load_balance(probs, indices, num_experts, mask=None):
    tokens, k = indices.shape
    valid = np.ones(tokens) if mask is None else mask.astype(float)
    fraction = np.zeros(num_experts)
    for t in range(tokens):
        for j in range(k):
            fraction[indices[t, j]] += valid[t]
    fraction /= valid.sum() * k
    mean_prob = (probs * valid[:, None]).sum(0) / valid.sum()
    return num_experts * np.sum(fraction * mean_prob)


def _numpy_z_loss(logits, mask=None):
    valid = np.ones(len(logits)) if mask is None else mask.astype(float)
    m = logits.max(-1)
    log_z = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    return np.sum(valid * log_z**2) / valid.sum()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balance_loss(k, masked):
    rng = np.random.RandomState(k)
    logits = rng.normal(size=(20, 4)) * 2
    probs = reference.softmax(logits).astype("float32")
    _, indices = reference.top_k_weights(probs, k, True)
    mask = (rng.uniform(size=20) > 0.3) if masked else None
    value = losses.load_balance_loss(
        probs, indices.astype("int32"), 4, mask=mask
    )
    np.testing.assert_allclose(
        float(value), _numpy_load_balance(probs, indices, 4, mask), rtol=1e-5
    )


def test_load_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    probs = np.full((8, 4), 0.25, "float32")
    indices = np.arange(8).reshape(8, 1).astype("int32") % 4
    np.testing.assert_allclose(
        float(losses.load_balance_loss(probs, indices, 4)), 1.0, rtol=1e-6
    )
    skewed = np.tile(np.array([[0.97, 0.01, 0.01, 0.01]], "float32"), (8, 1))
    assert (
        float(losses.load_balance_loss(skewed, np.zeros((8, 1), "int32"), 4))
        > 3.5
    )


@pytest.mark.parametrize("masked", [False, True])
def test_router_z_loss(masked):
    rng = np.random.RandomState(0)
    logits = (rng.normal(size=(16, 5)) * 3).astype("float32")
    mask = (rng.uniform(size=16) > 0.4) if masked else None
    np.testing.assert_allclose(
        float(losses.router_z_loss(logits, mask=mask)),
        _numpy_z_loss(logits.astype(float), mask),
        rtol=1e-5,
    )
