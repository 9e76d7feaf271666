"""Any Keras layers as the experts of an `MoE` layer.

Kept out of `experts.py`: it shares no code with the stacked
`DenseExperts`, only the call signature through which `MoE` runs either.
"""

import keras
from keras import ops

from moe_keras import _validation


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertList(keras.layers.Layer):
    """Any Keras layers as experts, possibly of different sizes.

    Each expert maps `(tokens, features)` to `(tokens, units)` with the same
    `units` for all; inside, they can be anything (an MLP of another width,
    a residual block...). They run one after another, each on its own
    static-shape group of tokens, so dense and capacity-based dispatch both
    work; dropless sparse dispatch needs stacked weights and does not.
    `MoE(experts=[...])` makes one.

    Args:
        experts: non-empty list (or tuple) of Keras layers, or of their
            serialized configs. A `ValueError` if empty, a `TypeError` if
            one is not a layer.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: float tensor, see the input shapes below.
        grouped: bool. `False` (default): every expert on every position.
            `True`: one group of tokens per expert.
        group_experts: must be `None`: blocks of one expert's tokens (the
            dropless dispatch) need stacked weights, and are a `ValueError`.

    Input shape:
        `(..., features)`; with `grouped=True`, `(num_experts, tokens,
        features)`.

    Output shape:
        `(..., num_experts, units)`; with `grouped=True`, `(num_experts,
        tokens, units)`.

    Example:

    >>> experts = ExpertList([keras.layers.Dense(2), keras.layers.Dense(2)])
    >>> tuple(experts(np.zeros((5, 3), "float32")).shape)
    (5, 2, 2)

    As the experts of an `MoE` layer (here a dense mixture), one of them
    a small MLP:

    >>> mlp = keras.Sequential([keras.layers.Dense(4, "relu"),
    ...                         keras.layers.Dense(2)])
    >>> layer = MoE(experts=[keras.layers.Dense(2), mlp])
    >>> tuple(layer(np.zeros((6, 5), "float32")).shape)
    (6, 2)
    """

    def __init__(self, experts, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ValueError(
                "`experts` must be a non-empty list of Keras layers; "
                f"received experts={experts!r}."
            )
        experts = [
            keras.saving.deserialize_keras_object(e)
            if isinstance(e, dict)
            else e
            for e in experts
        ]
        for i, expert in enumerate(experts):
            if not isinstance(expert, keras.layers.Layer):
                raise TypeError(
                    f"`experts[{i}]` must be a Keras layer; received "
                    f"{expert!r} (of type {type(expert).__name__})."
                )
        self.expert_layers = list(experts)
        self.num_experts = len(experts)
        self.units = None

    def build(self, input_shape):
        features = _validation.feature_dim(input_shape, self.name)
        self.input_spec = _validation.features_spec(features)
        widths = []
        for expert in self.expert_layers:
            if not expert.built:
                expert.build((None, features))
            spec = expert.compute_output_spec(
                keras.KerasTensor((None, features))
            )
            widths.append(spec.shape[-1])
        if len(set(widths)) != 1 or widths[0] is None:
            raise ValueError(
                "Every expert must map (tokens, features) to (tokens, units) "
                f"with the same units; received output widths {widths}."
            )
        self.units = int(widths[0])

    def call(self, inputs, grouped=False, group_experts=None):
        if group_experts is not None:
            raise ValueError(
                "Dropless dispatch needs stacked expert weights; with a list "
                "of expert layers use a capacity_factor or dispatch='dense'."
            )
        if grouped:
            # [experts, tokens, features] -> [experts, tokens, units]
            return ops.stack(
                [
                    expert(inputs[i])
                    for i, expert in enumerate(self.expert_layers)
                ]
            )
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))
        out = ops.stack([expert(x) for expert in self.expert_layers], axis=1)
        return ops.reshape(
            out, tuple(shape[:-1]) + (self.num_experts, self.units)
        )

    def compute_output_spec(self, inputs, grouped=False, group_experts=None):
        shape = tuple(inputs.shape[:-1])
        shape += (self.units,) if grouped else (self.num_experts, self.units)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["experts"] = [
            keras.saving.serialize_keras_object(e) for e in self.expert_layers
        ]
        return config
