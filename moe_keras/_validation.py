"""Argument checks that fail early, naming the argument and what was expected."""

import math
import numbers

import keras
from keras import backend


def positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "a positive integer" + (" or None" if allow_none else "")
        raise TypeError(
            f"`{name}` must be {expected}; received {name}={value!r} "
            f"(of type {type(value).__name__})."
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer; received {name}={value}."
        )
    return int(value)


def non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a non-negative integer; received {name}={value!r}."
        )
    if value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative integer; received {name}={value}."
        )
    return int(value)


def positive_float(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a positive number" + (" or None" if allow_none else "")
        raise TypeError(
            f"`{name}` must be {expected}; received {name}={value!r}."
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"`{name}` must be a finite positive number; received "
            f"{name}={value}."
        )
    return float(value)


def non_negative_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a non-negative number; received {name}={value!r}."
        )
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"`{name}` must be a finite non-negative number; received "
            f"{name}={value}."
        )
    return float(value)


def finite_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a number; received {name}={value!r}."
        )
    if not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be a finite number; received {name}={value}."
        )
    return float(value)


def seed(value, name="seed"):
    """A seed is an int (or None): it is saved in the config and hashed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer or None; received {name}={value!r} "
            f"(of type {type(value).__name__})."
        )
    return int(value)


def one_of(value, name, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {sorted(choices, key=repr)}; received "
            f"{name}={value!r}."
        )
    return value


def feature_dim(input_shape, layer_name):
    """The last (feature) dimension of an input shape, which must be known."""
    if input_shape is None or len(input_shape) < 2:
        raise ValueError(
            f"Layer '{layer_name}' expects inputs of rank >= 2, "
            f"`(batch, ..., features)`; received input_shape={input_shape}."
        )
    features = input_shape[-1]
    if features is None:
        raise ValueError(
            f"Layer '{layer_name}' needs the last dimension of its inputs "
            f"(features) to be known; received input_shape={input_shape}."
        )
    return int(features)


def float_input(dtype, layer_name):
    if not backend.is_float_dtype(backend.standardize_dtype(dtype)):
        raise TypeError(
            f"Layer '{layer_name}' expects floating-point inputs; received "
            f"inputs of dtype {dtype}. Cast them (or embed integer ids with "
            "`keras.layers.Embedding`) first."
        )


def features_spec(features):
    """An `InputSpec` fixing the feature axis a layer was built for, so a
    call with another width fails in Keras' input check, naming the layer,
    rather than inside a matmul."""
    return keras.InputSpec(min_ndim=2, axes={-1: features})
