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
    `<name>_sequence_balance_loss` (where its weight is set),
    `<name>_aux_loss`: each the mean over the epoch's training batches,
    read from the layers' state (no extra forward pass, no per-step cost).
    From the epoch's per-expert load: `<name>_dead_experts` (the fraction
    of experts that took no assignment), `<name>_load_cv` (the load's
    coefficient of variation, 0 when balanced) and
    `<name>_min_expert_load`, `<name>_max_expert_load` (fractions of the
    assignments; 1/E each when balanced). Validation adds
    `val_<name>_...` for what inference computed (no losses). Layers made
    with `log_expert_load=True` add `<name>_expert_load_<i>`.

    With `gradient_data`, each epoch's end also measures the gradient
    that reaches each layer's router (`moe_keras.router_gradient_norms`,
    one eager forward and backward pass of that batch) and logs
    `<name>_router_grad_norm` (of the whole training loss) and
    `<name>_router_aux_grad_norm` (of the added losses alone): 0 shows a
    router that the loss does not train.

    `evaluate` returns what it always returns; its routing statistics are
    in `evaluate_logs` afterwards (and in the logs that callbacks after
    this one see at the end of the evaluation). The model's `MoE` layers
    must keep routing statistics (`routing_statistics=True`, the default):
    a `ValueError` otherwise, as for a model with no `MoE` layer.

    Args:
        gradient_data: optional tuple `(x, y)` or `(x, y, sample_weight)`,
            one batch to measure the router gradients on. Defaults to
            `None`: no gradient is measured.

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
    ['moe_aux_loss', 'moe_dead_experts', 'moe_dropped_fraction',
     'moe_load_balance_loss', 'moe_load_cv', 'moe_load_imbalance',
     'moe_max_expert_load', 'moe_min_expert_load', 'moe_router_entropy',
     'moe_z_loss']
    >>> routing = RoutingMetrics()
    >>> _ = model.evaluate(x, y, verbose=0, callbacks=[routing])
    >>> sorted(routing.evaluate_logs)  # dropless at inference: no drops
    ['moe_dead_experts', 'moe_load_cv', 'moe_load_imbalance',
     'moe_max_expert_load', 'moe_min_expert_load', 'moe_router_entropy']
    >>> gradients = RoutingMetrics(gradient_data=(x, y))
    >>> history = model.fit(x, y, epochs=1, verbose=0, callbacks=[gradients])
    >>> history.history["moe_router_grad_norm"][0] >= 0.0
    True
    """

    def __init__(self, gradient_data=None):
        super().__init__()
        if gradient_data is not None and (
            not isinstance(gradient_data, (tuple, list))
            or len(gradient_data) not in (2, 3)
        ):
            raise ValueError(
                "`gradient_data` must be a tuple `(x, y)` or "
                "`(x, y, sample_weight)`; received gradient_data of type "
                f"{type(gradient_data).__name__}."
            )
        self.gradient_data = gradient_data
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
            result.pop("co_selection", None)  # [E, E]: not a log scalar
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
        if self.gradient_data is not None:
            from moe_keras._router_gradients import router_gradient_norms

            norms = router_gradient_norms(self.model, *self.gradient_data)
            for name, norm in norms.items():
                logs[f"{name}_router_grad_norm"] = norm["total"]
                logs[f"{name}_router_aux_grad_norm"] = norm["auxiliary"]

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
        log_dir: optional TensorBoard directory: each epoch, per layer,
            per-expert load scalars (`<layer>/expert_<i>`), a histogram
            of the load (`<layer>/load`), the heat map of load over the
            epochs so far (image `<layer>/load_heatmap`: a row per
            expert, a column per epoch, white for the largest load) and
            the co-selection matrix (image `<layer>/co_selection`, white
            for the largest entry) where the router picks experts per
            token (needs TensorFlow and tensorboard). Defaults to `None`.
        heatmap_path: optional PNG path: at the end of training, a heat map
            of load over epochs for every MoE layer (needs matplotlib).
            Defaults to `None`.

    Attributes:
        history: dict mapping each layer's name to its loads, a list of
            `[experts]` arrays while training and a `[epochs, experts]`
            array when it ends.
        co_selection: dict mapping the name of each layer whose router
            picks experts per token to its co-selection matrices (the
            fraction of tokens that chose both expert i and expert j),
            a list of `[experts, experts]` arrays while training and a
            `[epochs, experts, experts]` array when it ends.

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
        self.co_selection = {}
        self._writer = None
        self._probe = None

    def on_train_begin(self, logs=None):
        self._layers = _moe_layers(self.model, "ExpertLoadCallback")
        self.history = {layer.name: [] for layer in self._layers}
        self.co_selection = {layer.name: [] for layer in self._layers}
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
        """Each layer's inference record of `data`."""
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
            return [layer.statistics.result("eval") for layer in self._layers]
        finally:
            for layer, values in zip(self._layers, kept):
                layer.statistics.restore("eval", values)

    def _probe_loads(self):
        if self._probe is None:
            return self._predicted_loads()
        from moe_keras.statistics import co_selection

        inputs = self._probe.predict(self.data, verbose=0)
        if len(self._layers) == 1:
            inputs = [inputs]
        results = []
        for layer, x in zip(self._layers, inputs):
            x = np.reshape(x, (-1, x.shape[-1])).astype("float32")
            routing = layer.gate(x, routing=True, top_k=layer.top_k)
            load = layer._token_load(routing, valid=None)
            result = {"expert_load": keras.ops.convert_to_numpy(load)}
            if "indices" in routing:
                result["co_selection"] = keras.ops.convert_to_numpy(
                    co_selection(routing["indices"], layer.num_experts)
                )
            results.append(result)
        return results

    def on_epoch_begin(self, epoch, logs=None):
        if self.data is None:
            for layer in self._layers:
                layer.statistics.reset("train")

    def on_epoch_end(self, epoch, logs=None):
        if self.data is not None:
            results = self._probe_loads()
        else:
            results = [
                layer.statistics.result("train") for layer in self._layers
            ]
        for layer, result in zip(self._layers, results):
            self.history[layer.name].append(np.asarray(result["expert_load"]))
            if "co_selection" in result:
                self.co_selection[layer.name].append(
                    np.asarray(result["co_selection"])
                )
        if self._writer is not None:
            self._summaries(results, epoch)

    def _summaries(self, results, epoch):
        import tensorflow as tf

        with self._writer.as_default():
            for layer, result in zip(self._layers, results):
                load = result["expert_load"]
                for i, value in enumerate(load):
                    tf.summary.scalar(
                        f"{layer.name}/expert_{i}", value, step=epoch
                    )
                tf.summary.histogram(f"{layer.name}/load", load, step=epoch)
                # Row e, column t: expert e's load in epoch t.
                loads = np.stack(self.history[layer.name], axis=1)
                tf.summary.image(
                    f"{layer.name}/load_heatmap", _image(loads), step=epoch
                )
                if "co_selection" in result:
                    tf.summary.image(
                        f"{layer.name}/co_selection",
                        _image(result["co_selection"]),
                        step=epoch,
                    )
        self._writer.flush()

    def on_train_end(self, logs=None):
        self.history = {k: np.stack(v) for k, v in self.history.items() if v}
        self.co_selection = {
            k: np.stack(v) for k, v in self.co_selection.items() if v
        }
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


def _image(matrix, cell=8):
    """A `[rows, cols]` matrix as one grey TensorBoard image,
    `[1, rows * cell, cols * cell, 1]` in [0, 1] (divided by its
    largest entry), each entry a `cell` x `cell` block of pixels so
    that small matrices are legible."""
    matrix = np.asarray(matrix, "float32")
    top = float(matrix.max()) if matrix.size else 0.0
    scaled = matrix / top if top > 0 else matrix
    pixels = np.kron(scaled, np.ones((cell, cell), "float32"))
    return pixels[None, :, :, None]


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
