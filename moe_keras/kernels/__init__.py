"""One grouped matmul for the expert bank, and the choice of how to run it.

`grouped_matmul(x, w, group_sizes, implementation)` computes, over rows
sorted by group, `y[rows of group g] = x[rows of group g] @ w[g]`, with
`group_sizes` the `[G]` row count of each group in order. Rows past
`sum(group_sizes)` are in no group and come out as 0. It is differentiable
in `x` and `w` on every implementation, the weight gradient a dense
`[G, K, N]`.

Implementations (`IMPLEMENTATIONS`), chosen once per layer by
`select_implementation`:

- `"mosaic_gpu"`: JAX on an NVIDIA Hopper GPU (compute capability 9.x,
  H100/H200): the Pallas Mosaic GPU kernels that ship with JAX
  (`ragged_dot_mgpu`, `transposed_ragged_dot_mgpu` for the weight
  gradient), bfloat16 or float16, feature sizes multiples of 64.
- `"megablox"`: JAX on a TPU: the Megablox kernels that ship with JAX
  (`gmm`, `tgmm`).
- `"torch"`: torch's `torch.nn.functional.grouped_mm` (CUDA with
  bfloat16 under `"auto"`; forced, it runs wherever the installed torch
  runs it, the CPU included).
- `"ragged_dot"`: XLA's `jax.lax.ragged_dot`, any JAX platform. Right but
  slow on a GPU (XLA lowers it to a masked dense dot); the reference the
  kernels are checked against.
- `"reference"`: one matmul per group over all rows, then a select, in
  `keras.ops`: any backend, `G` times the work. For debugging.
- `"blocks"`: no grouped matmul: the dropless dispatch pads each expert's
  rows to whole blocks and gathers each block's weights (see
  `dispatch.RoutePlan`). On a CPU this is the fastest form, and it is what
  `"auto"` picks wherever no kernel above applies (CPU, older GPUs,
  TensorFlow, float32 on a GPU, and under a Keras distribution over
  several devices, where the kernels, which have no sharding rule, would
  have every operand gathered onto each device).
"""

from keras import backend
from keras import ops

IMPLEMENTATIONS = (
    "auto",
    "blocks",
    "mosaic_gpu",
    "megablox",
    "torch",
    "ragged_dot",
    "reference",
)

_BACKENDS = {
    "mosaic_gpu": "jax",
    "megablox": "jax",
    "ragged_dot": "jax",
    "torch": "torch",
}


