"""Plain NumPy references of the layers, written from their weights alone."""

import keras
import numpy as np

ACTIVATIONS = {
    None: lambda h: h,
    "linear": lambda h: h,
    "relu": lambda h: np.maximum(h, 0.0),
    "silu": lambda h: h / (1.0 + np.exp(-h)),
}


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def experts_forward(experts, x):
    """Every expert on every row of `x` `[T, d]` -> `[T, E, units]`."""
    act = ACTIVATIONS[experts.get_config()["activation"]]
    weights = {
        v.path.split("/")[-1]: keras.ops.convert_to_numpy(v)
        for v in experts.weights
    }
    outs = []
    for e in range(experts.num_experts):
        if experts.hidden_units is None:
            kernel, bias = weights["kernel"][e], weights.get("bias")
        else:
            kernel, bias = weights["in_kernel"][e], weights.get("in_bias")
        h = x @ kernel + (bias[e] if bias is not None else 0.0)
        if experts.gated == "clamped_swiglu":
            half = h.shape[-1] // 2
            limit, alpha = experts.glu_limit, experts.glu_alpha
            gate = np.minimum(h[:, :half], limit)
            up = np.clip(h[:, half:], -limit, limit)
            h = gate * sigmoid(alpha * gate) * (up + 1.0)
        elif experts.gated:
            half = h.shape[-1] // 2
            h = act(h[:, :half]) * h[:, half:]
        else:
            h = act(h)
        if experts.hidden_units is not None:
            out_bias = weights.get("out_bias")
            h = h @ weights["out_kernel"][e] + (
                out_bias[e] if out_bias is not None else 0.0
            )
        if "output_scale" in weights:
            h = h * weights["output_scale"][e]
        outs.append(h)
    return np.stack(outs, axis=1)


def gate_forward(gate, x):
    """Returns `(probs, logits)` of a gate on `x` `[T, d]`."""
    if gate.input_norm == "rms":
        x = x / np.sqrt(
            np.mean(x**2, -1, keepdims=True) + gate.input_norm_epsilon
        )
    x = x * gate.input_multiplier
    if gate.input_scale is not None:
        x = x * keras.ops.convert_to_numpy(gate.input_scale)
    logits = x @ keras.ops.convert_to_numpy(gate.kernel)
    if gate.bias is not None:
        logits = logits + keras.ops.convert_to_numpy(gate.bias)
    name = type(gate).__name__
    probs = softmax(logits) if name == "SoftmaxGate" else sigmoid(logits)
    return probs, logits


def top_k_weights(probs, k, normalize):
    """Dense `[T, E]` combine weights keeping each row's k largest."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.zeros_like(probs)
    rows = np.arange(probs.shape[0])[:, None]
    weights[rows, order] = probs[rows, order]
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, order


def capacity_keep(order, num_experts, capacity, valid=None):
    """Which `(token, choice)` assignments fit in their expert's capacity:
    all first choices claim slots (in token order) before second choices."""
    tokens, k = order.shape
    keep = np.zeros((tokens, k), bool)
    used = np.zeros(num_experts, int)
    for j in range(k):
        for t in range(tokens):
            if valid is not None and not valid[t]:
                continue
            e = order[t, j]
            if used[e] < capacity:
                keep[t, j] = True
                used[e] += 1
    return keep


def capacity_keep_by_probability(
    order, weights, num_experts, capacity, valid=None
):
    """`capacity_keep` under `drop_policy="probability"`: within each
    expert the assignments with the highest weight (`weights` `[T, k]`,
    aligned with `order`) keep the slots, first and second choices pooled,
    ties in `capacity_keep`'s order (first choices, then token order)."""
    tokens, k = order.shape
    ranked = sorted(
        (
            (-float(weights[t, j]), j, t)
            for j in range(k)
            for t in range(tokens)
            if valid is None or valid[t]
        ),
    )
    keep = np.zeros((tokens, k), bool)
    used = np.zeros(num_experts, int)
    for _, j, t in ranked:
        e = order[t, j]
        if used[e] < capacity:
            keep[t, j] = True
            used[e] += 1
    return keep


def capacity_spill(
    order, scores, num_experts, capacity, rounds, valid=None, priority=None
):
    """`overflow="spill"`, one assignment at a time: `(final [T, k],
    placed [T, k] bool)`.

    First the capacity plan of the drop policy (`priority`, the `[T, k]`
    weights, for "probability"; `None` for "position"). Then, in each of
    `rounds` rounds, every token with an unplaced assignment offers its
    first one (lowest choice) to the next expert of its ranking: the
    experts it does not use, by `scores` `[T, E]` (highest first, lower
    index among ties; never one at -inf or NaN). The offers are granted
    while their expert has room, in the drop policy's order of the
    offering assignments; a refused expert is not offered again.
    """
    tokens, k = order.shape
    if priority is None:
        keep = capacity_keep(order, num_experts, capacity, valid)
        sequence = [(j, t) for j in range(k) for t in range(tokens)]
    else:
        keep = capacity_keep_by_probability(
            order, priority, num_experts, capacity, valid
        )
        sequence = sorted(
            ((j, t) for j in range(k) for t in range(tokens)),
            key=lambda a: (-float(priority[a[1], a[0]]), a[0], a[1]),
        )
    rank = {a: i for i, a in enumerate(sequence)}
    used = np.zeros(num_experts, int)
    for t in range(tokens):
        for j in range(k):
            used[order[t, j]] += keep[t, j]
    ranking = []
    for t in range(tokens):
        others = [
            e
            for e in range(num_experts)
            if e not in order[t] and scores[t, e] > -np.inf
        ]
        ranking.append(sorted(others, key=lambda e: (-scores[t, e], e)))
    final, placed = order.copy(), keep.copy()
    for r in range(rounds):
        offers = []
        for t in range(tokens):
            if valid is not None and not valid[t]:
                continue
            waiting = [j for j in range(k) if not placed[t, j]]
            if waiting and r < len(ranking[t]):
                j = waiting[0]
                offers.append((rank[(j, t)], t, j, ranking[t][r]))
        for _, t, j, e in sorted(offers):
            if used[e] < capacity:
                used[e] += 1
                final[t, j], placed[t, j] = e, True
    return final, placed


