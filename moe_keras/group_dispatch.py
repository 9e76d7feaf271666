"""Sparse dispatch in token groups, each group with its own capacity.

The tokens are split into `G` equal groups (`[G, n, d]`, `n = T / G`),
and every group routes its own tokens into its own per-expert buffers of
`C` slots, `C` computed from the group's size (GShard's groups). The
buffers of all groups form `[G, E, C, d]`; transposed to `[E, G, C, d]`
each expert sees its slots of every group at once and runs them as one
matmul.

With one group per device (`moe_keras.distribution`) that transpose is
the all-to-all of expert parallelism: groups live on the devices that
hold their tokens, experts on the devices that hold their weights, and
everything else is local to a group. So every gather and scatter here is
batched over the group axis, which XLA's partitioner keeps on the group's
own device, and the capacity, the drops and the slot order of a group
depend on that group's tokens only: one device running the same groups
computes the same numbers as the sharded run.

Dropless dispatch has no static per-expert layout to shard; with groups,
`capacity=None` means `C = n` (every expert can take every token of its
group): exact, at `E / k` times the expert work.
"""

from keras import backend
from keras import ops

from moe_keras import dispatch as dispatch_lib


class GroupRoutePlan:
    """Where each assignment of each group goes.

    Args:
        indices: `[G, n, k]` int, the experts each token chose.
        num_experts: int E.
        capacity_: int slots per expert and group, or `None` for `n`.
        valid: optional `[G, n]` bool, tokens to route (masks, padding),
            or `[G, n, k]`, assignments to route.
        partitioned: bool, build the inverse map by a sort batched over
            groups, which XLA's partitioner keeps on each group's device
            (the scatter it replaces is computed whole on every device
            and summed across them); the plan is the same.
        priority: optional `[G, n, k]` float (the router weights): within
            each group, the assignments with the highest priority keep
            the slots, ties in the default order (see `RoutePlan`).

    Attributes (all batched over groups):
        assignment_slot: `[G, n * k]` int32, the slot of each assignment
            within its group's `E * C` slots (clamped when dropped).
        kept: `[G, n * k]` bool, whether the assignment has a slot.
        slot_assignment: `[G, E * C]` int32, the assignment in each slot.
        slot_filled: `[G, E * C]` bool, whether the slot holds one.
        routed, dropped: float scalars summed over groups.
    """

    def __init__(
        self,
        indices,
        num_experts,
        capacity_,
        valid=None,
        partitioned=False,
        priority=None,
    ):
        num_groups, size, top_k = ops.shape(indices)
        if capacity_ is None:
            capacity_ = max(size, 1) if isinstance(size, int) else size
        self.num_groups, self.top_k = num_groups, top_k
        self.num_experts, self.capacity = num_experts, capacity_
        assignments = size * top_k

        choice = ops.one_hot(indices, num_experts, dtype="int32")  # [G,n,k,E]
        if valid is not None:
            valid = ops.cast(valid, "int32")
            if len(valid.shape) == 2:
                valid = valid[..., None]
            choice = choice * valid[..., None]
        # First choices rank before second choices, as without groups.
        by_choice = ops.reshape(
            ops.transpose(choice, (0, 2, 1, 3)), (num_groups, -1, num_experts)
        )  # [G, k * n, E]
        if priority is not None:
            # Rank in priority order, then map back to choice-major ids.
            by_priority = dispatch_lib.priority_order(priority)  # [G, k*n]
            by_choice = ops.take_along_axis(
                by_choice,
                ops.broadcast_to(by_priority[..., None], ops.shape(by_choice)),
                axis=1,
            )
        rank = ops.cumsum(by_choice, axis=1) - by_choice
        position = ops.sum(rank * by_choice, axis=-1)  # [G, k * n]
        if priority is not None:
            position = ops.take_along_axis(
                position,
                ops.cast(ops.argsort(by_priority, axis=-1), "int32"),
                axis=-1,
            )
        position = ops.reshape(
            ops.transpose(
                ops.reshape(position, (num_groups, top_k, size)), (0, 2, 1)
            ),
            (num_groups, assignments),
        )  # [G, n * k], token-major
        routed = ops.reshape(ops.sum(choice, axis=-1), (num_groups, -1)) > 0
        flat_indices = ops.reshape(indices, (num_groups, assignments))
        keep = ops.logical_and(routed, position < capacity_)
        slot = flat_indices * capacity_ + position
        num_slots = num_experts * capacity_

        slot_or_overflow = ops.where(keep, slot, num_slots)
        self.kept = keep
        self.assignment_slot = ops.where(keep, slot, 0)
        self.routed = ops.sum(ops.cast(routed, "float32"))
        self.dropped = self.routed - ops.sum(ops.cast(keep, "float32"))
        if partitioned:
            kept_per_expert = ops.minimum(
                ops.sum(choice, axis=(1, 2)), capacity_
            )  # [G, E]
            self._inverse_by_sort(slot_or_overflow, kept_per_expert)
            return

        # The inverse map, slot -> assignment, by a scatter.
        group_ids = ops.broadcast_to(
            ops.arange(num_groups, dtype="int32")[:, None],
            (num_groups, assignments),
        )
        assignment_ids = ops.broadcast_to(
            ops.arange(1, assignments + 1, dtype="int32")[None, :],
            (num_groups, assignments),
        )
        coordinates = ops.stack([group_ids, slot_or_overflow], axis=-1)
        slot_assignment = ops.scatter(
            ops.reshape(coordinates, (-1, 2)),
            ops.reshape(assignment_ids, (-1,)),
            (num_groups, num_slots + 1),
        )[:, :num_slots]

        self.slot_filled = slot_assignment > 0
        self.slot_assignment = ops.maximum(slot_assignment - 1, 0)

    def _inverse_by_sort(self, slot_or_overflow, kept_per_expert):
        """The inverse map from each group's assignments sorted by slot:
        kept slots are unique, so expert e's `p`-th slot holds the
        assignment at sorted position `start_e + p`, where `start_e`
        counts the kept assignments of the experts before e."""
        groups, experts = self.num_groups, self.num_experts
        order = ops.cast(ops.argsort(slot_or_overflow, axis=-1), "int32")
        # A zero appended, so that no slot reads past `order` (a group may
        # have no assignments at all).
        assignments = ops.shape(order)[-1]
        order = ops.pad(order, ((0, 0), (0, 1)))
        start = ops.cumsum(kept_per_expert, axis=-1) - kept_per_expert
        p = ops.arange(self.capacity, dtype="int32")
        filled = p[None, None, :] < kept_per_expert[..., None]  # [G, E, C]
        source = ops.minimum(start[..., None] + p, assignments)
        assignment = ops.take_along_axis(
            order, ops.reshape(source, (groups, -1)), axis=-1
        )
        filled = ops.reshape(filled, (groups, experts * self.capacity))
        self.slot_filled = filled
        self.slot_assignment = ops.where(filled, assignment, 0)


