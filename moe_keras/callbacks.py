"""Callbacks that read the routing statistics of a model's MoE layers."""

import keras
import numpy as np

from moe_keras import _validation


def _moe_layers(model, caller):
    from moe_keras.moe import MoE

    layers = [
        layer for layer in model._flatten_layers() if isinstance(layer, MoE)
    ]
    if not layers:
        raise ValueError(f"{caller}: the model has no MoE layer.")
    return layers


def _tracked(layers, caller):
    missing = [layer.name for layer in layers if layer.statistics is None]
    if missing:
        raise ValueError(
            f"{caller} reads the layers' routing statistics, but "
            f"{missing} were made with routing_statistics=False (or are "
            "not built yet)."
        )
    return layers


class RoutingMetrics(keras.callbacks.Callback):
    """Puts each `MoE` layer's routing statistics in the epoch logs.

    Without it, adding MoE layers changes nothing in what `fit`,
    `evaluate` and `train_on_batch` return. With it, each epoch's logs
    (the progress bar's epoch line, `History`, `CSVLogger`, TensorBoard)
    carry, per layer, `<name>_load_imbalance` (max over mean expert load),
    `<name>_router_entropy`, `<name>_dropped_fraction` (where a capacity
    applies) and `<name>_load_balance_loss`, `<name>_z_loss`,
    `<name>_aux_loss`: each the mean over the epoch's training batches,
    read from the layers' state (no extra forward pass, no per-step cost).
    Validation adds `val_<name>_...` for what inference computed (no
    losses). Layers made with `log_expert_load=True` add
    `<name>_expert_load_<i>`.

    `evaluate` returns what it always returns; its routing statistics are
    in `evaluate_logs` afterwards (and in the logs that callbacks after
    this one see at the end of the evaluation). The model's `MoE` layers
    must keep routing statistics (`routing_statistics=True`, the default):
    a `ValueError` otherwise, as for a model with no `MoE` layer.

    Attributes:
        evaluate_logs: dict, the routing statistics of the last
            evaluation, by log name.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), MoE(4, 2, top_k=1, name="moe")]
    ... )
    >>> model.compile("sgd", "mse")
    >>> x, y = np.random.rand(8, 4), np.random.rand(8, 2)
    >>> history = model.fit(x, y, epochs=1, verbose=0,
    ...                     callbacks=[RoutingMetrics()])
    >>> sorted(name for name in history.history if name.startswith("moe_"))
    ['moe_aux_loss', 'moe_dropped_fraction', 'moe_load_balance_loss',
     'moe_load_imbalance', 'moe_router_entropy', 'moe_z_loss']
    >>> routing = RoutingMetrics()
    >>> _ = model.evaluate(x, y, verbose=0, callbacks=[routing])
    >>> sorted(routing.evaluate_logs)  # dropless at inference: no drops
    ['moe_load_imbalance', 'moe_router_entropy']
    """

    def __init__(self):
        super().__init__()
        self.evaluate_logs = {}
        self._validated = False

    def _layers(self):
        return _tracked(
            _moe_layers(self.model, "RoutingMetrics"), "RoutingMetrics"
        )

    def _results(self, phase, prefix=""):
        logs = {}
        for layer in self._layers():
            result = layer.statistics.result(phase)
            load = result.pop("expert_load")
            for name, value in result.items():
                logs[f"{prefix}{layer.name}_{name}"] = value
            if layer.log_expert_load:
                for i, value in enumerate(load):
                    logs[f"{prefix}{layer.name}_expert_load_{i}"] = float(value)
        return logs

    def on_epoch_begin(self, epoch, logs=None):
        self._validated = False
        for layer in self._layers():
            layer.statistics.reset("train")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(self._results("train"))
        if self._validated:
            logs.update(self._results("eval", prefix="val_"))

    def on_test_begin(self, logs=None):
        for layer in self._layers():
            layer.statistics.reset("eval")

    def on_test_end(self, logs=None):
        self.evaluate_logs = self._results("eval")
        self._validated = True
        if logs is not None:
            logs.update(self.evaluate_logs)


