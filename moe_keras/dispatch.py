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

    `capacity_factor=None` is dropless: `C = tokens`, which an expert can
    never exceed since a token's k choices are distinct experts. `C` is
    computed in exact integer arithmetic (so it is the same number whether
    `tokens` is a Python int, a symbolic dimension of a JAX export, or a
    scalar tensor of a dynamic batch in TensorFlow) and, for a known token
    count, clamped to `[1, tokens]`; clamping changes no result, as with
    `C >= tokens` nothing is dropped either way.
    """
    if capacity_factor is None:
        return max(num_tokens, 1) if isinstance(num_tokens, int) else num_tokens
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


class RoutePlan:
    """Where each assignment goes, computed once from the router's choice.

    Attributes:
        assignment_slot: `[tokens * k]` int32, the buffer slot of each
            assignment (token-major), clamped to a valid slot when dropped.
        kept: `[tokens * k]` float, 1 where the assignment has a slot.
        slot_assignment: `[E * C]` int32, the assignment in each slot
            (0 for an empty slot, which `slot_filled` marks).
        slot_filled: `[E * C]` float, 1 where a slot holds an assignment.
        expert_counts: `[E]` float, assignments each expert was chosen
            for (before dropping).
        dropped: float scalar, assignments dropped for lack of capacity.
        routed: float scalar, assignments routed (masked tokens excluded).
    """

    def __init__(self, indices, num_experts, capacity_, valid=None):
        num_tokens, top_k = ops.shape(indices)[0], ops.shape(indices)[1]
        self.num_experts = num_experts
        self.capacity = capacity_
        self.top_k = top_k
        num_slots = num_experts * capacity_

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
        rank = ops.cumsum(by_choice, axis=0) - by_choice
        position = ops.sum(rank * by_choice, axis=-1)  # [k * tokens]
        position = ops.reshape(
            ops.transpose(ops.reshape(position, (top_k, -1)), (1, 0)), (-1,)
        )  # [tokens * k]
        routed = ops.reshape(ops.sum(choice, axis=-1), (-1,)) > 0
        keep = ops.logical_and(routed, position < capacity_)

        flat_indices = ops.reshape(indices, (-1,))
        slot = flat_indices * capacity_ + position
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
        self.expert_counts = ops.cast(ops.sum(choice, axis=(0, 1)), "float32")
        self.routed = ops.sum(ops.cast(routed, "float32"))
        self.dropped = self.routed - ops.sum(self.kept)


def dispatch(x, plan):
    """Tokens `[T, d]` -> expert buffers `[E, C, d]` (empty slots hold
    token 0; their outputs are never read)."""
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
    return ops.reshape(buffers, (plan.num_experts, plan.capacity, features))


def combine(expert_outputs, weights, plan):
    """Expert buffers `[E, C, u]` and combine weights `[T, k]` -> `[T, u]`.

    `y_t = sum_j w_tj * out[slot(t, j)]`, dropped assignments contributing 0.
    """
    top_k = plan.top_k
    units = ops.shape(expert_outputs)[-1]
    flat_outputs = ops.reshape(expert_outputs, (-1, units))  # [E * C, u]
    assignment_slot = plan.assignment_slot
    kept = plan.kept
    slot_token = plan.slot_assignment // top_k
    slot_assignment = plan.slot_assignment
    slot_filled = plan.slot_filled

    def forward(flat_outputs, weights):
        dtype = flat_outputs.dtype
        kept_weights = ops.reshape(weights, (-1,)) * ops.cast(kept, dtype)
        picked = ops.take(flat_outputs, assignment_slot, axis=0)  # [T*k, u]
        picked = ops.reshape(picked, (-1, top_k, units))  # [T, k, u]
        kept_weights_tk = ops.reshape(kept_weights, (-1, top_k))
        y = ops.sum(picked * kept_weights_tk[..., None], axis=1)  # [T, u]

        def backward(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # d out[s] = w[a(s)] * dy[token(s)]: a gather by slot.
            slot_weight = ops.take(kept_weights, slot_assignment, axis=0)
            slot_weight = slot_weight * ops.cast(slot_filled, dtype)
            d_outputs = ops.take(upstream, slot_token, axis=0)
            d_outputs = d_outputs * slot_weight[:, None]  # [E * C, u]
            d_weights = ops.sum(picked * upstream[:, None, :], axis=-1)
            d_weights = d_weights * ops.reshape(
                ops.cast(kept, dtype), (-1, top_k)
            )
            return d_outputs, d_weights

        return y, backward

    weights = ops.cast(weights, flat_outputs.dtype)
    return ops.custom_gradient(forward)(flat_outputs, weights)


def dense_combine(expert_outputs, weights):
    """All-expert outputs `[T, E, u]` weighted by `[T, E]` -> `[T, u]`."""
    weights = ops.cast(weights, expert_outputs.dtype)
    return ops.einsum("te,teu->tu", weights, expert_outputs)


def scatter_weights(weights, indices, num_experts):
    """Top-k weights `[T, k]` at `indices` as a dense `[T, E]` matrix."""
    choice = ops.one_hot(indices, num_experts, dtype=weights.dtype)
    return ops.einsum("tk,tke->te", weights, choice)
