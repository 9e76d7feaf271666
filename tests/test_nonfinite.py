"""A non-finite input stays in its own token's output.

Dropped, empty and masked slots must come out exactly 0 whatever another
token holds: a 0/1 mask multiplied in would turn another token's inf or
NaN into NaN (`0 * nan = nan`), as it would a finite input that overflows
inside an expert.
"""

import keras
import numpy as np
import pytest

from moe_keras import FeatureGate
from moe_keras import MoE

BAD_VALUES = {"nan": np.nan, "inf": np.inf, "overflow": 1e38}

LAYERS = {
    "capacity-swiglu": dict(
        top_k=2,
        capacity_factor=0.5,
        hidden_units=8,
        gated=True,
        activation="silu",
    ),
    "capacity-linear": dict(top_k=2, capacity_factor=0.5),
    "dropless-relu": dict(
        top_k=2, capacity_factor=None, hidden_units=8, activation="relu"
    ),
    "top1-feature-gate": dict(
        top_k=1, capacity_factor=0.5, gate=FeatureGate(), hidden_units=8
    ),
    "shared-experts": dict(
        top_k=2, capacity_factor=0.5, hidden_units=8, num_shared_experts=1
    ),
    "dense": dict(top_k=2, dispatch="dense", hidden_units=8),
}


def _layer(name):
    kwargs = dict(LAYERS[name])
    if isinstance(kwargs.get("gate"), FeatureGate):
        kwargs["gate"] = FeatureGate()
    return MoE(num_experts=4, units=3, **kwargs)


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_bad_token_stays_in_its_own_output(bad, name, training):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(4, 6, 5)).astype("float32")
    mask = np.ones((4, 6), bool)
    mask[1, 3:] = False  # padding in another sample
    mask[0, 5] = False  # and in the bad sample itself
    layer = _layer(name)
    layer.build(x.shape)
    if bad == "overflow":
        # Large expert weights: a finite 1e38 overflows inside the expert.
        for weight in layer.experts.weights:
            weight.assign(keras.ops.convert_to_numpy(weight) * 100.0)
    clean = keras.ops.convert_to_numpy(layer(x, mask=mask, training=training))
    x_bad = x.copy()
    x_bad[0, 0, :] = BAD_VALUES[bad]
    y = keras.ops.convert_to_numpy(layer(x_bad, mask=mask, training=training))
    # The bad token's own output is not finite (the check below has teeth).
    assert not np.all(np.isfinite(y[0, 0]))

    others = np.ones((4, 6), bool)
    others[0, 0] = False
    assert np.all(np.isfinite(y[others])), np.argwhere(~np.isfinite(y))
    # Padding is exactly 0, in the bad sample too.
    assert np.all(y[~mask] == 0.0)
    # Without a capacity no token's output depends on another's input;
    # with one, the bad token may take a slot another would have had.
    limited = training and layer.sparse and layer.capacity_factor is not None
    if not limited:
        np.testing.assert_allclose(
            y[others], clean[others], rtol=1e-5, atol=1e-6
        )


def test_nan_sample_leaves_other_predictions_of_a_masked_model_alone():
    # The README's masked sequence model: Masking, a residual sparse MoE
    # and masked self-attention.
    inputs = keras.Input((6, 8))
    x = keras.layers.Masking(0.0)(inputs)
    h = MoE(num_experts=4, units=8, top_k=2, hidden_units=16)(x)
    x = keras.layers.Add()([x, h])
    x = keras.layers.MultiHeadAttention(2, 4)(x, x)
    outputs = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(1)
    data = rng.normal(size=(5, 6, 8)).astype("float32")
    data[2:, 4:] = 0.0  # padded positions
    clean = model.predict(data, verbose=0)
    data[0, 1, 3] = np.nan
    poisoned = model.predict(data, verbose=0)
    assert np.all(np.isnan(poisoned[0]))
    np.testing.assert_allclose(poisoned[1:], clean[1:], rtol=1e-5, atol=1e-6)
    # Training-mode outputs (capacity 1.25, tokens may be dropped) too.
    train_out = keras.ops.convert_to_numpy(model(data, training=True))
    assert np.all(np.isfinite(train_out[1:]))
