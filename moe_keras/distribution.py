"""Expert parallelism on the Keras distribution API.

`get_layout_map` shards every `MoE` layer's experts over the model axis of
a `keras.distribution.DeviceMesh`; under the `ModelParallel` distribution
made from it, each device holds `E / m` experts (and their optimizer
state), and the layer lays out its token groups so that tokens reach their
experts' devices by all-to-all (see `group_dispatch`).

The layer reads its dispatch layout from the distribution's `LayoutMap`
under the key `<layer>/experts/dispatch_buffers`: the layout of the
expert-side buffers `[E, G, C, d]`, `(model, batch, None, None)` from
`get_layout_map`. To keep one layer's experts replicated (data-parallel
only), set that path to `(None, "batch", None, None)` and the layer's
expert weights to replicated layouts too, e.g. for `MoE(...,
hidden_units=h, name="moe")` in a `Sequential`:

    path = "sequential/moe/experts"
    layout_map[f"{path}/dispatch_buffers"] = (None, "batch", None, None)
    for name in ("in_kernel", "out_kernel"):
        layout_map[f"{path}/{name}"] = (None, None, None)
    for name in ("in_bias", "out_bias"):
        layout_map[f"{path}/{name}"] = (None, None)

The layer checks that its weights and dispatch agree when it builds.

Layouts are applied on the JAX backend, where Keras implements the
distribution API; elsewhere these helpers lay out nothing.
"""

import math

import keras
from keras import backend

DISPATCH_KEY = "dispatch_buffers"


def get_layout_map(
    device_mesh,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
):
    """A `LayoutMap` that shards every `MoE` layer's experts.

    Each expert weight of shape `[E, ...]` is split along its experts axis
    over `model_parallel_dim_name`, and each layer's dispatch buffers are
    laid out so that token groups live on the data-parallel devices and
    experts on the model-parallel ones. Pass it to
    `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`
    and set that distribution with `keras.distribution.set_distribution`
    before building the model; merge it with your own entries (e.g.
    `layout_map[".*dense.*kernel"] = (None, "model")`), or override one
    layer by its exact paths, which take precedence over these patterns
    (to keep a layer replicated: its dispatch buffers and every expert
    weight, see the module docstring). The `MoE` layers lay out their
    dispatch on the JAX backend only.

    The number of experts of every `MoE` layer must be divisible by the
    size of the model axis; the layer checks that when it builds. Shared
    experts (`num_shared_experts`) stay replicated.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: str, the mesh axis that splits experts.
            Defaults to `"model"`.
        data_parallel_dim_name: str, the mesh axis that splits the batch.
            Defaults to `"batch"`.

    Returns:
        A `keras.distribution.LayoutMap`.

    Raises:
        TypeError: `device_mesh` is not a `keras.distribution.DeviceMesh`.
        ValueError: an axis name is not an axis of the mesh, or both name
            the same axis.

    Example:

    >>> mesh = keras.distribution.DeviceMesh(
    ...     (1, 1), ["batch", "model"], devices=["cpu:0"]
    ... )
    >>> layout_map = get_layout_map(mesh)
    >>> layout_map["sequential/moe/experts/in_kernel"].axes
    ('model', None, None)
    >>> layout_map["sequential/moe/experts/dispatch_buffers"].axes
    ('model', 'batch', None, None)
    >>> print(layout_map["sequential/moe/shared_experts/in_kernel"])
    None

    On several devices, say eight, the mesh would be
    `DeviceMesh((2, 4), ["batch", "model"], keras.distribution.list_devices())`
    and the distribution
    `ModelParallel(layout_map=get_layout_map(mesh), batch_dim_name="batch")`.
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a keras.distribution.DeviceMesh; "
            f"received {device_mesh!r} (of type "
            f"{type(device_mesh).__name__})."
        )
    names = tuple(device_mesh.axis_names)
    for argument, name in (
        ("model_parallel_dim_name", model_parallel_dim_name),
        ("data_parallel_dim_name", data_parallel_dim_name),
    ):
        if name not in names:
            raise ValueError(
                f"`{argument}={name!r}` is not an axis of the device mesh, "
                f"whose axes are {list(names)}."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "`model_parallel_dim_name` and `data_parallel_dim_name` must "
            f"differ; both are {model_parallel_dim_name!r}."
        )
    model, data = model_parallel_dim_name, data_parallel_dim_name
    layout_map = keras.distribution.LayoutMap(device_mesh)
    # `(.*/)?experts/` matches a layer named "experts" (an MoE's routed
    # experts) and not "shared_experts".
    layout_map[r"(.*/)?experts/(in_|out_)?kernel"] = (model, None, None)
    layout_map[r"(.*/)?experts/(in_|out_)?bias"] = (model, None)
    layout_map[rf"(.*/)?experts/{DISPATCH_KEY}"] = (model, data, None, None)
    return layout_map


class DispatchLayout:
    """How one layer's token groups and experts sit on the devices.

    Attributes:
        num_devices: devices in the mesh; one token group each by default.
        expert_axis: mesh axis splitting the experts, or `None`.
        group_axes: mesh axes splitting the groups on the token side.
        expert_side_group_axes: mesh axes splitting the groups on the
            expert side (all but `expert_axis`).
    """

    def __init__(self, mesh, expert_axis, data_axis):
        self.mesh = mesh
        self.num_devices = math.prod(mesh.shape)
        self.expert_axis = expert_axis
        others = [a for a in mesh.axis_names if a != expert_axis]
        if data_axis in others:
            others.remove(data_axis)
            others.insert(0, data_axis)
        self.expert_side_group_axes = tuple(others)
        # Group g of the token side sits on the device that holds its
        # tokens: batch-major, then across the expert axis.
        self.group_axes = self.expert_side_group_axes + (
            (expert_axis,) if expert_axis is not None else ()
        )

    def expert_shards(self):
        if self.expert_axis is None:
            return 1
        return self.mesh.shape[self.mesh.axis_names.index(self.expert_axis)]

    def token_side(self, buffers):
        """Constrains `[G, E, C, d]` to groups on their tokens' devices."""
        return _constrain(buffers, (self.group_axes,) + (None,) * 3, self)

    def tokens(self, x):
        """Constrains `[T, ...]` to the token groups' devices, where `T`
        divides into them (else leaves it to XLA)."""
        size = x.shape[0]
        if not isinstance(size, int) or size % self.num_devices:
            return x
        rest = (None,) * (x.ndim - 1)
        return _constrain(x, (self.group_axes,) + rest, self)

    def expert_side(self, buffers):
        """Constrains `[E, G, C, d]` to experts on their weights' devices."""
        groups = self.expert_side_group_axes or None
        return _constrain(buffers, (self.expert_axis, groups, None, None), self)


