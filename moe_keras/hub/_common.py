"""Helpers shared by `sparsify` and `upcycle`: finding the backbone,
swapping a decoder's sublayer, copying weights, rebuilding a task.

Nothing here imports keras-hub at module level: `import moe_keras` never
needs it.
"""

import keras
import numpy as np

from moe_keras import _validation
from moe_keras.hub._gate import TopKSoftmaxGate
from moe_keras.moe import MoE


def import_keras_hub(function_name):
    """`keras_hub`, or an `ImportError` that says what needs it."""
    try:
        import keras_hub
    except ImportError as error:  # pragma: no cover - keras-hub installed
        raise ImportError(
            f"`moe_keras.{function_name}` converts keras-hub models and needs "
            "keras-hub: `pip install keras-hub>=0.32`."
        ) from error
    return keras_hub


def split_model(model, argument="model"):
    """`(backbone, task or None)` of a keras-hub backbone or task model."""
    from keras_hub.models import Backbone
    from keras_hub.models import Task

    if isinstance(model, Backbone):
        return model, None
    if isinstance(model, Task):
        return model.backbone, model
    raise TypeError(
        f"`{argument}` must be a keras-hub `Backbone` or `Task` model (e.g. "
        "`MixtralBackbone`, `MixtralCausalLM`); received "
        f"{argument}={model!r} (of type {type(model).__name__})."
    )


def replace_sublayer(parent, attribute, new):
    """Sets `parent.<attribute> = new`, untracking the layer it replaces,
    so that the old layer's weights leave `parent.weights` (and the saved
    file) and the new layer's join them, although `parent` is built."""
    old = getattr(parent, attribute)
    tracker = parent._tracker
    locked = tracker.locked
    tracker.unlock()
    if old is not None:
        tracker.untrack(old)
    setattr(parent, attribute, new)
    tracker.locked = locked


def copy_weights_except(source, target, skip_source, skip_target):
    """Copies the weights of `source` into `target`, in order, leaving out
    the variables in `skip_source` and `skip_target` (sets of ids).

    The two models have the same structure apart from the skipped
    sublayers, so what is left pairs up one to one.
    """
    source_vars = [v for v in source.weights if id(v) not in skip_source]
    target_vars = [v for v in target.weights if id(v) not in skip_target]
    if len(source_vars) != len(target_vars):
        raise ValueError(
            f"Cannot pair the weights of '{source.name}' ({len(source_vars)} "
            f"left to copy) with those of the converted model "
            f"({len(target_vars)}): their structures differ."
        )
    for src, dst in zip(source_vars, target_vars):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"Cannot copy weight '{src.path}' of shape {src.shape} into "
                f"'{dst.path}' of shape {dst.shape}."
            )
        # Through NumPy: on JAX the two models must not share a buffer,
        # which a jitted step of one (donating its state) would delete.
        dst.assign(keras.ops.convert_to_numpy(src))


def variable_ids(layers):
    """Ids of every weight of `layers`."""
    return {id(v) for layer in layers for v in layer.weights}


def rebuild_task(task, backbone):
    """A new task of `task`'s class around `backbone`, with `task`'s
    preprocessor and its other weights (heads) copied."""
    config = task.get_config()
    config["backbone"] = backbone
    config["preprocessor"] = task.preprocessor
    new_task = type(task).from_config(config)
    copy_weights_except(
        task,
        new_task,
        variable_ids([task.backbone]),
        variable_ids([backbone]),
    )
    return new_task


def assign(variable, value):
    """Assigns a NumPy value, checking the shape."""
    value = np.asarray(value)
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"Cannot assign a value of shape {value.shape} to "
            f"'{variable.path}' of shape {tuple(variable.shape)}."
        )
    variable.assign(
        value.astype(keras.backend.standardize_dtype(variable.dtype))
    )


def routed_moe(
    num_experts,
    units,
    hidden_units,
    top_k,
    normalize,
    capacity_factor,
    activation="silu",
    gated=True,
    use_bias=False,
    load_balance_weight=0.0,
    z_loss_weight=0.0,
    jitter=0.0,
    kernel_initializer="glorot_uniform",
    router_initializer="glorot_uniform",
    dtype=None,
    name="moe",
    gate_options=None,
    **moe_options,
):
    """The `MoE` layer standing in for a family's routed experts: the
    `TopKSoftmaxGate`, the sparse dispatch (dropless with
    `capacity_factor=None`) and no routing statistics (they would be
    variables that `generate()` would have to thread through)."""
    gate = TopKSoftmaxGate(
        normalize=normalize,
        num_experts=num_experts,
        jitter=jitter,
        kernel_initializer=router_initializer,
        name="gate",
        **(gate_options or {}),
    )
    return MoE(
        num_experts=num_experts,
        units=units,
        hidden_units=hidden_units,
        activation=activation,
        gated=gated,
        use_bias=use_bias,
        gate=gate,
        top_k=top_k,
        dispatch="sparse" if top_k < num_experts else "dense",
        capacity_factor=capacity_factor,
        load_balance_weight=load_balance_weight,
        z_loss_weight=z_loss_weight,
        routing_statistics=False,
        kernel_initializer=kernel_initializer,
        dtype=dtype,
        name=name,
        **moe_options,
    )


def check_capacity_factor(capacity_factor):
    """`None` or a finite float > 0, else a `ValueError` naming it."""
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(
        capacity_factor, (int, float, np.floating, np.integer)
    ):
        raise TypeError(
            "`capacity_factor` must be a float > 0 or None (dropless); "
            f"received capacity_factor={capacity_factor!r}."
        )
    value = float(capacity_factor)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            "`capacity_factor` must be a finite float > 0 or None "
            f"(dropless); received capacity_factor={capacity_factor!r}."
        )
    return value


def check_upcycle_options(num_experts, top_k, capacity_factor, lb, z):
    """The upcycling options, validated, as a config dict."""
    num_experts = _validation.positive_int(num_experts, "num_experts")
    top_k = _validation.positive_int(top_k, "top_k")
    if top_k > num_experts:
        raise ValueError(
            f"`top_k` must be in [1, num_experts={num_experts}]; received "
            f"top_k={top_k}."
        )
    lb = _validation.non_negative_float(lb, "load_balance_weight")
    z = _validation.non_negative_float(z, "z_loss_weight")
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "capacity_factor": check_capacity_factor(capacity_factor),
        "load_balance_weight": float(lb),
        "z_loss_weight": float(z),
    }


def family_class(backbone, classes, function):
    """`classes[type(backbone)]`, or `None`; a subclass of a covered class
    is a `ValueError`: its own code may change what the blocks compute,
    which a conversion copying the blocks' weights would not see."""
    found = classes.get(type(backbone))
    if found is not None:
        return found
    for covered in classes:
        if isinstance(backbone, covered):
            raise ValueError(
                f"`model`'s backbone is a {type(backbone).__name__}, a "
                f"subclass of {covered.__name__}: `moe_keras.{function}` "
                f"converts {covered.__name__} itself, as a subclass may "
                "change what its blocks compute. Convert a "
                f"{covered.__name__} built from the same config and "
                "weights."
            )
    return None
