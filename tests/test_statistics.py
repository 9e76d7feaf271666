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


# --------------------------------------------------------------------------
# Dead experts, load spread, co-selection, router gradients, TensorBoard
# --------------------------------------------------------------------------

JIT = keras.backend.backend() != "torch"  # torch.compile: see backend_marks


def _starved_layer(name):
    """A top-2 layer of 4 experts on 3 features whose expert 3 can never
    win a slot on inputs >= 0: its logit is -5 * sum(x), expert i's
    (i < 3) is 2 * x_i >= 0, so the two largest features pick."""
    layer = MoE(4, 2, top_k=2, name=name)
    layer.build((None, 3))
    kernel = np.full((3, 4), -5.0, "float32")
    kernel[:, :3] = 2 * np.eye(3)
    layer.gate.kernel.assign(kernel)
    return layer


def _numpy_selection(layer, x, valid):
    """Per-batch load `[E]` and co-selection `[E, E]` of the unmasked
    tokens of `x` `[T, d]`."""
    probs, _ = reference.gate_forward(layer.gate, x)
    _, order = reference.top_k_weights(probs, layer.top_k, True)
    order = order[valid]
    chose = np.zeros((len(order), layer.num_experts))
    np.put_along_axis(chose, order, 1.0, axis=1)
    load = np.bincount(order.ravel(), minlength=layer.num_experts)
    return load / order.size, chose.T @ chose / len(order)


def _spread(load):
    return {
        "dead_experts": np.mean(load == 0),
        "load_cv": np.std(load) / np.mean(load),
        "min_expert_load": load.min(),
        "max_expert_load": load.max(),
    }


def test_dead_experts_load_spread_and_co_selection_match_numpy():
    # Through `fit` (XLA-compiled where the backend allows) with masked
    # padding; a zero learning rate keeps the router as set.
    layer = _starved_layer("moe")
    model = keras.Sequential(
        [keras.Input((4, 3)), keras.layers.Masking(0.0), layer]
    )
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=JIT)
    x = np.abs(_x((6, 4, 3)))
    x[:, 3] = 0.0  # padding: masked, chooses nothing
    x[0, 2] = 0.0
    history = model.fit(
        x,
        _x((6, 4, 2), 1),
        batch_size=3,
        shuffle=False,
        validation_data=(x[:3], _x((3, 4, 2), 2)),
        callbacks=[RoutingMetrics()],
        verbose=0,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    loads, pairs = zip(
        *(
            _numpy_selection(layer, b.reshape(-1, 3), b.reshape(-1, 3).any(-1))
            for b in (x[:3], x[3:])
        )
    )
    load = np.mean(loads, 0)
    assert load[3] == 0.0 and load[:3].min() > 0
    for name, value in _spread(load).items():
        assert logs[f"moe_{name}"] == pytest.approx(value, rel=1e-5), name
    val_load, _ = _numpy_selection(
        layer, x[:3].reshape(-1, 3), x[:3].reshape(-1, 3).any(-1)
    )
    for name, value in _spread(val_load).items():
        assert logs[f"val_moe_{name}"] == pytest.approx(value, rel=1e-5)
    result = layer.statistics.result("train")
    np.testing.assert_allclose(
        result["co_selection"], np.mean(pairs, 0), atol=1e-6
    )
    assert "moe_co_selection" not in logs  # a matrix, not a log scalar


def test_dense_mixture_has_no_co_selection_and_no_dead_expert():
    layer = MoE(3, 2, top_k=None)
    layer(_x((5, 2)))
    result = layer.statistics.result("eval")
    probs, _ = reference.gate_forward(layer.gate, _x((5, 2)))
    assert "co_selection" not in result
    assert result["dead_experts"] == 0.0
    assert result["load_cv"] == pytest.approx(
        np.std(probs.mean(0)) / np.mean(probs.mean(0)), rel=1e-4
    )


def _regression(seed, **kwargs):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((2,)), MoE(3, 2, hidden_units=4, name="moe", **kwargs)]
    )
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def _finite_difference_norms(model, x, y, eps=1e-3):
    """Central differences of the training loss and of the added losses
    over each entry of the router kernel: no autodiff."""
    kernel = model.get_layer("moe").gate.kernel
    start = keras.ops.convert_to_numpy(kernel).astype("float64")

    def losses(value):
        kernel.assign(value.astype("float32"))
        y_pred = model(x, training=True)
        total = model.compute_loss(x, y, y_pred, training=True)
        added = sum(float(keras.ops.convert_to_numpy(v)) for v in model.losses)
        return np.array([float(keras.ops.convert_to_numpy(total)), added])

    grads = np.zeros((2,) + start.shape)
    for index in np.ndindex(start.shape):
        step = np.zeros_like(start)
        step[index] = eps
        grads[(slice(None),) + index] = (
            losses(start + step) - losses(start - step)
        ) / (2 * eps)
    kernel.assign(start.astype("float32"))
    return np.sqrt((grads**2).sum(axis=(1, 2)))


