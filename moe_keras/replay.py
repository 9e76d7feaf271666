"""Record each `MoE` layer's choice of experts in one call, replay it later.

Reinforcement-learning fine-tuning of a Mixture-of-Experts model samples
rollouts with one call (`predict`, a served SavedModel) and trains on them
with another (`fit`, `train_on_batch`); unless both route each position
to the same experts, the gradients are those of a different policy.
`RoutingRecorder(model)` returns the experts every top-k `MoE` layer of
`model` chose, by layer name, next to the outputs; `RoutingReplayer(model)`
runs `model` with those experts forced, sharing its weights, so training
the replayer trains the model.

A recording is a dict `{layer_name: (batch, positions, top_k) int32}`
(keyed by the layer's path, e.g. `"transformer_layer_0/sparse_moe_block/moe"`,
where several layers share a name, as keras-hub blocks' do):
`positions` counts the positions each sample routed through the layer
(1 for `(batch, features)` inputs, `seq` for `(batch, seq, features)`,
`seq` too for keras-hub blocks, which route the flattened tokens). Its
leading axis is the batch, so `predict` concatenates it over batches and
`fit` shuffles it with the samples. It is plain NumPy after `predict`:
save it with `np.savez(path, **routing)` and load it with
`dict(np.load(path))`.

Replayed, a layer uses the recorded experts; its combine weights are its
router's probabilities of those experts (renormalised and scaled as the
gate's own choice would be), so the router still learns. On the same
inputs and weights, and without training-time randomness (jitter, gate
dropout), the outputs equal the recorded call's exactly; training runs
with the training capacity (`capacity_factor`), which may drop
assignments a dropless `predict` kept. The selection bias of
auxiliary-loss-free balancing (`bias_update_rate`) keeps updating from
the replayed assignments, the load the experts really get.
`NoisyTopKGate` adds no noise under replay (the noise only explores the
choice, which the recording makes).

Top-k ties go to the lower expert index on every backend and in an
exported SavedModel (`moe_keras.gates.top_k_indices`), so a recording
made on one backend replays on another. Masked positions are recorded
with whatever experts their gate scored best and are ignored on replay.
Layers with no top-k choice (`top_k=None`, an `ExpertChoiceGate`) are
neither recorded nor replayed: they route as usual.
"""

import collections

import keras
from keras import ops
from keras import tree

from moe_keras import _replay_scope
from moe_keras.moe import MoE


def _batch_size(inputs):
    return ops.shape(tree.flatten(inputs)[0])[0]


def _replayable_layers(model):
    """`{key: layer}` of the `MoE` layers of `model` with a top-k choice
    to record, by name, or by path where names repeat (keras-hub blocks
    all name theirs `moe`); a `ValueError` where there is none."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model`; received "
            f"model={model!r} (of type {type(model).__name__})."
        )
    layers = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, MoE) and layer._replayable
    ]
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no MoE layer with a top-k choice of "
            "experts (top_k set, a token-choice gate): there is no routing "
            "to record or replay."
        )
    names = collections.Counter(layer.name for layer in layers)
    keyed = {}
    for layer in layers:
        key = layer.name if names[layer.name] == 1 else layer.path
        if key in keyed:
            raise ValueError(
                f"Model '{model.name}' has two MoE layers at '{key}': a "
                "routing is recorded by layer name (or path, where names "
                "repeat). Give the layers distinct names."
            )
        keyed[key] = layer
    return keyed


def _scope(model, batch, replay=None):
    keys = {id(layer): key for key, layer in _replayable_layers(model).items()}
    return _replay_scope.RoutingScope(batch=batch, replay=replay, keys=keys)


class _Wrapper(keras.Model):
    """A model around `model`, sharing its weights."""

    def __init__(self, model, **kwargs):
        _replayable_layers(model)  # fails early on a model without any
        super().__init__(**kwargs)
        self.model = model

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        return cls(model, **config)


@keras.saving.register_keras_serializable(package="moe_keras")
class RoutingRecorder(_Wrapper):
    """A model that returns `model`'s outputs and the experts it chose.

    Calling it runs `model` (sharing its weights) and returns
    `(outputs, routing)`, `routing` the dict `{layer_name: indices}` of the
    module docstring, one entry per `MoE` layer with a top-k choice,
    however deep in `model` (keras-hub blocks included). `predict` gives
    the recording as NumPy, aligned with the samples; `export` gives a
    SavedModel whose serving call returns it too. To record what
    keras-hub's `generate` routed, run the recorder once over the
    generated sequences (prefill form): the KV-cached decoding loop
    routes each position as that single pass does, up to float rounding.

    Args:
        model: a `keras.Model` with at least one top-k `MoE` layer, each
            called once per call of the model.
        **kwargs: base model keyword arguments, such as `name`.

    Input shape:
        The inputs of `model`.

    Output shape:
        `(outputs, routing)`: the outputs of `model`, and a dict of
        `(batch, positions, top_k)` int32 expert indices by layer name.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3, 4)),
    ...     MoE(num_experts=4, units=4, top_k=2, name="moe"),
    ... ])
    >>> x = np.random.default_rng(0).normal(size=(5, 3, 4))
    >>> outputs, routing = RoutingRecorder(model).predict(x, verbose=0)
    >>> routing["moe"].shape  # (batch, positions, top_k)
    (5, 3, 2)
    """

    _flat = False  # set while exporting, see `export`

    def call(self, inputs, training=None):
        batch = _batch_size(inputs)
        with _scope(self.model, batch) as scope:
            outputs = self.model(inputs, training=training)
        if not self._flat:
            return outputs, scope.recorded
        flat = tree.flatten(outputs)
        if len(flat) == 1:
            served = {"outputs": flat[0]}
        else:
            served = {f"outputs_{i}": value for i, value in enumerate(flat)}
        for name, indices in scope.recorded.items():
            served[f"routing_{name}"] = indices
        return served

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Exports the recorder as `Model.export` does. A SavedModel's
        serving call returns one flat dict of tensors (a signature holds
        no nesting): `"outputs"` (or `"outputs_<i>"`, the model's outputs
        flattened) and `"routing_<layer_name>"` for each recorded layer."""
        self._flat = True
        try:
            return super().export(filepath, format=format, **kwargs)
        finally:
            self._flat = False


