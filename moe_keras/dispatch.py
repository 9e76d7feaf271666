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

from keras import backend
from keras import ops


def custom_gradients(training):
    """Whether the dispatch and the experts use their hand-written
    gradients (gathers through the inverse maps) or leave it to autodiff.

    Always while training. In inference calls too, except on JAX: there
    the closures of `ops.custom_gradient` cannot be converted for a
    SavedModel (`model.export`), and JAX's own gradient of a gather is a
    dense scatter-add, right if slower, should anyone take one. On
    TensorFlow autodiff of a gather gives `IndexedSlices`, which some
    optimizers mishandle (see `experts._take`), so the hand-written
    gradients stay on in every call.
    """
    return bool(training) or backend.backend() != "jax"


def _with_gradient(forward, use_custom, *args):
    """`forward(*args)`, which returns `(value, backward)`, as a function
    with that custom gradient or, without `use_custom`, with autodiff's."""
    if use_custom:
        return ops.custom_gradient(forward)(*args)
    return forward(*args)[0]


def capacity(num_tokens, top_k, num_experts, capacity_factor):
    """Slots per expert: `ceil(r * tokens)`, clamped to `[1, tokens]`.

    `r` is `capacity_factor * k / E` as the nearest fraction `p / q` with
    `q <= 2**20` (`capacity_ratio`), so `C = ceil(capacity_factor * tokens
    * k / E)` up to that rounding. `capacity_factor=None` is dropless and
    returns `None` (see `RoutePlan`'s block layout).

    `C` is the same number whether `tokens` is a Python int, a symbolic
    dimension of a JAX export, or a scalar int32 tensor (an unknown batch
    size in a TensorFlow graph, such as `fit`'s partial last batch): the
    tensor path works in 32-bit pieces that cannot overflow for any token
    count below `2**31`. Clamping changes no result: with `C >= tokens`
    nothing is dropped either way, and with one token or fewer per expert
    one slot still holds it.
    """
    if capacity_factor is None:
        return None
    ratio = capacity_ratio(capacity_factor, top_k, num_experts)
    if ops.is_tensor(num_tokens):
        return _capacity_int32(ops.cast(num_tokens, "int32"), ratio)
    c = -((-num_tokens * ratio.numerator) // ratio.denominator)
    if isinstance(num_tokens, int):
        return max(1, min(c, num_tokens))
    return c


def capacity_ratio(capacity_factor, top_k, num_experts):
    """`capacity_factor * k / E` as a fraction with denominator <= 2**20."""
    return Fraction(capacity_factor * top_k / num_experts).limit_denominator(
        1 << 20
    )


def _capacity_int32(tokens, ratio):
    """`clamp(ceil(tokens * p / q), 1, tokens)` for an int32 tensor.

    `tokens * p` overflows int32 (p alone may be near 2**20), so with
    `tokens = a q + b` and `p = p_hi 2**10 + p_lo` every product stays
    below 2**31: `tokens p / q = a p + (b p_hi 2**10 + b p_lo) / q`. At a
    ratio of 1 or more the answer is `tokens` (the clamp).
    """
    p, q = ratio.numerator, ratio.denominator
    if p >= q:
        return ops.maximum(tokens, 1)
    a, b = tokens // q, tokens % q  # a * p < tokens; b < q <= 2**20
    p_hi, p_lo = p >> 10, p & 1023
    d1, r1 = (b * p_hi) // q, (b * p_hi) % q  # b * p_hi < 2**30
    rest = r1 * 1024 + b * p_lo  # < 2**30 + 2**30
    c = a * p + d1 * 1024 - ((-rest) // q)
    return ops.maximum(1, ops.minimum(c, tokens))


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

    Three buffer layouts, all of static shape `[groups, group_size, ...]`:

    - capacity (`capacity_` an int): group `e` is expert `e`'s buffer of
      `C` slots; assignments past `C` are dropped.
    - dropless blocks (`capacity_=None`): assignments sorted by expert into
      blocks of `block_size` rows, each expert's rows padded to whole
      blocks, so a block belongs to one expert (`group_expert`) and nothing
      is dropped. At most `(T * k + E * (b - 1)) / b` blocks are ever
      needed.
    - dropless sorted rows (`capacity_=None, sorted_rows=True`): one group
      of `T * k` rows, the assignments sorted by expert with no padding,
      `group_sizes` rows each, masked tokens' rows last (unfilled): the
      input of a grouped matmul (`moe_keras.kernels`).

    `method` (`plan_method` picks it from E) is how the assignments are
    ranked within their experts; both give the same plan.

    `priority` (optional `[tokens, k]` float, the router weights) changes
    who keeps a slot when an expert overflows: without it all first
    choices rank before any second choice, then token order (Switch/GShard);
    with it the assignments rank by priority, highest first, first and
    second choices pooled, ties in that same order (DeepSpeed's
    `drop_policy='probs'`, V-MoE's priority routing). It takes no gradient.

    `valid` (optional bool) marks what is routed: `[tokens]` per token
    (masks), or `[tokens, k]` per assignment (an `MoE` that spilled
    overflow leaves out the assignments that found no room).

    `custom_gradient` (see `custom_gradients`) picks whether the
    dispatch functions below use their hand-written gradients.

    Attributes:
        num_groups, group_size: the buffer layout.
        group_expert: `[num_groups]` int32, the expert of each block
            (`None` in the other layouts).
        group_sizes: `[E]` int32, each expert's rows in the sorted-rows
            layout (`None` in the others).
        assignment_slot: `[tokens * k]` int32, the buffer slot of each
            assignment (token-major), clamped to a valid slot when dropped.
        kept: `[tokens * k]` bool, whether the assignment has a slot.
        slot_assignment: `[slots]` int32, the assignment in each slot
            (0 for an empty slot, which `slot_filled` marks).
        slot_filled: `[slots]` bool, whether a slot holds an assignment.
        expert_counts: `[E]` float, assignments each expert was chosen
            for (before dropping).
        dropped: float scalar, assignments dropped for lack of capacity.
        routed: float scalar, assignments routed (masked tokens excluded).
    """

    def __init__(
        self,
        indices,
        num_experts,
        capacity_,
        valid=None,
        custom_gradient=True,
        method=None,
        sorted_rows=False,
        priority=None,
    ):
        num_tokens, top_k = ops.shape(indices)[0], ops.shape(indices)[1]
        self.num_experts = num_experts
        self.top_k = top_k
        self.custom_gradient = custom_gradient
        self.method = method or plan_method(num_experts)
        if self.method not in PLAN_METHODS:
            raise ValueError(
                f"`method` must be one of {PLAN_METHODS}; received "
                f"method={method!r}."
            )

        # Rank each assignment within its expert, all first choices before
        # any second choice (Switch/GShard priority), so under pressure a
        # token loses its k-th choice before anyone loses their first.
        # With a `priority`, the same ranking runs over the assignments
        # listed by priority instead (one column, `k = 1`), then maps back.
        if valid is not None:
            valid = _per_assignment(valid, top_k)  # [tokens, k]
        ranked, ranked_valid, by_priority = indices, valid, None
        if priority is not None:
            by_priority = priority_order(priority)  # [k * tokens]
            ranked = ops.reshape(
                ops.take(
                    ops.reshape(ops.transpose(indices, (1, 0)), (-1,)),
                    by_priority,
                ),
                (-1, 1),
            )
            if valid is not None:
                ranked_valid = ops.reshape(
                    ops.take(
                        ops.reshape(ops.transpose(valid, (1, 0)), (-1,)),
                        by_priority,
                    ),
                    (-1, 1),
                )
        if self.method == "sort":
            order, position, counts = _rank_by_sort(
                ranked, num_experts, ranked_valid
            )
        else:
            order = None
            position, counts = _rank_by_one_hot(
                ranked, num_experts, ranked_valid
            )
        if by_priority is not None:
            # Back to choice-major ids: assignment `by_priority[i]` is
            # the `i`-th ranked.
            position = ops.scatter(
                ops.expand_dims(by_priority, -1),
                position,
                (ops.shape(by_priority)[0],),
            )
            if order is not None:
                order = ops.take(by_priority, order)
        position = ops.reshape(
            ops.transpose(ops.reshape(position, (top_k, -1)), (1, 0)), (-1,)
        )  # [tokens * k], token-major
        if valid is None:
            routed = ops.ones((num_tokens * top_k,), "bool")
        else:
            routed = ops.reshape(valid, (-1,))
        flat_indices = ops.reshape(indices, (-1,))
        self.group_expert = self.group_sizes = None

        if capacity_ is not None:
            self.num_groups, self.group_size = num_experts, capacity_
            keep = ops.logical_and(routed, position < capacity_)
            slot = flat_indices * capacity_ + position
            group_start = ops.arange(num_experts, dtype="int32")
        elif sorted_rows:
            self.num_groups, self.group_size = 1, num_tokens * top_k
            self.group_sizes = ops.cast(counts, "int32")
            keep = routed
            group_start = ops.cumsum(self.group_sizes) - self.group_sizes
            slot = ops.take(group_start, flat_indices) + position
        else:
            size = block_size(num_tokens * top_k, num_experts)
            self.group_size = size
            self.num_groups = (
                num_tokens * top_k + num_experts * (size - 1)
            ) // size
            blocks = (counts + size - 1) // size  # [experts]
            block_end = ops.cumsum(blocks)
            group_start = block_end - blocks
            keep = routed
            slot = ops.take(group_start, flat_indices) * size + position
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

        if order is None:
            # Dropped assignments write into an overflow slot, cut off.
            slot_or_overflow = ops.where(keep, slot, num_slots)
            assignment_ids = ops.arange(
                1, num_tokens * top_k + 1, dtype="int32"
            )
            slot_assignment = ops.scatter(
                ops.expand_dims(slot_or_overflow, -1),
                assignment_ids,
                (num_slots + 1,),
            )[:num_slots]
            self.slot_filled = slot_assignment > 0
            self.slot_assignment = ops.maximum(slot_assignment - 1, 0)
        else:
            self.slot_filled, self.slot_assignment = _slots_from_order(
                order, counts, group_start, self, num_tokens
            )

        self.kept = keep
        self.assignment_slot = ops.where(keep, slot, 0)
        self.expert_counts = ops.cast(counts, "float32")
        self.routed = ops.sum(ops.cast(routed, "float32"))
        self.dropped = self.routed - ops.sum(ops.cast(keep, "float32"))


PLAN_METHODS = ("one_hot", "sort")


def _per_assignment(valid, top_k):
    """`valid`, per token `[tokens]` or per assignment `[tokens, k]`, as
    `[tokens, k]` bool."""
    valid = ops.cast(valid, "bool")
    if len(valid.shape) == 2:
        return valid
    return ops.repeat(valid[:, None], top_k, axis=1)


def priority_order(priority):
    """The choice-major ids `j * tokens + t` of a `[..., tokens, k]`
    priority's assignments, highest priority first, ties in id order
    (first choices, then token order): `[..., k * tokens]` int32.

    `ops.argsort` is stable on every backend (JAX's by default, torch's
    asked for, TensorFlow's `top_k` puts the lower index first), so a
    sort of the negated priority breaks ties by id.
    """
    priority = ops.stop_gradient(ops.cast(priority, "float32"))
    rank = len(priority.shape)
    axes = tuple(range(rank - 2)) + (rank - 1, rank - 2)
    flat = ops.reshape(
        ops.transpose(priority, axes), tuple(priority.shape[:-2]) + (-1,)
    )
    return ops.cast(ops.argsort(-flat, axis=-1), "int32")


def plan_method(num_experts):
    """How `RoutePlan` ranks the assignments within their experts.

    - `"one_hot"`: a prefix sum down a `[tokens * k, E]` one-hot matrix,
      then a scatter for the inverse map. `O(tokens * k * E)` work.
    - `"sort"`: one stable sort of the assignments by expert; ranks and
      the inverse map are gathers from the sorted order.
      `O(tokens * k * log(tokens * k))`, whatever E.

    Measured on CPU (`benchmarks/routing_plan.py`, plan alone, compiled):
    the one-hot form is 1.5-4x faster up to 32 experts on both backends;
    at 64 experts the sort is 2x faster on JAX and about even on
    TensorFlow, at 128 faster on both. So the sort is used past 32
    experts, on TensorFlow past 64.
    """
    limit = 64 if backend.backend() == "tensorflow" else 32
    return "sort" if num_experts > limit else "one_hot"


def _rank_by_one_hot(indices, num_experts, valid):
    """`(position [k * tokens] choice-major, counts [E])`."""
    # [tokens, k, experts]; masked tokens claim no expert at all.
    choice = ops.one_hot(indices, num_experts, dtype="int32")
    if valid is not None:
        choice = choice * ops.cast(valid, "int32")[:, :, None]
    by_choice = ops.reshape(
        ops.transpose(choice, (1, 0, 2)), (-1, num_experts)
    )  # [k * tokens, experts]
    rank = _exclusive_cumsum(by_choice)
    position = ops.sum(rank * by_choice, axis=-1)  # [k * tokens]
    return position, ops.sum(choice, axis=(0, 1))


def _rank_by_sort(indices, num_experts, valid):
    """`(order, position, counts)`: `order` lists the assignments
    (choice-major ids `j * tokens + t`) sorted by expert, stably, with
    masked tokens' assignments last."""
    experts = ops.reshape(ops.transpose(indices, (1, 0)), (-1,))  # [k * T]
    if valid is not None:
        present = ops.reshape(ops.transpose(valid, (1, 0)), (-1,))
        experts = ops.where(present, experts, num_experts)
    n = ops.shape(experts)[0]
    ids = ops.arange(n, dtype="int32")
    # A stable sort by expert as one sort of unique keys.
    order = ops.cast(ops.argsort(experts * n + ids), "int32")
    counts = ops.segment_sum(
        ops.ones_like(experts), experts, num_segments=num_experts + 1
    )[:num_experts]
    start = ops.cumsum(counts) - counts
    sorted_experts = ops.take(experts, order)
    rank = ids - ops.take(
        ops.concatenate([start, ops.zeros((1,), start.dtype)]),
        sorted_experts,
    )
    position = ops.scatter(ops.expand_dims(order, -1), rank, (n,))
    return order, position, counts


def _slots_from_order(order, counts, group_start, plan, num_tokens):
    """`(slot_filled, slot_assignment)` read off the sorted order: slot `r`
    of group `g` holds its expert's `p`-th assignment, `p = (g -
    group_start[e]) * size + r`, if the expert has that many."""
    size, top_k = plan.group_size, plan.top_k
    tokens = ops.maximum(num_tokens, 1)
    if plan.group_sizes is not None:
        # Sorted rows are the sorted order itself, masked tokens' last.
        filled = ops.arange(size, dtype="int32") < ops.sum(plan.group_sizes)
        token_major = (order % tokens) * top_k + order // tokens
        return filled, ops.where(filled, token_major, 0)
    groups = ops.arange(plan.num_groups, dtype="int32")
    expert = groups if plan.group_expert is None else plan.group_expert
    p = (groups - ops.take(group_start, expert))[:, None] * size + ops.arange(
        size, dtype="int32"
    )[None, :]  # [groups, size]
    filled = p < ops.take(counts, expert)[:, None]
    start = ops.cumsum(counts) - counts
    source = ops.take(start, expert)[:, None] + p
    # A zero appended, so that no slot reads past `order` (it may be empty).
    order = ops.concatenate([order, ops.zeros((1,), order.dtype)])
    source = ops.minimum(source, ops.shape(order)[0] - 1)
    assignment = ops.take(order, ops.reshape(source, (-1,)))  # j * T + t
    token_major = (assignment % tokens) * top_k + assignment // tokens
    filled = ops.reshape(filled, (-1,))
    return filled, ops.where(filled, token_major, 0)


def _rows_or_zeros(x, index, present):
    """`x[index]` where `present`, else a row of zeros.

    Absent rows are selected away, not multiplied by 0: `0 * inf` and
    `0 * nan` are NaN, so one non-finite row would leak into every
    dropped, empty or masked row that happened to read it. When `x` may
    be empty (a batch of zero tokens, or a row count only known at run
    time), absent rows read a zero row appended past its end instead,
    which costs a copy of `x`; with a known, non-zero row count (every
    XLA-compiled step) the select alone does.
    """
    rows = ops.shape(x)[0]
    if isinstance(rows, int) and rows > 0:
        return zero_unless(present, ops.take(x, index, axis=0))
    padded = ops.pad(x, ((0, 1),) + ((0, 0),) * (len(x.shape) - 1))
    return ops.take(padded, ops.where(present, index, rows), axis=0)


def zero_unless(present, x):
    """`x` where `present` (broadcast over trailing axes), else exactly 0."""
    while len(present.shape) < len(x.shape):
        present = ops.expand_dims(present, -1)
    return ops.where(present, x, ops.zeros((), x.dtype))


def dispatch(x, plan):
    """Tokens `[T, d]` -> buffers `[groups, group_size, d]` (empty slots
    hold zeros)."""
    top_k = plan.top_k
    num_tokens, features = ops.shape(x)[0], ops.shape(x)[1]
    slot_token = plan.slot_assignment // top_k
    assignment_slot, kept = plan.assignment_slot, plan.kept
    slot_filled = plan.slot_filled

    def forward(x):
        buffers = _rows_or_zeros(x, slot_token, slot_filled)  # [slots, d]

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # Each token gathers the gradients of the slots it went to.
            grads = _rows_or_zeros(upstream, assignment_slot, kept)
            return (ops.sum(ops.reshape(grads, (num_tokens, top_k, -1)), 1),)

        return buffers, backward

    buffers = _with_gradient(forward, plan.custom_gradient, x)
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
        flat = ops.reshape(weights, (-1,))
        per_slot = _rows_or_zeros(flat, slot_assignment, slot_filled)

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grads = _rows_or_zeros(upstream, assignment_slot, kept)
            return ops.reshape(grads, shape)

        return per_slot, backward

    per_slot = _with_gradient(forward, plan.custom_gradient, weights)
    return ops.reshape(per_slot, (plan.num_groups, plan.group_size))


def combine(expert_outputs, weights, plan):
    """Buffers `[groups, group_size, u]` and weights -> `[T, u]`.

    `y_t = sum_j w_tj * out[slot(t, j)]`, dropped assignments contributing
    exactly 0 (whatever any slot holds). Weights are `[T, k]`, or
    `[T, k, u]` for per-feature gates, or `None` when the experts already
    scaled each slot's output by its weight (`slot_weights`): then combine
    is a plain gather-sum, and its backward one gather with no slot-sized
    product to keep for the weights' gradient.
    """
    top_k = plan.top_k
    units = ops.shape(expert_outputs)[-1]
    flat_outputs = ops.reshape(expert_outputs, (-1, units))  # [slots, u]
    if weights is None:
        return _gather_sum(flat_outputs, plan)
    per_feature = len(weights.shape) == 3
    assignment_slot, kept = plan.assignment_slot, plan.kept
    slot_token = plan.slot_assignment // top_k
    slot_assignment, slot_filled = plan.slot_assignment, plan.slot_filled

    def forward(flat_outputs, weights):
        # [T * k, 1 or u]: the weight of each assignment, 0 if dropped.
        kept_weights = ops.reshape(
            weights, (-1, weights.shape[-1] if per_feature else 1)
        )
        kept_weights = zero_unless(kept, kept_weights)
        # A gather feeding a reduction over k: XLA fuses it into one pass.
        picked = _rows_or_zeros(flat_outputs, assignment_slot, kept)
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
            slot_dy = _rows_or_zeros(upstream, slot_token, slot_filled)
            slot_weight = _rows_or_zeros(
                kept_weights, slot_assignment, slot_filled
            )
            d_outputs = slot_dy * slot_weight
            if per_feature:
                slot_dw = slot_dy * flat_outputs
            else:
                slot_dw = row_dot(slot_dy, flat_outputs)  # [slots, 1]
            d_weights = _rows_or_zeros(slot_dw, assignment_slot, kept)
            return d_outputs, ops.reshape(
                d_weights, (-1,) + tuple(weights.shape[1:])
            )

        return y, backward

    weights = ops.cast(weights, flat_outputs.dtype)
    return _with_gradient(forward, plan.custom_gradient, flat_outputs, weights)


def _gather_sum(flat_outputs, plan):
    """`y_t = sum_j out[slot(t, j)]` over kept assignments."""
    top_k = plan.top_k
    units = ops.shape(flat_outputs)[-1]
    assignment_slot, kept = plan.assignment_slot, plan.kept
    slot_token = plan.slot_assignment // top_k
    slot_filled = plan.slot_filled

    def forward(flat_outputs):
        picked = _rows_or_zeros(flat_outputs, assignment_slot, kept)
        y = ops.sum(ops.reshape(picked, (-1, top_k, units)), axis=1)

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _rows_or_zeros(upstream, slot_token, slot_filled)

        return y, backward

    return _with_gradient(forward, plan.custom_gradient, flat_outputs)


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
    fast. It is exact: counts inside a block stay below `block`, which
    float32 holds, and the running count over blocks, which can pass
    float32's 2**24, is summed as int32.
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
    within = ops.cast(ops.einsum("ij,njw->niw", strict, x), "int32")
    totals = ops.cast(ops.sum(x, axis=1), "int32")  # [blocks, w]
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
