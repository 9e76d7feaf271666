"""Auxiliary router losses, as plain functions of the router's outputs.

Each takes an optional `mask` of shape `[tokens]` (1 for a real position,
0 for padding) so that padding never pulls the router anywhere.
"""

from keras import ops


def _masked_mean(values, mask, axis=0):
    """Mean of `values` over `axis`, counting only positions where mask=1."""
    if mask is None:
        return ops.mean(values, axis=axis)
    mask = ops.cast(mask, values.dtype)
    while len(mask.shape) < len(values.shape):
        mask = ops.expand_dims(mask, -1)
    total = ops.sum(values * mask, axis=axis)
    count = ops.maximum(ops.sum(mask, axis=axis), 1.0)
    return total / count


def load_balance_loss(router_probs, expert_indices, num_experts, mask=None):
    """Switch Transformer load-balancing loss.

    `loss = E * sum_i f_i * P_i`, where `f_i` is the fraction of routing
    assignments sent to expert `i` (each of a token's `k` choices counts as
    one assignment, before any capacity drop) and `P_i` is the mean router
    probability of expert `i`. It is 1 for perfectly uniform routing and
    grows as routing concentrates; only `P` carries gradient, `f` is a count.
    Fedus, Zoph and Shazeer, "Switch Transformers" (2021), eq. 4.

    Args:
        router_probs: `[tokens, experts]` float probabilities summing to 1
            over experts.
        expert_indices: `[tokens, k]` int, the experts each token chose.
        num_experts: int, E.
        mask: optional `[tokens]`; masked tokens count in neither term.

    Returns:
        A float32 scalar.
    """
    router_probs = ops.cast(router_probs, "float32")
    choices = ops.one_hot(expert_indices, num_experts, dtype="float32")
    per_token_fraction = ops.mean(choices, axis=1)  # [tokens, experts]
    fraction = _masked_mean(per_token_fraction, mask)  # [experts]
    mean_prob = _masked_mean(router_probs, mask)  # [experts]
    return float(num_experts) * ops.sum(ops.stop_gradient(fraction) * mean_prob)


def router_z_loss(router_logits, mask=None):
    """ST-MoE router z-loss.

    `loss = mean_t (logsumexp_i z_ti)^2`: it keeps router logits small, which
    keeps the float32 softmax well conditioned and training stable.
    Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert
    Models" (2022), eq. 5.

    Args:
        router_logits: `[tokens, experts]` float logits.
        mask: optional `[tokens]`; masked tokens are left out of the mean.

    Returns:
        A float32 scalar.
    """
    router_logits = ops.cast(router_logits, "float32")
    log_z = ops.logsumexp(router_logits, axis=-1)
    return _masked_mean(ops.square(log_z), mask)