@keras.saving.register_keras_serializable(package="moe_keras")
class RoutingReplayer(_Wrapper):
    """A model that runs `model` with a recorded routing.

    Called on `(inputs, routing)`, with `routing` as a `RoutingRecorder`
    of `model` records it, it returns `model(inputs)` computed with those
    experts at every recorded `MoE` layer. It shares `model`'s weights:
    compile it and `fit((x, routing), y)` or `train_on_batch` to train
    `model` with the recorded routing, then save `model` as usual.
    `fit`, `evaluate`, `predict` and their `*_on_batch` forms check a
    NumPy routing (layer names, shapes, expert ranges) before running.

    Args:
        model: a `keras.Model` with at least one top-k `MoE` layer, the
            one whose routing was recorded (or one of the same layers).
        **kwargs: base model keyword arguments, such as `name`.

    Input shape:
        `(inputs, routing)`: the inputs of `model` and a recording of its
        routing on them, as `RoutingRecorder` returns it.

    Output shape:
        The outputs of `model`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((3, 4)),
    ...     MoE(num_experts=4, units=4, top_k=2, name="moe"),
    ... ])
    >>> x = np.random.default_rng(0).normal(size=(5, 3, 4))
    >>> outputs, routing = RoutingRecorder(model).predict(x, verbose=0)
    >>> replayer = RoutingReplayer(model)
    >>> replayed = replayer.predict((x, routing), verbose=0)
    >>> bool(np.array_equal(replayed, outputs))
    True
    >>> replayer.compile(optimizer="adam", loss="mse")
    >>> loss = replayer.train_on_batch((x, routing), np.zeros((5, 3, 4)))
    """

    def call(self, inputs, training=None):
        inputs, routing = self._split(inputs)
        batch = _batch_size(inputs)
        with _scope(self.model, batch, routing) as scope:
            outputs = self.model(inputs, training=training)
        scope.check_used()
        return outputs

    def _split(self, inputs):
        if not (
            isinstance(inputs, (tuple, list))
            and len(inputs) == 2
            and isinstance(inputs[1], dict)
        ):
            raise ValueError(
                "A `RoutingReplayer` takes `(inputs, routing)`: the model's "
                "inputs and the dict of expert indices by layer name that "
                f"a `RoutingRecorder` returned; received {type(inputs)}."
            )
        return inputs[0], inputs[1]

    def check_routing(self, inputs, routing):
        """Raises a clear error where `routing` cannot replay on `inputs`:
        unknown layer names, missing layers, wrong dtypes, shapes or
        expert indices (the values are checked where they are known)."""
        layers = _replayable_layers(self.model)
        unknown = sorted(set(routing) - set(layers))
        missing = sorted(set(layers) - set(routing))
        if unknown or missing:
            raise ValueError(
                "`routing` must hold one entry per top-k MoE layer of "
                f"model '{self.model.name}', {sorted(layers)}; it has "
                f"unknown entries {unknown} and lacks {missing}."
            )
        batch = tree.flatten(inputs)[0].shape[0]
        for name, indices in routing.items():
            layer = layers[name]
            label = f"routing['{name}']"
            _replay_scope.check_indices(
                indices, layer.num_experts, layer.top_k, label, name
            )
            shape = tuple(indices.shape)
            known = None not in (batch, shape[0]) if shape else False
            if len(shape) != 3 or (known and shape[0] != batch):
                raise ValueError(
                    f"`{label}` must have shape (batch, positions, "
                    f"top_k={layer.top_k}) with the inputs' batch of "
                    f"{batch}; received shape {shape}."
                )

    def _check_data(self, x):
        # Datasets and generators are checked as each batch is called.
        if (
            isinstance(x, (tuple, list))
            and len(x) == 2
            and isinstance(x[1], dict)
            and all(hasattr(v, "shape") for v in x[1].values())
        ):
            self.check_routing(x[0], x[1])

    def fit(self, x=None, *args, **kwargs):
        self._check_data(x)
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_data(x)
        return super().evaluate(x, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check_data(x)
        return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, *args, **kwargs):
        self._check_data(x)
        return super().train_on_batch(x, *args, **kwargs)

    def test_on_batch(self, x, *args, **kwargs):
        self._check_data(x)
        return super().test_on_batch(x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._check_data(x)
        return super().predict_on_batch(x)