class ExpertLoadCallback(keras.callbacks.Callback):
    """Records each `MoE` layer's per-expert load after every epoch.

    The load of an expert is the fraction of routing assignments it
    received (the mean gate distribution for a dense mixture). Without
    `data` it is the layer's routing statistics averaged over the epoch's
    training batches, on any backend and with no extra forward pass; with
    `data`, it is measured on those inputs at the end of each epoch by
    one `predict` of the model, which routes them as inference does
    (masks, `routing_ids` inputs and all; the layers' inference
    statistics are put back afterwards). Layers made with
    `routing_statistics=False` are probed by their gate alone, on their
    inputs without masks or routing ids; without `data` they are a
    `ValueError` when training begins.

    Args:
        data: optional array (or list of arrays) of model inputs to probe
            the routing with. Defaults to `None`: the training batches'
            statistics.
        log_dir: optional TensorBoard directory: per-expert load scalars
            (`<layer>/expert_<i>`) and a histogram per layer, each epoch
            (needs TensorFlow and tensorboard). Defaults to `None`.
        heatmap_path: optional PNG path: at the end of training, a heat map
            of load over epochs for every MoE layer (needs matplotlib).
            Defaults to `None`.

    Attributes:
        history: dict mapping each layer's name to its loads, a list of
            `[experts]` arrays while training and a `[epochs, experts]`
            array when it ends.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), MoE(4, 2, name="moe")])
    >>> model.compile("sgd", "mse")
    >>> loads = ExpertLoadCallback()
    >>> x, y = np.random.rand(8, 4), np.random.rand(8, 2)
    >>> _ = model.fit(x, y, epochs=1, verbose=0, callbacks=[loads])
    >>> loads.history["moe"].shape  # (epochs, experts)
    (1, 4)
    >>> round(float(loads.history["moe"].sum()), 3)  # fractions of all
    1.0
    """

    def __init__(self, data=None, log_dir=None, heatmap_path=None):
        super().__init__()
        self.data = data
        self.log_dir = log_dir
        self.heatmap_path = heatmap_path
        self.history = {}
        self._writer = None
        self._probe = None

    def on_train_begin(self, logs=None):
        self._layers = _moe_layers(self.model, "ExpertLoadCallback")
        self.history = {layer.name: [] for layer in self._layers}
        self._probe = None
        if self.data is None:
            _tracked(self._layers, "ExpertLoadCallback without `data`")
        elif any(layer.statistics is None for layer in self._layers):
            self._probe = keras.Model(
                self.model.inputs, [layer.input for layer in self._layers]
            )
        if self.log_dir is not None:
            import tensorflow as tf

            try:
                import tensorboard  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "ExpertLoadCallback(log_dir=...) writes TensorBoard "
                    "summaries: `pip install tensorboard`."
                ) from error
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _predicted_loads(self):
        """Each layer's load over `data`, from its own inference record."""
        kept = [layer.statistics.snapshot("eval") for layer in self._layers]
        try:
            for layer in self._layers:
                layer.statistics.reset("eval")
            # One batch: the record averages batches, and the load of the
            # probe is its assignments' share over all its tokens.
            first = keras.tree.flatten(self.data)[0]
            self.model.predict(
                self.data, batch_size=max(len(first), 1), verbose=0
            )
            return [
                layer.statistics.result("eval")["expert_load"]
                for layer in self._layers
            ]
        finally:
            for layer, values in zip(self._layers, kept):
                layer.statistics.restore("eval", values)

    def _probe_loads(self):
        if self._probe is None:
            return self._predicted_loads()
        inputs = self._probe.predict(self.data, verbose=0)
        if len(self._layers) == 1:
            inputs = [inputs]
        loads = []
        for layer, x in zip(self._layers, inputs):
            x = np.reshape(x, (-1, x.shape[-1])).astype("float32")
            routing = layer.gate(x, routing=True, top_k=layer.top_k)
            load = layer._token_load(routing, valid=None)
            loads.append(np.asarray(keras.ops.convert_to_numpy(load)))
        return loads

    def on_epoch_begin(self, epoch, logs=None):
        if self.data is None:
            for layer in self._layers:
                layer.statistics.reset("train")

    def on_epoch_end(self, epoch, logs=None):
        if self.data is not None:
            loads = self._probe_loads()
        else:
            loads = [
                layer.statistics.result("train")["expert_load"]
                for layer in self._layers
            ]
        for layer, load in zip(self._layers, loads):
            self.history[layer.name].append(load)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default():
                for layer, load in zip(self._layers, loads):
                    for i, value in enumerate(load):
                        tf.summary.scalar(
                            f"{layer.name}/expert_{i}", value, step=epoch
                        )
                    tf.summary.histogram(f"{layer.name}/load", load, step=epoch)
            self._writer.flush()

    def on_train_end(self, logs=None):
        self.history = {k: np.stack(v) for k, v in self.history.items() if v}
        if self.heatmap_path is not None and self.history:
            self.plot(self.heatmap_path)

    def plot(self, path):
        """Writes the heat map of load over epochs to `path` (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.history)
        fig, axes = plt.subplots(
            len(names), 1, figsize=(7, 2.2 * len(names) + 0.8), squeeze=False
        )
        for ax, name in zip(axes[:, 0], names):
            load = np.asarray(self.history[name])
            image = ax.imshow(
                load.T, aspect="auto", cmap="viridis", origin="lower"
            )
            ax.set_title(f"{name}: expert load (fraction of assignments)")
            ax.set_xlabel("epoch")
            ax.set_ylabel("expert")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def accuracy_score(y_true, y_pred):
    """Accuracy of predictions `y_pred` `[N, classes]` (or `[N, 1]`
    probabilities of the positive class) against `y_true`: integer labels
    or one-hot rows."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_pred.ndim >= 2 and y_pred.shape[-1] == 1:
        predicted = (y_pred[..., 0] > 0.5).astype("int64")
        return float(np.mean(predicted == y_true.reshape(predicted.shape)))
    predicted = np.argmax(y_pred, axis=-1)
    if y_true.shape == y_pred.shape:
        y_true = np.argmax(y_true, axis=-1)
    return float(np.mean(predicted == y_true.reshape(predicted.shape)))