def take_rows(x, index, present):
    """Per group, `x[g, index[g, i]]` where `present`, else zeros.

    `x` is `[G, n, d]`, `index` and `present` `[G, m]`. On JAX a batched
    gather (`take_along_axis`), which the partitioner keeps per group;
    elsewhere one flat gather with the group offsets added, which is the
    faster form on one device. As in `dispatch._rows_or_zeros`, absent
    rows are selected away, and an empty or unknown-size `x` reads a zero
    row appended to each group.
    """
    num_groups, rows = ops.shape(x)[0], ops.shape(x)[1]
    if not (isinstance(rows, int) and rows > 0):
        x = ops.pad(x, ((0, 0), (0, 1), (0, 0)))
        index = ops.where(present, index, rows)
        rows = rows + 1
    if backend.backend() == "jax":
        picked = ops.take_along_axis(x, index[..., None], axis=1)
    else:
        offsets = ops.arange(num_groups, dtype="int32")[:, None] * rows
        flat = ops.reshape(x, (-1, ops.shape(x)[-1]))
        picked = ops.take(flat, ops.reshape(index + offsets, (-1,)), axis=0)
        picked = ops.reshape(picked, (num_groups, -1, ops.shape(x)[-1]))
    return ops.where(present[..., None], picked, ops.zeros((), x.dtype))


def dispatch(x, plan):
    """Tokens `[G, n, d]` -> buffers `[G, E, C, d]` (empty slots zero)."""
    buffers = take_rows(x, plan.slot_assignment // plan.top_k, plan.slot_filled)
    return ops.reshape(
        buffers,
        (plan.num_groups, plan.num_experts, plan.capacity, ops.shape(x)[-1]),
    )


def combine(expert_outputs, weights, plan):
    """Buffers `[G, E, C, u]` and weights `[G, n, k]` (or `[G, n, k, u]`)
    -> `[G, n, u]`; dropped assignments contribute exactly 0."""
    num_groups, units = plan.num_groups, ops.shape(expert_outputs)[-1]
    flat = ops.reshape(expert_outputs, (num_groups, -1, units))
    picked = take_rows(flat, plan.assignment_slot, plan.kept)
    picked = ops.reshape(picked, (num_groups, -1, plan.top_k, units))
    weights = ops.cast(weights, picked.dtype)
    if len(weights.shape) == 3:
        weights = weights[..., None]
    return ops.sum(picked * weights, axis=2)
