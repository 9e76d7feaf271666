"""Property tests over the routing configuration space.

Hypothesis draws the number of experts, k, input rank, batch size
(including 0 and 1), masks, capacity factors (None and odd fractions),
gates, expert forms and dispatch modes, and checks what must hold for
every one of them:

- the sparse dispatch equals a NumPy recount of the routing, with
  exactly the assignments the capacity rule drops (none when dropless,
  in blocks or on sorted rows with a grouped matmul);
- where nothing is dropped it equals the dense dispatch, in outputs and
  in the weights after one Adam step;
- no value crosses between samples: a NaN in one sample leaves every
  other sample finite, and unchanged where no capacity is in play;
- shapes and dtypes are what `compute_output_spec` promises.
"""

import keras
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moe_keras import MoE
from moe_keras import dispatch as dispatch_lib
from tests import reference
from tests.backend_marks import derandomized

BACKEND = keras.backend.backend()
SETTINGS = derandomized(50, jax_examples=6)
GROUPED = ["blocks", "reference"]
EXPERT_FORMS = [
    dict(),
    dict(hidden_units=5, activation="relu"),
    dict(hidden_units=5, activation="silu", gated=True),
]


@st.composite
def configs(draw):
    num_experts = draw(st.integers(1, 6), label="E")
    top_k = draw(st.integers(1, num_experts), label="k")
    rank = draw(st.sampled_from([2, 3]), label="rank")
    batch = draw(st.sampled_from([0, 1, 2, 3, 5]), label="batch")
    shape = (batch,) if rank == 2 else (batch, draw(st.integers(1, 4)))
    capacity_factor = draw(
        st.sampled_from([None, 1.0, 1.25, 1.2345678, 0.3, 2.0 / 3.0, 8.0]),
        label="capacity_factor",
    )
    return dict(
        num_experts=num_experts,
        top_k=top_k,
        shape=shape,
        features=3,
        units=draw(st.integers(1, 4), label="units"),
        gate=draw(st.sampled_from(["softmax", "sigmoid"]), label="gate"),
        form=draw(st.sampled_from(range(len(EXPERT_FORMS))), label="form"),
        capacity_factor=capacity_factor,
        masked=draw(st.booleans(), label="masked") and rank == 3,
        training=draw(st.booleans(), label="training"),
        seed=draw(st.integers(0, 2**16), label="seed"),
        # How dropless runs its experts: blocks, or sorted rows on a
        # grouped matmul (any shape runs on these two). Not drawn on JAX,
        # whose compiles are the suite's budget; the sorted rows are the
        # same `keras.ops` on every backend, and tests/test_grouped_matmul.py
        # runs JAX's kernel path.
        grouped_matmul=(
            draw(st.sampled_from(GROUPED), label="grouped")
            if BACKEND != "jax"
            else "blocks"
        ),
    )


def _layer(config, dispatch):
    layer = MoE(
        num_experts=config["num_experts"],
        units=config["units"],
        top_k=config["top_k"],
        gate=config["gate"],
        dispatch=dispatch,
        capacity_factor=config["capacity_factor"],
        eval_capacity_factor=config["capacity_factor"],
        grouped_matmul=config["grouped_matmul"],
        **EXPERT_FORMS[config["form"]],
    )
    layer.build(config["shape"] + (config["features"],))
    return layer


def _data(config):
    rng = np.random.RandomState(config["seed"])
    x = rng.normal(size=config["shape"] + (config["features"],))
    mask = None
    if config["masked"]:
        mask = rng.uniform(size=config["shape"]) > 0.3
    return x.astype("float32"), mask


def _randomize(layers, seed):
    rng = np.random.RandomState(seed + 1)
    values = [
        rng.normal(scale=0.7, size=w.shape).astype("float32")
        for w in layers[0].weights
    ]
    for layer in layers:
        layer.set_weights(values)


