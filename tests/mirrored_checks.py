"""TensorFlow `MirroredStrategy` over 2 logical CPUs.

Not collected on its own: logical devices must be set before TensorFlow
starts, so `test_expert_parallel.py` runs this file in a fresh process.
Under the strategy each replica routes its own part of the batch: its
capacity, drops and balance loss are its own, as with `token_groups`
equal to the number of replicas, and the update is the mean of the
replicas' gradients, as Keras makes it for any loss.
"""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import moe_keras  # noqa: E402
from moe_keras import MoE  # noqa: E402

LEARNING_RATE = 0.5


def _model(**moe_kwargs):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12,))
    h = MoE(
        4,
        8,
        hidden_units=16,
        top_k=2,
        capacity_factor=0.75,
        name="moe",
        **moe_kwargs,
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 12)).astype("float32")
    return x, rng.normal(size=(32, 1)).astype("float32")


_STRATEGY = []


def _strategy():
    # One strategy for the module: a second one in the same process
    # starts its collectives' keys anew, and TensorFlow can then match an
    # all-reduce of one strategy with one of the other's.
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGY[0]


def _numpy(variables):
    return [np.asarray(v.numpy()) for v in variables]


def test_update_is_the_mean_of_the_replicas_own_steps():
    x, y = _data()
    with _strategy().scope():
        model = _model(load_balance_weight=0.5, z_loss_weight=0.01)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    # One device, each replica's half on its own: its capacity, its drops,
    # its balance and z-losses; then the mean of the two gradients.
    reference = _model(load_balance_weight=0.5, z_loss_weight=0.01)
    grads = []
    for half in (slice(0, 16), slice(16, 32)):
        with tf.GradientTape() as tape:
            prediction = reference(x[half], training=True)
            loss = tf.reduce_mean((prediction - y[half]) ** 2)
            loss = loss + sum(reference.losses)
        grads.append(tape.gradient(loss, reference.trainable_weights))
    expected = [
        w.numpy() - LEARNING_RATE * (g0 + g1).numpy() / 2
        for w, g0, g1 in zip(reference.trainable_weights, *grads)
    ]
    for got, want in zip(_numpy(model.trainable_weights), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _assert_trained_as_two_groups(model, **kwargs):
    """`model`, trained under the strategy, has the weights of one device
    trained on the same data in two token groups."""
    x, y = _data()
    reference = _model(token_groups=2, **kwargs)
    reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(
        _numpy(model.trainable_weights), _numpy(reference.trainable_weights)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_capacity_per_replica_is_token_groups_per_replica():
    x, y = _data()
    kwargs = dict(load_balance_weight=0.0, z_loss_weight=0.0)
    with _strategy().scope():
        model = _model(**kwargs)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    _assert_trained_as_two_groups(model, **kwargs)


def test_global_load_balance_is_one_device_with_token_groups():
    # Each replica routes its own half (capacity per replica), but the
    # balance loss counts the experts' fractions over both halves: the
    # mean update is then one device's over the whole batch in 2 groups.
    x, y = _data()
    kwargs = dict(load_balance_weight=0.5, z_loss_weight=0.01)
    with _strategy().scope():
        model = _model(global_load_balance=True, **kwargs)
        per_replica = _model(**kwargs)
    for m in (model, per_replica):
        m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    _assert_trained_as_two_groups(model, **kwargs)
    # Per replica, the router's update differs (the test above gives it).
    router = model.get_layer("moe").gate.trainable_weights[0]
    other = per_replica.get_layer("moe").gate.trainable_weights[0]
    assert not np.allclose(router.numpy(), other.numpy(), rtol=1e-5, atol=1e-6)


def _masked_model(**moe_kwargs):
    keras.utils.set_random_seed(5)
    tokens = keras.Input((10,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    h = MoE(4, 8, top_k=2, capacity_factor=2.0, name="moe", **moe_kwargs)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(tokens, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    return model


def test_global_load_balance_weights_replicas_by_their_tokens():
    # The first replica's sequences are long, the second's short: the
    # global loss counts every real token once, so each replica's part
    # must weigh by its share of them.
    rng = np.random.default_rng(1)
    x = rng.integers(1, 20, (16, 10))
    x[8:, 2:] = 0
    y = rng.normal(size=(16, 1)).astype("float32")
    kwargs = dict(
        load_balance_weight=0.5, z_loss_weight=0.0, global_load_balance=True
    )
    with _strategy().scope():
        model = _masked_model(**kwargs)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    reference = _masked_model(token_groups=2, **kwargs)
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(
        _numpy(model.trainable_weights), _numpy(reference.trainable_weights)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_routing_metrics_count_every_replica_batch():
    x, y = _data()
    with _strategy().scope():
        model = _model()
    callback = moe_keras.RoutingMetrics()
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback]
    ).history
    layer = model.get_layer("moe")
    # 2 steps of 2 replicas in the last epoch (reset between epochs).
    state = layer.statistics._variables["train"]["batches"]
    assert float(state.numpy()) == pytest.approx(4.0)
    for key in ("moe_dropped_fraction", "moe_load_imbalance"):
        assert len(history[key]) == 2 and np.isfinite(history[key]).all()
    load = layer.statistics.result("train")["expert_load"]
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-5)