def test_router_gradient_norms_match_finite_differences():
    model = _regression(0, top_k=2, load_balance_weight=0.5)
    x, y = _x((8, 2), 3), _x((8, 2), 4)
    model.get_layer("moe").statistics.reset()
    norms = moe_keras.router_gradient_norms(model, x, y)["moe"]
    # Measured without a trace: no routing record, no changed weight.
    assert model.get_layer("moe").statistics.result("train") == {
        "expert_load": pytest.approx(np.zeros(3))
    }
    total, added = _finite_difference_norms(model, x, y)
    assert norms["total"] == pytest.approx(total, rel=2e-2)
    assert norms["auxiliary"] == pytest.approx(added, rel=2e-2)
    assert added > 0 and total > added


def test_router_gradient_is_zero_where_no_loss_reaches_the_router():
    # Top-1 with its weight renormalised to 1: the output does not depend
    # on the router's probabilities, so only auxiliary losses train it.
    gate = dict(top_k=1, gate=moe_keras.SoftmaxGate(normalize_top_k=True))
    x, y = _x((8, 2), 3), _x((8, 2), 4)
    cut = _regression(0, load_balance_weight=0.0, z_loss_weight=0.0, **gate)
    norms = moe_keras.router_gradient_norms(cut, x, y)["moe"]
    assert norms["total"] < 1e-6 and norms["auxiliary"] == 0.0
    # A balance loss reaches it: all of its gradient is that loss's.
    balanced = _regression(0, load_balance_weight=0.5, **gate)
    norms = moe_keras.router_gradient_norms(balanced, x, y)["moe"]
    assert norms["auxiliary"] > 1e-3
    assert norms["total"] == pytest.approx(norms["auxiliary"], rel=1e-4)


def test_routing_metrics_logs_the_router_gradient_norms():
    model = _regression(1, top_k=2)
    x, y = _x((8, 2), 3), _x((8, 2), 4)
    callback = RoutingMetrics(gradient_data=(x, y))
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    # SGD(0): the router the callback measured is the one still there.
    norms = moe_keras.router_gradient_norms(model, x, y)["moe"]
    logs = history.history
    assert logs["moe_router_grad_norm"][0] == pytest.approx(norms["total"])
    assert logs["moe_router_aux_grad_norm"][0] == pytest.approx(
        norms["auxiliary"]
    )
    with pytest.raises(ValueError, match="gradient_data"):
        RoutingMetrics(gradient_data=x)


def test_expert_load_callback_writes_heat_map_and_co_selection_images(
    tmp_path,
):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    layer = _starved_layer("moe")
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.abs(_x((8, 3)))
    callback = moe_keras.ExpertLoadCallback(log_dir=str(tmp_path / "load"))
    # Keras' own TensorBoard callback writes what RoutingMetrics logs.
    board = keras.callbacks.TensorBoard(str(tmp_path / "keras"))
    model.fit(
        x,
        _x((8, 2), 1),
        epochs=2,
        verbose=0,
        callbacks=[callback, RoutingMetrics(), board],
    )
    images, scalars = {}, {}
    for path in tmp_path.rglob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "epoch_moe_dead_experts":
                    scalars[event.step] = tf.make_ndarray(value.tensor)
                if value.tag in ("moe/load_heatmap", "moe/co_selection"):
                    png = tf.make_ndarray(value.tensor)[2]
                    images[value.tag, event.step] = tf.io.decode_png(
                        png
                    ).numpy()[..., 0]
    load, pairs = _numpy_selection(layer, x, np.ones(8, bool))
    # The heat map of the last epoch: a row per expert, a column per
    # epoch, 8 x 8 pixels per entry, white for the largest load.
    heat_map = np.kron(np.stack([load, load], 1), np.ones((8, 8)))
    np.testing.assert_allclose(
        images["moe/load_heatmap", 1], 255 * heat_map / load.max(), atol=1
    )
    assert images["moe/load_heatmap", 0].shape == (32, 8)
    co_selection = np.kron(pairs, np.ones((8, 8)))
    np.testing.assert_allclose(
        images["moe/co_selection", 1], 255 * co_selection / pairs.max(), atol=1
    )
    np.testing.assert_allclose(callback.co_selection["moe"][-1], pairs)
    assert scalars == {0: 0.25, 1: 0.25}  # expert 3 of 4 never chosen
