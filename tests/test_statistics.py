"""Routing statistics: layer state that changes nothing users get back
unless they ask (`RoutingMetrics`), and that is right on every backend."""

import pathlib

import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import MoE
from moe_keras import RoutingMetrics
from moe_keras import dispatch as dispatch_lib
from tests import reference


def _x(shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _classifier(with_moe):
    layers = [keras.Input((6,)), keras.layers.Dense(8, "relu")]
    if with_moe:
        layers.append(MoE(4, 8, top_k=2, hidden_units=8, name="moe"))
    layers.append(keras.layers.Dense(3, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def _labels(n, seed=1):
    return np.random.RandomState(seed).randint(0, 3, size=n)


def test_adding_an_moe_changes_nothing_in_what_keras_returns():
    x, y = _x((40, 6)), _labels(40)
    returned = {}
    for with_moe in (False, True):
        model = _classifier(with_moe)
        history = model.fit(
            x, y, validation_split=0.25, epochs=2, batch_size=8, verbose=0
        )
        # The classic unpacking works.
        test_loss, test_accuracy = model.evaluate(x, y, verbose=0)
        assert 0.0 <= test_accuracy <= 1.0 and np.isfinite(test_loss)
        returned[with_moe] = (
            sorted(history.history),
            sorted(model.evaluate(x, y, verbose=0, return_dict=True)),
            sorted(model.train_on_batch(x, y, return_dict=True)),
            len(model.train_on_batch(x, y)),
            sorted(model.test_on_batch(x, y, return_dict=True)),
        )
    assert returned[True] == returned[False]


def _numpy_routing(layer, batches, capacity_factor):
    """Per-batch load, imbalance, entropy and dropped fraction of a
    top-k softmax layer, recounted with NumPy from its weights."""
    loads, imbalance, entropy, dropped = [], [], [], []
    for x in batches:
        flat = x.reshape(-1, x.shape[-1])
        probs, _ = reference.gate_forward(layer.gate, flat)
        _, order = reference.top_k_weights(probs, layer.top_k, True)
        load = np.bincount(order.ravel(), minlength=layer.num_experts)
        load = load / order.size
        loads.append(load)
        imbalance.append(load.max() * layer.num_experts)
        entropy.append(-(probs * np.log(probs)).sum(-1).mean())
        if capacity_factor is not None:
            capacity = dispatch_lib.capacity(
                len(flat), layer.top_k, layer.num_experts, capacity_factor
            )
            keep = reference.capacity_keep(order, layer.num_experts, capacity)
            dropped.append(1.0 - keep.mean())
    return (
        np.mean(loads, 0),
        np.mean(imbalance),
        np.mean(entropy),
        np.mean(dropped) if dropped else None,
    )


def test_routing_metrics_in_fit_and_evaluate_match_a_numpy_recount():
    # SGD with a zero rate keeps the router fixed, so every batch of the
    # epoch can be recounted with the final weights.
    layer = MoE(
        4,
        3,
        top_k=2,
        capacity_factor=0.75,
        name="moe_stats",
        log_expert_load=True,
    )
    model = keras.Sequential([keras.Input((5, 3)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _x((24, 5, 3)), _x((24, 5, 3), 1)
    xv, yv = _x((10, 5, 3), 2), _x((10, 5, 3), 3)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        validation_data=(xv, yv),
        validation_batch_size=4,
        callbacks=[RoutingMetrics()],
        verbose=0,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    load, imbalance, entropy, dropped = _numpy_routing(
        layer, [x[i : i + 8] for i in range(0, 24, 8)], 0.75
    )
    assert logs["moe_stats_load_imbalance"] == pytest.approx(imbalance)
    assert logs["moe_stats_router_entropy"] == pytest.approx(entropy, 1e-4)
    assert logs["moe_stats_dropped_fraction"] == pytest.approx(dropped)
    for i in range(4):
        assert logs[f"moe_stats_expert_load_{i}"] == pytest.approx(load[i])
    for name in ("load_balance_loss", "z_loss", "aux_loss"):
        assert logs[f"moe_stats_{name}"] > 0.0
    # Validation reports what inference computed: dropless, no losses.
    v_load, v_imbalance, v_entropy, _ = _numpy_routing(
        layer, [xv[i : i + 4] for i in range(0, 10, 4)], None
    )
    assert logs["val_moe_stats_load_imbalance"] == pytest.approx(v_imbalance)
    assert logs["val_moe_stats_router_entropy"] == pytest.approx(
        v_entropy, 1e-4
    )
    for name in ("dropped_fraction", "load_balance_loss", "z_loss", "aux_loss"):
        assert f"val_moe_stats_{name}" not in logs
    # `evaluate` returns what it always does; the callback holds the same
    # inference statistics.
    routing = RoutingMetrics()
    results = model.evaluate(
        xv, yv, batch_size=4, callbacks=[routing], return_dict=True, verbose=0
    )
    assert sorted(results) == ["loss"]
    logs = routing.evaluate_logs
    assert logs["moe_stats_load_imbalance"] == pytest.approx(v_imbalance)
    assert logs["moe_stats_expert_load_0"] == pytest.approx(v_load[0])
    assert "moe_stats_aux_loss" not in logs


def test_expert_load_callback_reads_the_statistics_without_data():
    layer = MoE(4, 2, top_k=1, name="moe_load")
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = _x((32, 3))
    callback = moe_keras.ExpertLoadCallback()
    model.fit(
        x,
        _x((32, 2), 1),
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )
    load, *_ = _numpy_routing(layer, [x[:16], x[16:]], None)
    assert callback.history["moe_load"].shape == (2, 4)
    np.testing.assert_allclose(callback.history["moe_load"][-1], load)


def test_expert_load_callback_probes_data_as_inference_routes_it():
    # Routing ids and masks reach the layer: `data` goes through the
    # model, and the layer's inference record is put back afterwards.
    tokens = keras.Input((5,), dtype="int32")
    ids = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(9, 4, mask_zero=True)
    h = embedding(tokens)
    gate = moe_keras.gates.ClusterGate(num_clusters=3)
    layer = MoE(3, 2, top_k=1, gate=gate, name="moe_ids")
    model = keras.Model([tokens, ids], layer(h, routing_ids=ids))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    rng = np.random.default_rng(4)
    data = [rng.integers(0, 9, (6, 5)), rng.integers(0, 3, (6, 5))]
    data[0][:, 3:] = 0  # padding, masked
    layer.statistics.update(False, np.array([1.0, 0.0, 0.0]))
    kept = layer.statistics.result("eval")
    callback = moe_keras.ExpertLoadCallback(data=data)
    model.fit(data, _x((6, 5, 2)), epochs=1, verbose=0, callbacks=[callback])
    embedded = keras.ops.convert_to_numpy(embedding(data[0]))
    valid = data[0] != 0
    routing = gate(
        embedded.reshape(-1, 4), routing=True, top_k=1,
        routing_ids=data[1].reshape(-1),
    )  # fmt: skip
    chosen = keras.ops.convert_to_numpy(routing["indices"])[valid.ravel(), 0]
    expected = np.bincount(chosen, minlength=3) / valid.sum()
    np.testing.assert_allclose(callback.history["moe_ids"][-1], expected)
    np.testing.assert_allclose(
        layer.statistics.result("eval")["expert_load"], kept["expert_load"]
    )


def test_expert_choice_load_is_the_real_load():
    layer = MoE(4, 3, gate=moe_keras.ExpertChoiceGate(), capacity_factor=1.0)
    layer(_x((32, 3)), training=True)
    # Every expert takes exactly C tokens.
    result = layer.statistics.result("train")
    np.testing.assert_allclose(result["expert_load"], 0.25)
    assert result["load_imbalance"] == pytest.approx(1.0)
    # Masked tokens count in no expert's load.
    layer.statistics.reset()
    mask = np.ones((4, 8), bool)
    mask[:, 6:] = False
    layer(_x((4, 8, 3)), mask=mask, training=True)
    result = layer.statistics.result("train")
    assert result["expert_load"].sum() == pytest.approx(1.0)
    assert result["dropped_fraction"] >= 0.0


def test_statistics_off_makes_no_variables():
    layer = MoE(4, 3, top_k=2, routing_statistics=False)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert layer.non_trainable_weights == []
    assert MoE.from_config(layer.get_config()).routing_statistics is False
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="routing_statistics=False"):
        model.fit(
            _x((8, 3)),
            _x((8, 3), 1),
            verbose=0,
            callbacks=[RoutingMetrics()],
        )


def test_statistics_are_not_saved(tmp_path):
    model = keras.Sequential([keras.Input((3,)), MoE(4, 3, top_k=2)])
    model.compile("sgd", "mse")
    x = _x((8, 3))
    model.fit(x, _x((8, 3), 1), verbose=0)
    layer = model.layers[0]
    assert layer.statistics.result("train")["load_imbalance"] > 0
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # A fresh record, not the saved model's running sums.
    assert reloaded.layers[0].statistics.result("train") == {
        "expert_load": pytest.approx(np.zeros(4))
    }


def test_files_saved_before_the_statistics_load_unchanged():
    # Saved by moe_keras at f42e2fc (when the layer kept Keras metrics and
    # had no variables of its own): two MoE layers, trained a step.
    data = pathlib.Path(__file__).parent / "data"
    model = keras.saving.load_model(data / "saved_before_statistics.keras")
    x = np.random.RandomState(0).randn(8, 5, 3).astype("float32")
    expected = np.load(data / "saved_before_statistics_predictions.npy")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
    )
    # It keeps training, with a fresh record of its routing.
    history = model.fit(
        x, _x((8, 5, 2)), verbose=0, callbacks=[RoutingMetrics()]
    )
    assert "moe_a_load_imbalance" in history.history
