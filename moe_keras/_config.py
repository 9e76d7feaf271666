"""Serializing the weight options every layer's `get_config` repeats."""

import keras

ROUTER_WEIGHT_OPTIONS = (
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
)
EXPERT_WEIGHT_OPTIONS = ROUTER_WEIGHT_OPTIONS + (
    "kernel_constraint",
    "bias_constraint",
)

_SERIALIZERS = {
    "_initializer": keras.initializers.serialize,
    "_regularizer": keras.regularizers.serialize,
    "_constraint": keras.constraints.serialize,
}


def weight_options(layer, names):
    """`{name: serialized layer.name}` for initializer/regularizer/
    constraint attributes, the part of `get_config` every layer repeats."""
    config = {}
    for name in names:
        suffix = next(s for s in _SERIALIZERS if name.endswith(s))
        config[name] = _SERIALIZERS[suffix](getattr(layer, name))
    return config