def dispatch_layout(experts_path):
    """The `DispatchLayout` of the layer whose experts sit at
    `experts_path`, or `None` without a Keras distribution (or off JAX)."""
    distribution = keras.distribution.distribution()
    if distribution is None or backend.backend() != "jax":
        return None
    mesh = distribution.device_mesh
    data_axis = getattr(distribution, "batch_dim_name", None)
    expert_axis = _leading_axis(distribution, f"{experts_path}/{DISPATCH_KEY}")
    return DispatchLayout(mesh, expert_axis, data_axis)


def weight_expert_axes(experts_path, weight_names):
    """`{name: mesh axis}` splitting the experts axis of each expert weight
    the distribution lays out (`None` for replicated); `{}` without a
    Keras distribution on JAX."""
    distribution = keras.distribution.distribution()
    if distribution is None or backend.backend() != "jax":
        return {}
    return {
        name: _leading_axis(distribution, f"{experts_path}/{name}")
        for name in weight_names
    }


def _leading_axis(distribution, path):
    """The mesh axis a `ModelParallel` layout map gives the first axis of
    the tensor at `path`; `None` where nothing splits it."""
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return None
    layout = distribution.get_tensor_layout(path)
    return layout.axes[0] if layout is not None else None


def replica_sum(value):
    """`value` summed over the replicas of a `tf.distribute` strategy when
    called in one of its replicas (inside `fit`'s step); `value` itself
    elsewhere, where a step already sees its whole batch (one device, or
    the Keras distribution API's global arrays)."""
    if backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    if (
        not tf.distribute.has_strategy()
        or tf.distribute.in_cross_replica_context()
    ):
        return value
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _constrain(x, axes, layout):
    import jax

    spec = jax.sharding.PartitionSpec(
        *[a if not isinstance(a, tuple) or a else None for a in axes]
    )
    mesh = keras.distribution.TensorLayout(
        [None], layout.mesh
    ).backend_layout.mesh
    return keras.distribution.distribute_tensor(
        x, jax.sharding.NamedSharding(mesh, spec)
    )