def _capacity(config, tokens):
    return dispatch_lib.capacity(
        tokens,
        config["top_k"],
        config["num_experts"],
        config["capacity_factor"],
    )


@SETTINGS
@given(configs())
def test_sparse_matches_numpy_routing_and_output_spec(config):
    layer = _layer(config, "sparse")
    _randomize([layer], config["seed"])
    x, mask = _data(config)
    y = layer(x, mask=mask, training=config["training"])

    spec = layer.compute_output_spec(keras.KerasTensor(x.shape))
    assert tuple(y.shape) == tuple(spec.shape)
    assert keras.backend.standardize_dtype(y.dtype) == spec.dtype

    flat = x.reshape(-1, config["features"])
    valid = None if mask is None else mask.reshape(-1)
    expected = reference.moe_forward(
        layer, flat, capacity=_capacity(config, len(flat)), valid=valid
    )
    if valid is not None:
        expected[~valid] = 0.0
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y).reshape(expected.shape),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )


@SETTINGS
@given(configs())
def test_no_value_crosses_between_samples(config):
    batch = config["shape"][0]
    if batch < 2:
        return
    layer = _layer(config, "sparse")
    _randomize([layer], config["seed"])
    x, mask = _data(config)
    clean = keras.ops.convert_to_numpy(
        layer(x, mask=mask, training=config["training"])
    )
    x[0] = np.nan
    y = keras.ops.convert_to_numpy(
        layer(x, mask=mask, training=config["training"])
    )
    assert np.all(np.isfinite(y[1:]))
    if mask is not None:
        assert np.all(y[~mask] == 0.0)
    if config["capacity_factor"] is None:
        np.testing.assert_allclose(y[1:], clean[1:], rtol=1e-5, atol=1e-6)


def _adam_step(layer, x, y, mask):
    """One Adam step on `mse(layer(x), y) + aux losses`; the new weights."""
    optimizer = keras.optimizers.Adam(0.01)
    variables = layer.trainable_variables

    def loss_of(outputs, losses):
        total = keras.ops.mean(keras.ops.square(keras.ops.subtract(outputs, y)))
        return total + sum(losses)

    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = layer(x, mask=mask, training=True)
            loss = loss_of(outputs, layer.losses)
        grads = tape.gradient(loss, [v.value for v in variables])
    elif BACKEND == "torch":
        import torch

        outputs = layer(x, mask=mask, training=True)
        loss = loss_of(outputs, layer.losses)
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    else:
        import jax

        frozen = [v.value for v in layer.non_trainable_variables]

        def fn(values):
            outputs, _, losses = layer.stateless_call(
                values, frozen, x, mask=mask, training=True, return_losses=True
            )
            return loss_of(outputs, losses)

        grads = jax.grad(fn)([v.value for v in variables])
    optimizer.apply(grads, variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


@SETTINGS
@given(configs())
def test_sparse_equals_dense_where_nothing_is_dropped(config):
    x, mask = _data(config)
    tokens = int(np.prod(config["shape"]))
    capacity = _capacity(config, tokens)
    routed = tokens if mask is None else int(mask.sum())
    if capacity is not None and capacity < routed:
        # Nothing is dropped only if every expert has room for every
        # routed token; otherwise the NumPy test above covers it.
        config = dict(config, capacity_factor=None)
    sparse = _layer(config, "sparse")
    dense = _layer(config, "dense")
    _randomize([sparse, dense], config["seed"])
    for training in (False, True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(sparse(x, mask=mask, training=training)),
            keras.ops.convert_to_numpy(dense(x, mask=mask, training=training)),
            rtol=1e-4,
            atol=1e-5,
        )
    target = np.random.RandomState(config["seed"] + 2).normal(
        size=config["shape"] + (config["units"],)
    )
    target = target.astype("float32")
    for got, want in zip(
        _adam_step(sparse, x, target, mask), _adam_step(dense, x, target, mask)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
