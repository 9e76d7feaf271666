"""Moving tokens to experts and back, with static shapes.

Sparse dispatch places each (token, choice) assignment into a slot of a
per-expert buffer of fixed capacity `C`, so the experts run as one batched
matmul over `[experts, C, features]` and every shape is known when XLA
traces the step. Assignments past an expert's capacity are dropped.

The assignment <-> slot map is a partial permutation, so both directions
are gathers: dispatch gathers tokens into slots, combine gathers slot
outputs back to tokens. Their gradients are written as gathers through the
inverse map, instead of the scatter-adds autodiff would emit (serial and
slow on CPU, atomics on GPU). Nothing of size `[tokens, experts, C]` or
`[experts, tokens, features]` is ever built: dispatch and combine move
`O(tokens * k * features)` values.
"""

from fractions import Fraction

from keras import ops


def capacity(num_tokens, top_k, num_experts, capacity_factor):
    """Slots per expert: `ceil(capacity_factor * tokens * k / E)`.

    `capacity_factor=None` is dropless and returns `None` (see
    `RoutePlan`'s block layout). `C` is computed in exact integer arithmetic (so it is the same number whether
    `tokens` is a Python int, a symbolic dimension of a JAX export, or a
    scalar tensor of a dynamic batch in TensorFlow) and, for a known token
    count, clamped to `[1, tokens]`; clamping changes no result, as with
    `C >= tokens` nothing is dropped either way.
    """
    if capacity_factor is None:
        return None
    ratio = Fraction(capacity_factor * top_k / num_experts).limit_denominator(
        1 << 20
    )
    if ops.is_tensor(num_tokens):
        num_tokens = ops.cast(num_tokens, "int32")
        c = -((-num_tokens * ratio.numerator) // ratio.denominator)
        return ops.maximum(1, ops.minimum(c, num_tokens))
    c = -((-num_tokens * ratio.numerator) // ratio.denominator)
    if isinstance(num_tokens, int):
        return max(1, min(c, num_tokens))
    return c


def block_size(num_assignments, num_experts):
    """Rows per block of the dropless layout.

    Padding costs up to `E * (b - 1)` extra rows of expert compute, while
    each block gathers its expert's weights, so small blocks cost weight
    traffic: a block of about `assignments / (4 E)` rows (a power of two in
    [16, 512]) keeps the padding near a quarter of the work.
    """
    if not isinstance(num_assignments, int):
        return 128
    target = max(num_assignments // (4 * num_experts), 1)
    return int(min(max(1 << (target.bit_length() - 1), 16), 512))


class RoutePlan:
    """Where each assignment goes, computed once from the router's choice.

    Two buffer layouts, both of static shape `[groups, group_size, ...]`:

    - capacity (`capacity_` an int): group `e` is expert `e`'s buffer of
      `C` slots; assignments past `C` are dropped.
    - dropless (`capacity_=None`): assignments sorted by expert into blocks
      of `block_size` rows, each expert's rows padded to whole blocks, so a
      block belongs to one expert (`group_expert`) and nothing is dropped.
      At most `(T * k + E * (b - 1)) / b` blocks are ever needed.

    Attributes:
        num_groups, group_size: the buffer layout.
        group_expert: `[num_groups]` int32, the expert of each block
            (`None` in the capacity layout, where group `e` is expert `e`).
        assignment_slot: `[tokens * k]` int32, the buffer slot of each
            assignment (token-major), clamped to a valid slot when dropped.
        kept: `[tokens * k]` float, 1 where the assignment has a slot.
        slot_assignment: `[slots]` int32, the assignment in each slot
            (0 for an empty slot, which `slot_filled` marks).
        slot_filled: `[slots]` float, 1 where a slot holds an assignment.
        expert_counts: `[E]` float, assignments each expert was chosen
            for (before dropping).
        dropped: float scalar, assignments dropped for lack of capacity.
        routed: float scalar, assignments routed (masked tokens excluded).
    """

    def __init__(self, indices, num_experts, capacity_, valid=None):
        num_tokens, top_k = ops.shape(indices)[0], ops.shape(indices)[1]
        self.num_experts = num_experts
        self.top_k = top_k

        # [tokens, k, experts]; masked tokens claim no expert at all.
        choice = ops.one_hot(indices, num_experts, dtype="int32")
        if valid is not None:
            choice = choice * ops.cast(valid, "int32")[:, None, None]
        # Rank each assignment within its expert, all first choices before
        # any second choice (Switch/GShard priority), so under pressure a
        # token loses its k-th choice before anyone loses their first.
        by_choice = ops.reshape(
            ops.transpose(choice, (1, 0, 2)), (-1, num_experts)
        )  # [k * tokens, experts]
        rank = _exclusive_cumsum(by_choice)
        position = ops.sum(rank * by_choice, axis=-1)  # [k * tokens]
        position = ops.reshape(
            ops.transpose(ops.reshape(position, (top_k, -1)), (1, 0)), (-1,)
        )  # [tokens * k]
        routed = ops.reshape(ops.sum(choice, axis=-1), (-1,)) > 0
        counts = ops.sum(choice, axis=(0, 1))  # [experts] int32
        flat_indices = ops.reshape(indices, (-1,))

        if capacity_ is not None:
            self.num_groups, self.group_size = num_experts, capacity_
            self.group_expert = None
            keep = ops.logical_and(routed, position < capacity_)
            slot = flat_indices * capacity_ + position
        else:
            size = block_size(num_tokens * top_k, num_experts)
            self.group_size = size
            self.num_groups = (
                num_tokens * top_k + num_experts * (size - 1)
            ) // size
            blocks = (counts + size - 1) // size  # [experts]
            block_end = ops.cumsum(blocks)
            block_start = block_end - blocks
            keep = routed
            slot = ops.take(block_start, flat_indices) * size + position
            # [groups]: the expert whose blocks cover each block; blocks
            # past the last expert's are empty and borrow expert E - 1.
            block_ids = ops.arange(self.num_groups, dtype="int32")
            self.group_expert = ops.minimum(
                ops.sum(
                    ops.cast(block_ids[:, None] >= block_end[None, :], "int32"),
                    axis=-1,
                ),
                num_experts - 1,
            )
        num_slots = self.num_groups * self.group_size

        # Dropped assignments write into an overflow slot that is cut off.
        slot_or_overflow = ops.where(keep, slot, num_slots)
        assignment_ids = ops.arange(1, num_tokens * top_k + 1, dtype="int32")
        slot_assignment = ops.scatter(
            ops.expand_dims(slot_or_overflow, -1),
            assignment_ids,
            (num_slots + 1,),
        )[:num_slots]

        self.kept = ops.cast(keep, "float32")
        self.assignment_slot = ops.where(keep, slot, 0)
        self.slot_filled = ops.cast(slot_assignment > 0, "float32")
        self.slot_assignment = ops.maximum(slot_assignment - 1, 0)
        self.expert_counts = ops.cast(counts, "float32")
        self.routed = ops.sum(ops.cast(routed, "float32"))
        self.dropped = self.routed - ops.sum(self.kept)


def dispatch(x, plan):
    """Tokens `[T, d]` -> buffers `[groups, group_size, d]` (empty slots
    hold token 0; their outputs are never read)."""
    top_k = plan.top_k
    num_tokens, features = ops.shape(x)[0], ops.shape(x)[1]
    slot_token = plan.slot_assignment // top_k
    assignment_slot = plan.assignment_slot
    kept = plan.kept

    def forward(x):
        buffers = ops.take(x, slot_token, axis=0)  # [E * C, d]

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # Each token gathers the gradients of the slots it went to.
            grads = ops.take(upstream, assignment_slot, axis=0)  # [T*k, d]
            grads = grads * ops.cast(kept, grads.dtype)[:, None]
            return (ops.sum(ops.reshape(grads, (num_tokens, top_k, -1)), 1),)

        return buffers, backward

    buffers = ops.custom_gradient(forward)(x)
    return ops.reshape(buffers, (plan.num_groups, plan.group_size, features))


def slot_weights(weights, plan):
    """Gate weights `[T, k]` -> `[groups, group_size]`, each slot's weight.

    For experts that scale their own hidden activations (see `combine` with
    `weights=None`); empty slots get 0. Both directions are gathers through
    the plan's maps.
    """
    assignment_slot, kept = plan.assignment_slot, plan.kept
    slot_assignment, slot_filled = plan.slot_assignment, plan.slot_filled
    shape = ops.shape(weights)

    def forward(weights):
        dtype = weights.dtype
        flat = ops.reshape(weights, (-1,))
        per_slot = ops.take(flat, slot_assignment, axis=0)
        per_slot = per_slot * ops.cast(slot_filled, dtype)

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grads = ops.take(upstream, assignment_slot, axis=0)
            return ops.reshape(grads * ops.cast(kept, dtype), shape)

        return per_slot, backward

    per_slot = ops.custom_gradient(forward)(weights)
    return ops.reshape(per_slot, (plan.num_groups, plan.group_size))


def combine(expert_outputs, weights, plan):
    """Buffers `[groups, group_size, u]` and weights -> `[T, u]`.

    `y_t = sum_j w_tj * out[slot(t, j)]`, dropped assignments contributing
    0. Weights are `[T, k]`, or `[T, k, u]` for per-feature gates, or
    `None` when the experts already scaled each slot's output by its
    weight (`slot_weights`): then combine is a plain gather-sum, and its
    backward one gather with no slot-sized product to keep for the weights'
    gradient.
    """
    top_k = plan.top_k
    units = ops.shape(expert_outputs)[-1]
    flat_outputs = ops.reshape(expert_outputs, (-1, units))  # [slots, u]
    if weights is None:
        return _gather_sum(flat_outputs, plan)
    per_feature = len(weights.shape) == 3
    assignment_slot = plan.assignment_slot
    kept = plan.kept
    slot_token = plan.slot_assignment // top_k
    slot_assignment = plan.slot_assignment
    slot_filled = plan.slot_filled

    def forward(flat_outputs, weights):
        dtype = flat_outputs.dtype
        # [T * k, 1 or u]: the weight of each assignment, 0 if dropped.
        kept_weights = ops.reshape(weights, (ops.shape(kept)[0], -1))
        kept_weights = kept_weights * ops.cast(kept, dtype)[:, None]
        # A gather feeding a reduction over k: XLA fuses it into one pass.
        picked = ops.take(flat_outputs, assignment_slot, axis=0)
        y = ops.sum(
            ops.reshape(picked, (-1, top_k, units))
            * ops.reshape(
                kept_weights, (-1, top_k, ops.shape(kept_weights)[-1])
            ),
            axis=1,
        )

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # Both gradients start from dy of each slot's token, gathered
            # once: d out[s] = w[a(s)] * dy[token(s)], and d w[a] =
            # <out[s], dy[token(s)]> taken per slot, then gathered back to
            # the assignments.
            slot_dy = ops.take(upstream, slot_token, axis=0)  # [slots, u]
            slot_weight = ops.take(kept_weights, slot_assignment, axis=0)
            slot_weight = slot_weight * ops.cast(slot_filled, dtype)[:, None]
            d_outputs = slot_dy * slot_weight
            if per_feature:
                slot_dw = slot_dy * flat_outputs
            else:
                slot_dw = row_dot(slot_dy, flat_outputs)  # [slots, 1]
            d_weights = ops.take(slot_dw, assignment_slot, axis=0)
            d_weights = d_weights * ops.cast(kept, dtype)[:, None]
            return d_outputs, ops.reshape(
                d_weights, (-1,) + tuple(weights.shape[1:])
            )

        return y, backward

    weights = ops.cast(weights, flat_outputs.dtype)
    return ops.custom_gradient(forward)(flat_outputs, weights)


def _gather_sum(flat_outputs, plan):
    """`y_t = sum_j out[slot(t, j)]` over kept assignments."""
    top_k = plan.top_k
    units = ops.shape(flat_outputs)[-1]
    assignment_slot, kept = plan.assignment_slot, plan.kept
    slot_token = plan.slot_assignment // top_k
    slot_filled = plan.slot_filled

    def forward(flat_outputs):
        dtype = flat_outputs.dtype
        picked = ops.take(flat_outputs, assignment_slot, axis=0)
        picked = picked * ops.cast(kept, dtype)[:, None]
        y = ops.sum(ops.reshape(picked, (-1, top_k, units)), axis=1)

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grads = ops.take(upstream, slot_token, axis=0)
            return grads * ops.cast(slot_filled, dtype)[:, None]

        return y, backward

    return ops.custom_gradient(forward)(flat_outputs)


def row_dot(a, b):
    """`sum(a * b, axis=-1, keepdims=True)` over rows `[..., n]`.

    Written as a batched matmul: XLA on CPU would otherwise write out the
    product before reducing it.
    """
    return ops.matmul(a[..., None, :], b[..., :, None])[..., 0]


def _exclusive_cumsum(values, block=128):
    """Exclusive prefix sum down the rows of a small-width int `[n, w]`.

    XLA on CPU runs a long cumsum slowly; a lower-triangular matmul inside
    blocks of rows plus a short cumsum over block totals is about twice as
    fast, and exact (float32 holds every partial count below 2**24).
    """
    rows = ops.shape(values)[0]
    if not isinstance(rows, int) or rows < 2 * block:
        return ops.cumsum(values, axis=0) - values
    width = ops.shape(values)[1]
    padded = -(-rows // block) * block
    x = ops.cast(values, "float32")
    if padded != rows:
        x = ops.pad(x, ((0, padded - rows), (0, 0)))
    x = ops.reshape(x, (-1, block, width))  # [blocks, block, w]
    # Strictly lower-triangular: row i sums the rows before it.
    strict = ops.cast(
        ops.arange(block)[:, None] > ops.arange(block)[None, :], "float32"
    )
    within = ops.einsum("ij,njw->niw", strict, x)
    totals = ops.sum(x, axis=1)  # [blocks, w]
    before = ops.cumsum(totals, axis=0) - totals
    out = ops.reshape(within + before[:, None, :], (padded, width))[:rows]
    return ops.cast(out, values.dtype)


def dense_combine(expert_outputs, weights):
    """All-expert outputs `[T, E, u]` weighted by `[T, E]` (or per feature,
    `[T, E, u]`) -> `[T, u]`."""
    weights = ops.cast(weights, expert_outputs.dtype)
    if len(weights.shape) == 3:
        return ops.sum(weights * expert_outputs, axis=1)
    return ops.einsum("te,teu->tu", weights, expert_outputs)


def scatter_weights(weights, indices, num_experts):
    """Top-k weights `[T, k]` (or `[T, k, u]`) at `indices` as a dense
    `[T, E]` (or `[T, E, u]`) matrix."""
    choice = ops.one_hot(indices, num_experts, dtype=weights.dtype)
    if len(weights.shape) == 3:
        return ops.einsum("tku,tke->teu", weights, choice)
    return ops.einsum("tk,tke->te", weights, choice)


def expert_choice_weights(tokens, weights, num_tokens):
    """Expert-choice picks, tokens and weights `[E, C]`, as a dense
    `[T, E]` combine matrix."""
    num_experts = ops.shape(tokens)[0]
    experts = ops.broadcast_to(
        ops.arange(num_experts, dtype="int32")[:, None], ops.shape(tokens)
    )
    cells = ops.reshape(tokens * num_experts + experts, (-1,))
    dense = ops.segment_sum(
        ops.reshape(weights, (-1,)),
        cells,
        num_segments=num_tokens * num_experts,
    )
    return ops.reshape(dense, (-1, num_experts))
