"""Grouped matmuls on JAX: Pallas kernels that ship with JAX, under one
custom VJP.

Each implementation is three functions of rows sorted by group:

- `forward(x [M, K], w [G, K, N], sizes [G]) -> [M, N]`;
- `input_grad(dy [M, N], w [G, K, N], sizes) -> [M, K]`, the same product
  against each group's transposed weights;
- `weight_grad(x [M, K], dy [M, N], sizes) -> [G, K, N]`, each group's
  `x_g^T dy_g`.

`_with_vjp` joins them into one differentiable function, so the kernels
never go through autodiff (Pallas kernels have no transpose rule) and the
weight gradient is one dense `[G, K, N]` tensor, not a scatter.
"""

import functools
import importlib

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------- the VJP


def _zero_past_groups(y, sizes):
    """Rows past the last group: exactly 0. Some kernels leave them
    unwritten (uninitialised memory, possibly NaN), and a later kernel
    that reads a whole tile would carry that into real rows' sums."""
    rows = jnp.arange(y.shape[0], dtype=jnp.int32)
    return jnp.where(
        (rows < jnp.sum(sizes))[:, None], y, jnp.zeros((), y.dtype)
    )


def _with_vjp(forward, input_grad, weight_grad):
    @jax.custom_vjp
    def grouped(x, w, sizes):
        return _zero_past_groups(forward(x, w, sizes), sizes)

    def fwd(x, w, sizes):
        return grouped(x, w, sizes), (x, w, sizes)

    def bwd(residual, dy):
        x, w, sizes = residual
        dx = _zero_past_groups(input_grad(dy, w, sizes), sizes)
        return dx, weight_grad(x, dy, sizes).astype(w.dtype), None

    grouped.defvjp(fwd, bwd)
    return grouped


# ------------------------------------------- XLA's ragged_dot (reference)


def _ragged_forward(x, w, sizes):
    return jax.lax.ragged_dot(
        x, w, sizes, preferred_element_type=jnp.float32
    ).astype(x.dtype)


def _ragged_input_grad(dy, w, sizes):
    return _ragged_forward(dy, jnp.swapaxes(w, 1, 2), sizes)


def _ragged_weight_grad(x, dy, sizes):
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(
        x, dy, sizes, numbers, preferred_element_type=jnp.float32
    )


ragged_dot = _with_vjp(_ragged_forward, _ragged_input_grad, _ragged_weight_grad)


# ------------------------------------ Mosaic GPU (Hopper and newer NVIDIA)

# Block sizes of `ragged_dot_mgpu`, measured on an H200 (bf16, 8 and 64
# experts, `../shared/gpu/grouped_gemm_probe.py`): 128 x 128 tiles with a
# 64-deep K step, 3 stages and 4 column tiles a band was best at both sizes.
# Few rows per group waste most of a 128-row tile at each group boundary,
# so below 512 rows a group the tiles are 64 rows high.
_MOSAIC_BLOCK_K = 64


def mosaic_forward_config(rows, groups, k, n):
    """Block sizes of the forward (and input-gradient) kernel."""
    block_n = 128 if n % 128 == 0 else 64
    column_tiles = n // block_n
    band = next(b for b in (4, 2, 1) if column_tiles % b == 0)
    return dict(
        block_m=128 if rows >= 512 * groups else 64,
        block_n=block_n,
        block_k=_MOSAIC_BLOCK_K,
        max_concurrent_steps=min(3, k // _MOSAIC_BLOCK_K),
        grid_block_n=band,
    )


def mosaic_weight_grad_config(k, n):
    """Block sizes of the transposed (weight-gradient) kernel, the
    configuration that ran in the probe."""
    return dict(
        block_m=128 if k % 128 == 0 else 64,
        block_n=128 if n % 128 == 0 else 64,
        block_k=_MOSAIC_BLOCK_K,
        max_concurrent_steps=2,
        grid_block_n=1,
    )


def mosaic_shape_problem(k, n):
    """Why a `[K] -> [N]` projection cannot run on the Mosaic kernels, or
    `None`: their tiles are 64 wide and pipeline at least 2 K steps."""
    if k % 64 or n % 64 or k < 128:
        return (
            f"a projection of {k} -> {n} features; the Mosaic GPU kernels "
            "need both sizes to be multiples of 64, the input at least 128"
        )
    return None


def _mosaic_forward(x, w, sizes, transpose=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    n = w.shape[1] if transpose else w.shape[2]
    config = mosaic_forward_config(x.shape[0], w.shape[0], x.shape[1], n)
    return ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=sizes, transpose_rhs=transpose, **config
    )


def _mosaic_weight_grad(x, dy, sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    config = mosaic_weight_grad_config(x.shape[1], dy.shape[1])
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=sizes, **config
    )


mosaic_gpu = _with_vjp(
    _mosaic_forward,
    functools.partial(_mosaic_forward, transpose=True),
    _mosaic_weight_grad,
)


# ----------------------------------------------------- Megablox (TPU)


def _megablox_tiling(m, k, n):
    # The TPU's 128-lane tiles, smaller for small problems; rows in
    # multiples of 8 (sublanes).
    return (
        min(128, max(8, -(-m // 8) * 8)),
        min(128, k),
        min(128, n),
    )


def _megablox_rows(x):
    """Megablox tiles the rows evenly: pad them to a whole tile."""
    m = x.shape[0]
    tile = _megablox_tiling(m, 1, 1)[0]
    return jnp.pad(x, ((0, -m % tile), (0, 0))), m


def _megablox_kernels():
    # Imported when a kernel runs, not with this module: `import`ing it is
    # how every JAX layer learns whether a kernel applies, and a JAX
    # without Megablox must still build layers. The package's `gmm` is
    # the function; the kernels' module is this.
    return importlib.import_module(
        "jax.experimental.pallas.ops.tpu.megablox.gmm"
    )


def megablox_parts(interpret=False):
    """The Megablox `gmm` / `tgmm` as the three functions `_with_vjp`
    joins; `interpret=True` runs them on the CPU (tests)."""

    def forward(x, w, sizes, transpose=False):
        padded, m = _megablox_rows(x)
        n = w.shape[1] if transpose else w.shape[2]
        out = _megablox_kernels().gmm(
            padded,
            w,
            sizes,
            preferred_element_type=x.dtype,
            tiling=_megablox_tiling(padded.shape[0], x.shape[1], n),
            transpose_rhs=transpose,
            interpret=interpret,
        )
        return out[:m]

    def weight_grad(x, dy, sizes):
        padded_x, _ = _megablox_rows(x)
        padded_dy, _ = _megablox_rows(dy)
        return _megablox_kernels().tgmm(
            jnp.swapaxes(padded_x, 0, 1),
            padded_dy,
            sizes,
            preferred_element_type=jnp.float32,
            tiling=_megablox_tiling(padded_x.shape[0], x.shape[1], dy.shape[1]),
            interpret=interpret,
        )

    return forward, functools.partial(forward, transpose=True), weight_grad


megablox = _with_vjp(*megablox_parts())


# ------------------------------------------------------------- platform


def gpu_compute_capability():
    """`(major, minor)` of JAX's first GPU, or `None` without one."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return None
    major, _, minor = str(capability).partition(".")
    return int(major), int(minor or 0)


def platform():
    return jax.default_backend()
