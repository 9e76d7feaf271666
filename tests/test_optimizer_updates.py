"""Every dispatch gives the same optimizer update when nothing is dropped.

Dropless dispatch runs each expert on several blocks, so its weights are
read once per block. Optimizers that square or normalise the gradient
(Adam, RMSprop, Adafactor, Lion) go wrong if the per-block gradients reach
them unsummed (TensorFlow's `IndexedSlices` with repeated indices), while
SGD does not; so each optimizer is checked, through `fit` as users train.
"""

import keras
import numpy as np
import pytest

from moe_keras import MoE

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.01),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "adafactor": lambda: keras.optimizers.Adafactor(0.01),
    "lion": lambda: keras.optimizers.Lion(0.01),
}

# The capacity path with C >= tokens (capacity_factor = E / k) drops
# nothing, and the dense dispatch computes every expert: both references.
DISPATCHES = {
    "dropless": dict(dispatch="sparse", capacity_factor=None),
    "capacity": dict(dispatch="sparse", capacity_factor=2.0),
    "dense": dict(dispatch="dense"),
}


def _trained_weights(dispatch, optimizer, expert_form, x, y, initial):
    inputs = keras.Input(x.shape[1:])
    outputs = MoE(
        num_experts=4, units=y.shape[-1], top_k=2, **expert_form, **dispatch
    )(inputs)
    model = keras.Model(inputs, outputs)
    for weight, value in zip(model.trainable_weights, initial):
        weight.assign(value)
    model.compile(OPTIMIZERS[optimizer](), "mse")
    # Two steps, so the second also reads the optimizer's moments.
    model.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
    return [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    "expert_form",
    [dict(), dict(hidden_units=8, gated=True, activation="silu")],
    ids=["linear", "swiglu"],
)
def test_dropless_update_equals_capacity_and_dense_updates(
    optimizer, expert_form
):
    rng = np.random.RandomState(0)
    # 16 x 8 tokens x 2 choices over 4 experts: blocks of 16 rows, several
    # blocks per expert.
    x = rng.normal(size=(16, 8, 6)).astype("float32")
    y = rng.normal(size=(16, 8, 5)).astype("float32")
    inputs = keras.Input(x.shape[1:])
    probe = keras.Model(
        inputs, MoE(num_experts=4, units=5, top_k=2, **expert_form)(inputs)
    )
    initial = [
        rng.normal(scale=0.5, size=w.shape).astype("float32")
        for w in probe.trainable_weights
    ]
    before = dict(zip([w.path for w in probe.trainable_weights], initial))

    results = {
        name: _trained_weights(dispatch, optimizer, expert_form, x, y, initial)
        for name, dispatch in DISPATCHES.items()
    }
    for name in ("capacity", "dense"):
        for path, got, want in zip(before, results["dropless"], results[name]):
            np.testing.assert_allclose(
                got - before[path],
                want - before[path],
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{optimizer}: {path}, dropless vs {name}",
            )
    # The step moved the expert weights (the comparison is not vacuous).
    moved = [
        np.abs(w - before[p]).max()
        for p, w in zip(before, results["dropless"])
        if "experts" in p
    ]
    assert min(moved) > 1e-4