def select_implementation(requested, dtype, projections):
    """The implementation a layer runs its dropless experts with.

    `"auto"` tries the kernels in turn, `"mosaic_gpu"`, `"megablox"`,
    `"torch"`, each under the conditions of the module docstring, and
    falls back to `"blocks"`; a name is checked and returned as it is.

    Args:
        requested: one of `IMPLEMENTATIONS`; `"auto"` picks by backend,
            platform and shapes.
        dtype: str, the experts' compute dtype (e.g. `"bfloat16"`).
        projections: list of `(in_features, out_features)`, one per expert
            matmul.

    Returns:
        The name of an implementation other than `"auto"`.

    Raises:
        ValueError: `requested` is not an implementation, or cannot run
            here; the message names what is missing.

    Example:

    >>> select = moe_keras.kernels.select_implementation
    >>> select("auto", "float32", [(8, 16), (16, 8)])  # off a TPU
    'blocks'
    >>> select("reference", "bfloat16", [(8, 16)])
    'reference'
    >>> select("cuda", "float32", [(8, 16)])
    Traceback (most recent call last):
        ...
    ValueError: `grouped_matmul` must be one of (...); received ...
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"`grouped_matmul` must be one of {IMPLEMENTATIONS}; received "
            f"grouped_matmul={requested!r}."
        )
    if requested == "auto":
        if _distributed():
            # The kernels have no sharding rule: under a distribution XLA
            # would gather every operand onto each device to run them.
            return "blocks"
        for name in ("mosaic_gpu", "megablox", "torch"):
            if _missing(name, dtype, projections, automatic=True) is None:
                return name
        return "blocks"
    problem = _missing(requested, dtype, projections)
    if problem is not None:
        raise ValueError(
            f"grouped_matmul={requested!r} cannot run here: it needs {problem}."
        )
    return requested


def _distributed():
    """Whether a Keras distribution spreads the model over devices."""
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return False
    return len(list(distribution.device_mesh.devices.flat)) > 1


def _missing(name, dtype, projections, automatic=False):
    """What `name` needs that this process lacks, or `None`."""
    if name in ("blocks", "reference"):
        return None
    needed = _BACKENDS[name]
    if backend.backend() != needed:
        return f"the {needed} backend (KERAS_BACKEND is {backend.backend()!r})"
    if name == "torch":
        from moe_keras.kernels import _torch

        if not _torch.available():
            return "torch.nn.functional.grouped_mm (torch 2.8 or newer)"
        if automatic:
            if _torch.cuda_capability() is None:
                return "a CUDA device"
            if dtype != "bfloat16":
                return "bfloat16 experts"
        width = 2 if dtype in ("bfloat16", "float16") else 4
        if any((k * width) % 16 or (n * width) % 16 for k, n in projections):
            return (
                f"feature sizes that are whole 16-byte rows in {dtype} "
                f"(multiples of {16 // width}); the projections are "
                f"{projections}"
            )
        return None
    from moe_keras.kernels import _jax

    if name == "ragged_dot":
        return None if not automatic else "never chosen automatically"
    if name == "megablox":
        if _jax.platform() != "tpu":
            return f"a TPU (JAX's platform is {_jax.platform()!r})"
        return _importable("jax.experimental.pallas.ops.tpu.megablox.gmm")
    capability = _jax.gpu_compute_capability()
    # The kernels issue Hopper's wgmma instructions, which Blackwell
    # (10.x) and older GPUs lack.
    if capability is None or capability[0] != 9:
        return (
            "an NVIDIA Hopper GPU, compute capability 9.x (JAX's platform "
            f"is {_jax.platform()!r}, capability {capability})"
        )
    if dtype not in ("bfloat16", "float16"):
        return f"bfloat16 or float16 experts (the experts compute in {dtype})"
    for k, n in projections:
        problem = _jax.mosaic_shape_problem(k, n)
        if problem is not None:
            return problem
    return _importable(
        "jax.experimental.pallas.ops.gpu.ragged_dot_mgpu",
        "jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu",
    )


def _importable(*modules):
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            return f"{module}, which this JAX lacks ({error})"
    return None


def grouped_matmul(x, w, group_sizes, implementation="reference"):
    """One matmul per group of rows: `y[rows of g] = x[rows of g] @ w[g]`.

    The rows of `x` are sorted by group, `group_sizes[g]` rows of group `g`
    in turn. Rows past `sum(group_sizes)` are in no group and come out as
    0. Differentiable in `x` and `w` on every implementation, the weight
    gradient a dense `[G, K, N]`.

    Args:
        x: `[M, K]` rows, those of group 0 first, then group 1, ...
        w: `[G, K, N]` one weight matrix per group (cast to the dtype of
            `x`).
        group_sizes: `[G]` int rows in each group; their sum may be less
            than `M` (rows past it come out as 0), never more.
        implementation: a name from `select_implementation` (not
            `"auto"` or `"blocks"`). Defaults to `"reference"`.

    Returns:
        `[M, N]` in the dtype of `x`; the kernels accumulate in float32
        (the `"reference"` form as the backend's own matmul does).

    Raises:
        ValueError: `implementation` is not a grouped matmul.

    Example:

    >>> x = np.ones((4, 2), "float32")
    >>> w = np.stack([np.eye(2), 2 * np.eye(2)]).astype("float32")
    >>> sizes = np.array([1, 2], "int32")  # rows 0 | 1, 2 | 3 in no group
    >>> y = moe_keras.kernels.grouped_matmul(x, w, sizes)
    >>> keras.ops.convert_to_numpy(y).tolist()
    [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [0.0, 0.0]]
    """
    x = ops.convert_to_tensor(x)
    w = ops.cast(w, x.dtype)
    group_sizes = ops.cast(group_sizes, "int32")
    rows = ops.shape(x)[0]
    if isinstance(rows, int) and rows == 0:
        # No rows (an empty batch): kernels tile rows and may not take 0.
        return ops.matmul(x, w[0])
    if implementation == "reference":
        return reference_grouped_matmul(x, w, group_sizes)
    if implementation == "torch":
        from moe_keras.kernels import _torch

        return _torch.grouped_mm(x, w, group_sizes)
    from moe_keras.kernels import _jax

    kernels = {
        "mosaic_gpu": _jax.mosaic_gpu,
        "megablox": _jax.megablox,
        "ragged_dot": _jax.ragged_dot,
    }
    if implementation not in kernels:
        raise ValueError(
            f"No grouped matmul named {implementation!r}; expected one of "
            f"{('reference', 'torch', *kernels)}."
        )
    return kernels[implementation](x, w, group_sizes)


def row_groups(group_sizes, num_rows):
    """The group of each row of a grouped matmul's sorted rows.

    Rows past the last group get `G`, the number of groups.

    Args:
        group_sizes: `[G]` int rows in each group, in order.
        num_rows: int M, the number of rows.

    Returns:
        An int32 `[M]` tensor.

    Example:

    >>> sizes = np.array([2, 0, 1], "int32")  # group 1 is empty
    >>> groups = moe_keras.kernels.row_groups(sizes, 4)
    >>> keras.ops.convert_to_numpy(groups).tolist()
    [0, 0, 2, 3]
    """
    ends = ops.cumsum(ops.cast(group_sizes, "int32"))
    rows = ops.arange(num_rows, dtype="int32")
    return ops.cast(ops.searchsorted(ends, rows, side="right"), "int32")


def reference_grouped_matmul(x, w, group_sizes):
    """`grouped_matmul` as one `keras.ops` matmul per group and a select.

    Plain autodiff, any backend, `G` times the work of a grouped kernel:
    the reference the kernels are checked against, and the
    `"reference"` implementation of `grouped_matmul`.

    Args:
        x: `[M, K]` rows sorted by group.
        w: `[G, K, N]` one weight matrix per group, in the dtype of `x`.
        group_sizes: `[G]` int rows in each group.

    Returns:
        `[M, N]`, rows past the groups 0.

    Example:

    >>> x = np.ones((3, 2), "float32")
    >>> w = np.stack([np.eye(2), 3 * np.eye(2)]).astype("float32")
    >>> sizes = np.array([2, 1], "int32")
    >>> y = moe_keras.kernels.reference_grouped_matmul(x, w, sizes)
    >>> keras.ops.convert_to_numpy(y).tolist()
    [[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]]
    """
    groups = row_groups(group_sizes, ops.shape(x)[0])[:, None]
    y = ops.zeros((ops.shape(x)[0], ops.shape(w)[-1]), x.dtype)
    for g in range(ops.shape(w)[0]):
        y = ops.where(groups == g, ops.matmul(x, w[g]), y)
    return y
