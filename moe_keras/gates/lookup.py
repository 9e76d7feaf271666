"""`get`: a gate instance from what `MoE(gate=...)` accepts."""

import keras

from moe_keras.gates.base import Gate
from moe_keras.gates.feature import FeatureGate
from moe_keras.gates.learned import ActivationGate
from moe_keras.gates.learned import SigmoidGate
from moe_keras.gates.learned import SoftmaxGate

_GATES = {"softmax": SoftmaxGate, "sigmoid": SigmoidGate}


def _from_name(name, num_experts):
    if name not in _GATES:
        raise ValueError(
            "`gate` must be 'softmax', 'sigmoid', a gate function (a "
            "callable on the router's logits, e.g. "
            "`keras.activations.relu`) or a `moe_keras.Gate` instance; "
            f"received gate={name!r}."
        )
    return _GATES[name](num_experts=num_experts, name="gate")


def get(identifier, num_experts, units=None):
    """A gate instance from a name, a gate function, an instance or a
    serialized config.

    Args:
        identifier: `"softmax"`, `"sigmoid"`, a callable on the router's
            `[T, E]` logits (an `ActivationGate` with that gate function),
            a `Gate` instance, or a serialized gate config.
        num_experts: int, the owning layer's number of experts.
        units: int or None, the experts' output width (for `FeatureGate`).
    """
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        return _from_name(identifier, num_experts)
    if isinstance(identifier, type):
        raise TypeError(
            "`gate` must be a gate instance, not a class: write "
            f"gate={identifier.__name__}() (with its arguments); received "
            f"gate={identifier!r}."
        )
    if not isinstance(identifier, Gate):
        if callable(identifier) and not isinstance(
            identifier, keras.layers.Layer
        ):
            return ActivationGate(
                num_experts=num_experts, activation=identifier, name="gate"
            )
        raise TypeError(
            "`gate` must be 'softmax', 'sigmoid', a gate function (a "
            "callable on the router's logits) or a `moe_keras.Gate` "
            "instance; "
            f"received gate={identifier!r}."
        )
    if identifier.num_experts is None:
        identifier.num_experts = num_experts
    elif identifier.num_experts != num_experts:
        raise ValueError(
            f"The gate has num_experts={identifier.num_experts} but the "
            f"layer has num_experts={num_experts}; they must match."
        )
    if isinstance(identifier, FeatureGate):
        if identifier.units is None:
            identifier.units = units
        elif identifier.units != units:
            raise ValueError(
                f"The FeatureGate has units={identifier.units} but the "
                f"layer has units={units}; they must match."
            )
    return identifier