class ExpertPerformanceCallback(keras.callbacks.Callback):
    """Weights the experts by their measured performance, `p_e / sum_j p_j`.

    This is the classic performance-based weighting. For every `MoE`
    layer whose gate is a `PerformanceGate`, and every expert e of it, the
    model predicts `validation_data` with that layer sending everything to
    expert e alone (its scores set to one-hot e, with the dense dispatch);
    `p_e` is `metric` of those predictions (by default accuracy). The
    measured scores are then set on the gate, so the next epoch (and
    `predict`, and the saved model) uses them. That costs one `predict`
    of the validation data per expert, at the end of every epoch; call
    `measure()` to do it once outside `fit` (after training the experts,
    say).

    If every expert of a layer scores 0, the layer keeps its scores (the
    weights `p / sum(p)` would be undefined) and a warning is printed. A
    model with no `PerformanceGate` is a `ValueError` when training
    begins.

    Args:
        validation_data: tuple `(x, y)`, inputs and targets to score on (a
            `ValueError` otherwise).
        metric: `"accuracy"` (integer or one-hot labels; one output column
            is read as the positive class's probability) or a callable
            `metric(y_true, y_pred) -> float`, >= 0 and higher for better
            (a `TypeError` otherwise). Defaults to `"accuracy"`.
        batch_size: int or None, for `predict`. Defaults to `None`
            (Keras' default of 32).

    Attributes:
        history: dict mapping each measured layer's name to the scores of
            every measurement, `[measurements, experts]`.

    Example:

    >>> moe = MoE(3, 2, gate=PerformanceGate(), name="moe")
    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), moe, keras.layers.Softmax()]
    ... )
    >>> model.compile("sgd", "sparse_categorical_crossentropy")
    >>> x, y = np.random.rand(8, 4), np.array([0, 1] * 4)
    >>> callback = ExpertPerformanceCallback(validation_data=(x, y))
    >>> _ = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    >>> callback.history["moe"].shape  # one measurement of three experts
    (1, 3)
    """

    def __init__(self, validation_data, metric="accuracy", batch_size=None):
        super().__init__()
        if (
            not isinstance(validation_data, (tuple, list))
            or len(validation_data) != 2
        ):
            raise ValueError(
                "`validation_data` must be a tuple `(x, y)`; received "
                f"validation_data of type {type(validation_data).__name__}."
            )
        if metric == "accuracy":
            metric = accuracy_score
        if not callable(metric):
            raise TypeError(
                "`metric` must be 'accuracy' or a callable "
                f"`metric(y_true, y_pred) -> float`; received metric={metric!r}."
            )
        self.validation_data = tuple(validation_data)
        self.metric = metric
        self.batch_size = _validation.positive_int(
            batch_size, "batch_size", allow_none=True
        )
        self.history = {}

    def _layers(self, model):
        from moe_keras.gates import PerformanceGate

        layers = [
            layer
            for layer in _moe_layers(model, "ExpertPerformanceCallback")
            if isinstance(layer.gate, PerformanceGate)
        ]
        if not layers:
            raise ValueError(
                "ExpertPerformanceCallback sets the scores of "
                "`PerformanceGate` routers; the model's MoE layers have none."
            )
        return layers

    def measure(self, model=None):
        """Scores every expert alone, sets the scores on the gates and
        returns them, `{layer name: [E] scores}`."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError(
                "ExpertPerformanceCallback.measure() needs a model: pass "
                "one, or use the callback in `fit`."
            )
        x, y = self.validation_data
        measured = {}
        for layer in self._layers(model):
            gate = layer.gate
            kept = np.array(keras.ops.convert_to_numpy(gate.scores))
            scores = []
            # Every token goes to one expert: the dense dispatch scores it
            # on all of them, where an inference capacity would drop most.
            dispatch = layer.dispatch
            if layer.sparse:
                layer.dispatch = "dense"
                model.predict_function = None
            try:
                for e in range(layer.num_experts):
                    gate.scores.assign(
                        np.eye(layer.num_experts, dtype="float32")[e]
                    )
                    predictions = model.predict(
                        x, batch_size=self.batch_size, verbose=0
                    )
                    scores.append(float(self.metric(y, predictions)))
            finally:
                gate.scores.assign(kept)
                if layer.dispatch != dispatch:
                    layer.dispatch = dispatch
                    model.predict_function = None
            scores = np.asarray(scores, dtype="float32")
            if (
                np.all(np.isfinite(scores))
                and np.all(scores >= 0)
                and (scores.sum() > 0)
            ):
                gate.set_scores(scores)
            else:
                print(
                    f"ExpertPerformanceCallback: layer '{layer.name}' keeps "
                    f"its scores; measured {scores.tolist()} (the weights "
                    "need finite scores >= 0, not all 0)."
                )
            earlier = self.history.get(layer.name)
            self.history[layer.name] = (
                scores[None]
                if earlier is None
                else np.concatenate([earlier, scores[None]])
            )
            measured[layer.name] = scores
        return measured

    def on_train_begin(self, logs=None):
        self._layers(self.model)  # fails now, not after an epoch

    def on_epoch_end(self, epoch, logs=None):
        self.measure()