def moe_forward(layer, x, capacity=None, valid=None, router_x=None):
    """NumPy forward of an `MoE` layer on `x` `[T, d]` -> `[T, units]`.

    With `capacity`, assignments that do not fit are dropped, as the sparse
    dispatch does, or spilled (`overflow="spill"`, see `capacity_spill`:
    the weights are then the probabilities at the final experts,
    renormalised over the k as the gate does). `router_x`: what the gate
    scores, if not `x`."""
    probs, _ = gate_forward(layer.gate, x if router_x is None else router_x)
    if layer.top_k is None:
        weights = probs
    else:
        normalize = (
            type(layer.gate).__name__ == "SoftmaxGate" and layer.top_k > 1
        )
        weights, order = top_k_weights(probs, layer.top_k, normalize)
        spills = getattr(layer, "overflow", "drop") == "spill"
        if capacity is not None and spills:
            rows = np.arange(x.shape[0])[:, None]
            by_probability = layer.drop_policy == "probability"
            final, placed = capacity_spill(
                order,
                probs,
                layer.num_experts,
                capacity,
                min(layer.spill_rounds, layer.num_experts - layer.top_k),
                valid,
                weights[rows, order] if by_probability else None,
            )
            kept = probs[rows, final]
            if normalize:
                kept = kept / kept.sum(-1, keepdims=True)
            weights = np.zeros_like(probs)
            weights[rows, final] = kept * placed
        elif capacity is not None:
            rows = np.arange(x.shape[0])[:, None]
            if getattr(layer, "drop_policy", "position") == "probability":
                keep = capacity_keep_by_probability(
                    order,
                    weights[rows, order],
                    layer.num_experts,
                    capacity,
                    valid,
                )
            else:
                keep = capacity_keep(order, layer.num_experts, capacity, valid)
            weights[rows, order] *= keep
    if valid is not None:
        weights = weights * valid[:, None]
    outs = experts_forward(layer.experts, x)
    return np.einsum("te,teu->tu", weights, outs)


def group_limited_top_k(scores, probs, k, groups, top_groups):
    """DeepSeek-V3 group-limited top-k, one position at a time.

    The E experts form `groups` groups of consecutive experts; a group
    scores the sum of its two highest `scores` (a group of one, its one
    score); the `top_groups` best groups (lower index first among ties)
    are eligible, and the k best eligible experts by `scores` (lower index
    first among ties) are chosen. Returns `(group_scores [T, G], eligible
    [T, E] bool, order [T, k], chosen probs [T, k])`."""
    tokens, num_experts = scores.shape
    size = num_experts // groups
    group_scores = np.zeros((tokens, groups), scores.dtype)
    eligible = np.zeros((tokens, num_experts), bool)
    order = np.zeros((tokens, k), "int64")
    for t in range(tokens):
        for g in range(groups):
            members = sorted(scores[t, g * size : (g + 1) * size])[::-1]
            group_scores[t, g] = sum(members[:2], scores.dtype.type(0))
        best = sorted(range(groups), key=lambda g: (-group_scores[t, g], g))
        for g in best[:top_groups]:
            eligible[t, g * size : (g + 1) * size] = True
        candidates = [e for e in range(num_experts) if eligible[t, e]]
        order[t] = sorted(candidates, key=lambda e: (-scores[t, e], e))[:k]
    rows = np.arange(tokens)[:, None]
    return group_scores, eligible, order, probs[rows, order]


def sequence_balance_loss(distribution, order, num_experts, length, valid):
    """DeepSeek-V3's sequence-wise balance loss, one sequence at a time:
    `sum_i f_i P_i`, `f_i = E / (k T) * count_i` over the T unmasked
    tokens of the sequence, `P_i` their mean `distribution`; the mean over
    sequences with a token (0 if none has one)."""
    k = order.shape[1]
    per_sequence = []
    for start in range(0, len(order), length):
        rows = [t for t in range(start, start + length) if valid[t]]
        if not rows:
            continue
        count = np.zeros(num_experts)
        for t in rows:
            for e in order[t]:
                count[e] += 1
        f = num_experts / (k * len(rows)) * count
        p = distribution[rows].mean(0)
        per_sequence.append((f * p).sum())
    return float(np.mean(per_sequence)) if per_sequence else 0.0
