"""Spilling overflow: assignments that found their expert full move down
the token's ranking of experts to one with room (`MoE(overflow="spill")`).

The capacity plan first places every assignment as it always does. Then,
for a bounded number of rounds, each token with an assignment still
unplaced offers that assignment (its first one, in choice order) to the
next expert of its ranking, past its top-k. An expert takes the offers of
a round into the slots it has left, in the order the drop policy ranked
the original assignments; an offer it cannot take is refused for good
(an expert that is full stays full: nothing placed is ever moved), and
the token offers its next expert in the next round. So each round costs
one sort of the tokens and a count of the offers per expert, and after
`R` rounds a token has tried its `R` next-ranked experts. The sort keys
are `expert * n * k + rank` in int32, so `(E + 1) * n * k` (n tokens per
group) must stay below 2**31, as in `dispatch`'s sorting plan.

Everything is batched over a leading group axis (`token_groups`, one
group otherwise), each group with its own capacity, and every shape is
static.
"""

from keras import ops

from moe_keras import dispatch as dispatch_lib
from moe_keras.gates.base import top_k_indices


def candidates(scores, indices, rounds):
    """The next `rounds` experts of each token's ranking, past the ones it
    uses: `(experts [T, rounds] int32, usable [T, rounds] bool)`.

    `scores` `[T, E]` are what the gate ranked by; `indices` `[T, k]` the
    experts the token uses. An expert the gate ruled out (`-inf`, outside
    the token's groups) or a row with no order (NaN) is not usable.
    """
    tokens, num_experts = ops.shape(scores)
    used = ops.sum(ops.one_hot(indices, num_experts), axis=1) > 0  # [T, E]
    scores = ops.where(used, ops.cast(float("-inf"), scores.dtype), scores)
    # One row more: reductions over an empty batch fail on some backends.
    scores = ops.pad(scores, ((0, 1), (0, 0)))
    ranked = top_k_indices(scores, rounds)
    best = ops.take_along_axis(scores, ranked, axis=-1)
    return ranked[:tokens], (best > float("-inf"))[:tokens]


def spill(
    indices, kept, routed, ranked, usable, capacity, num_experts, priority
):
    """Moves overflowing assignments to experts with room.

    Args:
        indices: `[G, n, k]` int32, the experts of each assignment.
        kept: `[G, n, k]` bool, the assignments the capacity plan placed.
        routed: `[G, n, k]` bool, the assignments to route (masks,
            padding).
        ranked, usable: `[G, n, R]`, each token's next experts and
            whether each may be offered (see `candidates`); `R` rounds.
        capacity: slots per expert and group.
        num_experts: int E.
        priority: optional `[G, n, k]` float, the drop policy's priority
            (see `dispatch.RoutePlan`), or `None` for the position order.

    Returns:
        `(indices, placed)`, both `[G, n, k]`: the expert each assignment
        ends at (its own where it found no room) and whether it has a
        slot.
    """
    groups, size, top_k = ops.shape(indices)
    span = size * top_k
    # [G, n, k]: where each assignment stands in the drop policy's order
    # (choice-major ids `j * n + t` without a priority).
    if priority is None:
        rank = ops.arange(span, dtype="int32")[None, :]
    else:
        order = dispatch_lib.priority_order(priority)  # [G, k * n]
        rank = ops.cast(ops.argsort(order, axis=-1), "int32")
    rank = ops.broadcast_to(rank, (groups, span))
    rank = ops.transpose(ops.reshape(rank, (groups, top_k, size)), (0, 2, 1))

    expert_ids = ops.arange(num_experts, dtype="int32")
    kept_counts = ops.sum(
        ops.cast(
            ops.logical_and(kept[..., None], indices[..., None] == expert_ids),
            "int32",
        ),
        axis=(1, 2),
    )  # [G, E]
    room = capacity - kept_counts
    waiting = ops.logical_and(routed, ops.logical_not(kept))
    choices = ops.arange(top_k, dtype="int32")
    big = (num_experts + 1) * span  # past every key
    for r in range(ops.shape(ranked)[-1]):
        offers = ops.logical_and(ops.any(waiting, axis=-1), usable[..., r])
        # The token's first waiting assignment makes the offer.
        first = ops.cast(ops.argmax(ops.cast(waiting, "int32"), -1), "int32")
        moving = ops.logical_and(
            choices == first[..., None], offers[..., None]
        )  # [G, n, k]
        target = ops.where(offers, ranked[..., r], num_experts)  # [G, n]
        rank_of_offer = ops.sum(ops.where(moving, rank, 0), axis=-1)
        # Unique keys: by expert, then in the policy's order.
        key = target * span + rank_of_offer
        sorted_key = ops.sort(key, axis=-1)
        offered = ops.sum(
            ops.cast(target[..., None] == expert_ids, "int32"), axis=1
        )  # [G, E]
        start = ops.cumsum(offered, axis=-1) - offered
        taken = ops.minimum(room, offered)
        # The key of each expert's first refused offer bounds those it
        # takes; where it takes all, the key past them is larger still.
        limit = ops.take_along_axis(
            ops.concatenate(
                [sorted_key, ops.zeros((groups, 1), key.dtype) + big], axis=-1
            ),
            start + taken,
            axis=-1,
        )  # [G, E]
        limit = ops.concatenate(
            [limit, ops.zeros((groups, 1), limit.dtype)], axis=-1
        )  # the non-offers' expert E takes nothing
        fits = key < ops.take_along_axis(limit, target, axis=-1)
        placed = ops.logical_and(moving, fits[..., None])
        indices = ops.where(placed, ranked[..., r : r + 1], indices)
        waiting = ops.logical_and(waiting, ops.logical_not(placed))
        room = room - taken
    return indices, ops.logical_and(routed, ops.logical_not(waiting))
