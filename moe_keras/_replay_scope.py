"""The call scope through which `MoE` layers record or replay routing.

`moe_keras.RoutingRecorder` and `moe_keras.RoutingReplayer` open a scope
around one call of a model; every `MoE` layer called inside it (however
deep in the model, as keras-hub blocks call theirs) finds the scope here
and records its experts into it, or takes them from it, by layer name.
The scope is plain Python, alive only while the model's call runs, so it
works the same eagerly, under `tf.function`, under a JAX trace and on
torch. It is thread-local: `tf.distribute` runs each replica's call in a
thread of its own.
"""

import threading

import keras
import numpy as np
from keras import ops

try:  # Keras has no public form of it
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover

    def in_symbolic_scope():
        return False


_local = threading.local()


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current():
    """The innermost open `RoutingScope`, or `None`."""
    stack = _stack()
    return stack[-1] if stack else None


class RoutingScope:
    """Records (`replay=None`) or replays (`replay`: a dict of
    `(batch, positions, top_k)` indices by layer name) the routing of the
    `MoE` layers called inside it. `batch`: the batch size of the model's
    inputs, which a recording's leading axis is."""

    def __init__(self, batch=None, replay=None, keys=None):
        self.batch = batch
        self.replay = replay
        self.keys = keys or {}
        self.recorded = {}
        self.used = set()

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc_info):
        _stack().pop()

    def key(self, layer):
        """The name `layer`'s routing goes by (see `routing_keys`)."""
        return self.keys.get(id(layer), layer.name)

    def record(self, layer, indices):
        """Keeps `indices` `[tokens, k]` as `(batch, positions, k)`."""
        key = self.key(layer)
        if key in self.recorded:
            raise ValueError(
                f"MoE layer '{key}' was called twice in one recorded call "
                "(a shared layer): a routing is recorded and replayed once "
                "per layer and call."
            )
        k = indices.shape[-1]
        self.recorded[key] = ops.reshape(indices, (self.batch, -1, k))

    def forced(self, layer):
        """The replayed indices of `layer`, or `None` when recording."""
        if self.replay is None:
            return None
        key = self.key(layer)
        if key not in self.replay:
            raise ValueError(
                f"The routing to replay has no entry for MoE layer "
                f"'{key}'; it has {sorted(self.replay)}. Replay what a "
                "`RoutingRecorder` of the same model recorded."
            )
        self.used.add(key)
        return self.replay[key]

    def check_used(self):
        unused = sorted(set(self.replay) - self.used)
        if unused:
            raise ValueError(
                f"The routing to replay has entries {unused} that no MoE "
                "layer of the model used (the model calls MoE layers "
                f"{sorted(self.used)})."
            )


def concrete(x):
    """`x` as a NumPy array where its values are known (eager), else
    `None` (traced under `tf.function`, `jax.jit` or symbolic)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, keras.KerasTensor) or in_symbolic_scope():
        return None  # shape inference: placeholder values, not the data
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly() and hasattr(x, "numpy"):
            return x.numpy()
    elif backend == "jax":
        import jax

        if not isinstance(x, jax.core.Tracer):
            return np.asarray(x)
    elif backend == "torch":
        import torch

        if (
            isinstance(x, torch.Tensor)
            and x.device.type != "meta"
            and not torch.compiler.is_compiling()
        ):
            return x.detach().cpu().numpy()
    return None


def check_indices(indices, num_experts, top_k, name, layer_name):
    """Checks replayed `indices`: integers, a trailing axis of `top_k`,
    and, where their values are known, each in `[0, num_experts)`."""
    dtype = keras.backend.standardize_dtype(indices.dtype)
    if "int" not in dtype:
        raise TypeError(
            f"`{name}` of MoE layer '{layer_name}' must be integer expert "
            f"indices; received dtype {dtype}."
        )
    shape = tuple(indices.shape)
    if not shape or shape[-1] not in (None, top_k):
        raise ValueError(
            f"`{name}` of MoE layer '{layer_name}' must end in an axis of "
            f"top_k={top_k} experts per position; received shape {shape}."
        )
    values = concrete(indices)
    if (
        values is not None
        and values.size
        and (values.min() < 0 or values.max() >= num_experts)
    ):
        raise ValueError(
            f"`{name}` of MoE layer '{layer_name}' must hold expert indices "
            f"in [0, num_experts={num_experts}); received values from "
            f"{values.min()} to {values.max()}."
        )
    if values is not None and values.size and top_k > 1:
        ordered = np.sort(values.reshape(-1, top_k), axis=-1)
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            raise ValueError(
                f"`{name}` of MoE layer '{layer_name}' must name "
                f"{top_k} distinct experts at each position; some position "
                "repeats an expert."
            )
