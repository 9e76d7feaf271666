"""Auxiliary router losses, as plain functions of the router's outputs.

Each takes an optional `mask` of shape `[tokens]` (1 for a real position,
0 for padding) so that padding never pulls the router anywhere.
"""

from keras import ops


def _masked_mean(values, mask, axis=0):
    """Mean of `values` over `axis`, counting only positions where mask=1.

    Over no positions at all (an empty batch, or all masked) it is 0, not
    the 0 / 0 of a plain mean.
    """
    if mask is None:
        count = ops.cast(ops.shape(values)[axis], values.dtype)
        return ops.sum(values, axis=axis) / ops.maximum(count, 1.0)
    mask = ops.cast(mask, values.dtype)
    while len(mask.shape) < len(values.shape):
        mask = ops.expand_dims(mask, -1)
    total = ops.sum(values * mask, axis=axis)
    count = ops.maximum(ops.sum(mask, axis=axis), 1.0)
    return total / count


def assignment_fraction(expert_indices, num_experts, mask=None):
    """Fraction of routing assignments that went to each expert, `[E]`.

    Each of a token's k choices counts as one assignment; masked tokens
    count for nothing. Sums to 1 (0 if every token is masked).

    Args:
        expert_indices: `[tokens, k]` int, the experts each token chose.
        num_experts: int, E.
        mask: optional `[tokens]`, 1 (or `True`) for a real token and 0 for
            padding. Defaults to `None`: every token counts.

    Returns:
        A float32 `[E]` tensor.

    Example:

    >>> indices = np.array([[0], [0], [1], [2]])
    >>> fraction = moe_keras.losses.assignment_fraction(indices, 4)
    >>> keras.ops.convert_to_numpy(fraction).tolist()
    [0.5, 0.25, 0.25, 0.0]
    """
    choices = ops.one_hot(expert_indices, num_experts, dtype="float32")
    return _masked_mean(ops.mean(choices, axis=1), mask)


def load_balance_loss(
    router_probs, expert_indices, num_experts, mask=None, total=None
):
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
            Defaults to `None`.
        total: optional function summing a vector over more batches than
            this one (the replicas of a `tf.distribute` step): `f` then
            counts all of them, and this batch's `P` is weighted by its
            share of their tokens, so that the mean of the batches' losses
            is the loss of all their tokens together. Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> probs = np.full((4, 4), 0.25, "float32")  # an undecided router
    >>> indices = np.array([[0], [1], [2], [3]])  # one token per expert
    >>> loss = moe_keras.losses.load_balance_loss(probs, indices, 4)
    >>> round(float(loss), 3)
    1.0
    >>> indices = np.zeros((4, 1), "int32")  # all to expert 0
    >>> probs = np.array([[0.7, 0.1, 0.1, 0.1]] * 4, "float32")
    >>> round(float(moe_keras.losses.load_balance_loss(probs, indices, 4)), 3)
    2.8
    """
    router_probs = ops.cast(router_probs, "float32")
    mean_prob = _masked_mean(router_probs, mask)  # [experts]
    choices = ops.mean(
        ops.one_hot(expert_indices, num_experts, dtype="float32"), axis=1
    )
    if mask is None:
        count = ops.cast(ops.shape(choices)[0], "float32")
    else:
        mask = ops.cast(mask, "float32")
        choices = choices * mask[:, None]
        count = ops.sum(mask)
    # Per-expert assignments, tokens and batches (of this batch alone, or
    # summed over the batches `total` adds up).
    counts = ops.concatenate(
        [ops.sum(choices, axis=0), ops.stack([count, 1.0])]
    )
    if total is not None:
        counts = total(counts)
    counts = ops.stop_gradient(counts)
    tokens = ops.maximum(counts[num_experts], 1.0)
    fraction = counts[:num_experts] / tokens
    # 1 for a batch on its own (0 when it has no tokens, and no P either).
    share = count * counts[num_experts + 1] / tokens
    return float(num_experts) * share * ops.sum(fraction * mean_prob)


def sequence_balance_loss(
    router_probs, expert_indices, num_experts, sequence_length, mask=None
):
    """DeepSeek-V3's complementary sequence-wise balance loss.

    For each sequence, `sum_i f_i * P_i` with `f_i = E / (k * T) * count_i`,
    `count_i` how many of the sequence's T (unmasked) tokens chose expert
    `i` among their k, and `P_i` the mean over those tokens of the router's
    distribution over experts; then the mean over the sequences. It is 1
    for a sequence whose load and probabilities are uniform and grows as
    one sequence's tokens crowd onto few experts, which a batch-wide loss
    does not see when other sequences balance them. Only `P` carries
    gradient, `f` is a count. A sequence with no unmasked token adds 0 and
    is left out of the mean. DeepSeek-AI, "DeepSeek-V3 Technical Report"
    (2024), eq. 17-20.

    Args:
        router_probs: `[tokens, experts]` float scores that sum to 1 over
            the experts (sigmoid scores divided by their sum), with
            `tokens = sequences * sequence_length`, one sequence after
            another.
        expert_indices: `[tokens, k]` int, the experts each token chose.
        num_experts: int, E.
        sequence_length: int (or scalar tensor), the positions of each
            sequence.
        mask: optional `[tokens]`; masked tokens count in neither term, nor
            in T. Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> probs = np.array([[0.5, 0.5]] * 2 + [[0.9, 0.1]] * 2, "float32")
    >>> indices = np.array([[0], [1], [0], [0]])  # 2 sequences of 2 tokens
    >>> loss = moe_keras.losses.sequence_balance_loss(probs, indices, 2, 2)
    >>> round(float(loss), 3)  # the mean of 1.0 (balanced) and 1.8
    1.4
    >>> mask = np.array([1, 1, 0, 0])  # the second sequence is padding
    >>> loss = moe_keras.losses.sequence_balance_loss(
    ...     probs, indices, 2, 2, mask=mask
    ... )
    >>> round(float(loss), 3)
    1.0
    """
    if isinstance(sequence_length, int) and sequence_length == 0:
        return ops.convert_to_tensor(0.0, "float32")  # no tokens at all
    router_probs = ops.cast(router_probs, "float32")
    expert_indices = ops.convert_to_tensor(expert_indices)
    top_k = expert_indices.shape[-1]
    choices = ops.sum(
        ops.one_hot(expert_indices, num_experts, dtype="float32"), axis=1
    )  # [tokens, E]: how many of a token's k choices went to each expert
    present = ops.ones_like(router_probs[:, 0])
    if mask is not None:
        valid = ops.cast(mask, "bool")
        present = ops.cast(valid, "float32")
        # A select, not a product: a masked token's scores may be NaN.
        router_probs = ops.where(valid[:, None], router_probs, 0.0)
        choices = choices * present[:, None]

    def per_sequence(values):  # [tokens, ...] -> [sequences, ...]
        return ops.reshape(
            values, (-1, sequence_length) + tuple(values.shape[1:])
        )

    tokens = ops.sum(per_sequence(present), axis=1)  # [sequences]
    count = ops.maximum(tokens, 1.0)[:, None]
    fraction = ops.sum(per_sequence(choices), axis=1) / count  # [S, E]
    fraction = ops.stop_gradient(fraction * (num_experts / top_k))
    mean_prob = ops.sum(per_sequence(router_probs), axis=1) / count
    # 0 for a sequence with no token (its counts are all 0).
    losses = ops.sum(fraction * mean_prob, axis=-1)  # [sequences]
    sequences = ops.sum(ops.cast(tokens > 0, "float32"))
    return ops.sum(losses) / ops.maximum(sequences, 1.0)


def router_z_loss(router_logits, mask=None):
    """ST-MoE router z-loss.

    `loss = mean_t (logsumexp_i z_ti)^2`: it keeps router logits small, which
    keeps the float32 softmax well conditioned and training stable.
    Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert
    Models" (2022), eq. 5.

    Args:
        router_logits: `[tokens, experts]` float logits.
        mask: optional `[tokens]`; masked tokens are left out of the mean.
            Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> logits = np.zeros((2, 4), "float32")  # logsumexp = log(4)
    >>> round(float(moe_keras.losses.router_z_loss(logits)), 3)
    1.922
    """
    router_logits = ops.cast(router_logits, "float32")
    log_z = ops.logsumexp(router_logits, axis=-1)
    return _masked_mean(ops.square(log_z), mask)


def cv_squared(values):
    """Squared coefficient of variation, `var(v) / mean(v)^2`, of `[E]`.

    0 when every value is the same; the balancing losses of Shazeer et al.
    (2017) apply it to per-expert totals.

    Args:
        values: `[E]` floats.

    Returns:
        A float32 scalar.

    Example:

    >>> round(float(moe_keras.losses.cv_squared(np.array([1.0, 1.0, 1.0]))), 3)
    0.0
    >>> round(float(moe_keras.losses.cv_squared(np.array([2.0, 0.0]))), 3)
    1.0
    """
    values = ops.cast(values, "float32")
    mean = ops.mean(values)
    return ops.mean(ops.square(values - mean)) / (ops.square(mean) + 1e-10)


def importance_loss(gates, mask=None):
    """Shazeer et al. (2017) importance loss, `CV(sum_t g_t)^2`.

    `Importance_i` is the total gate weight expert i receives over the
    batch; penalising its squared coefficient of variation keeps the router
    from favouring a few experts. "Outrageously Large Neural Networks",
    eq. 6.

    Args:
        gates: `[tokens, experts]` combine weights (zero off the top-k).
        mask: optional `[tokens]`; masked tokens' weights are left out.
            Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> gates = np.array([[1.0, 0.0], [1.0, 0.0]], "float32")
    >>> round(float(moe_keras.losses.importance_loss(gates)), 3)
    1.0
    >>> round(float(moe_keras.losses.importance_loss(np.eye(2))), 3)
    0.0
    """
    gates = ops.cast(gates, "float32")
    if mask is not None:
        gates = gates * ops.cast(mask, "float32")[:, None]
    return cv_squared(ops.sum(gates, axis=0))


def noisy_load_loss(clean_logits, noisy_logits, noise_std, top_k, mask=None):
    """Shazeer et al. (2017) smooth load loss, `CV(sum_t P(t, i))^2`.

    `P(t, i) = Phi((clean_ti - threshold_ti) / noise_std_ti)` is the
    probability that expert i would still be among token t's top-k under
    a fresh draw of the noise on its logit alone, where `threshold_ti` is
    the k-th largest noisy logit among the *other* experts. The sum over
    tokens is a differentiable estimate of each expert's load.
    "Outrageously Large Neural Networks", appendix A (eq. 8-10).

    Args:
        clean_logits: `[tokens, experts]`, the router's logits.
        noisy_logits: `[tokens, experts]`, the logits with noise added, from
            which the top-k was taken.
        noise_std: `[tokens, experts]`, the standard deviation of the noise.
        top_k: int k, smaller than the number of experts.
        mask: optional `[tokens]`; masked tokens count for no expert.
            Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> logits = np.zeros((2, 4), "float32")  # every expert equally likely
    >>> std = np.ones((2, 4), "float32")
    >>> loss = moe_keras.losses.noisy_load_loss(logits, logits, std, top_k=1)
    >>> round(float(loss), 3)
    0.0
    """
    clean_logits, noisy_logits, noise_std = (
        ops.convert_to_tensor(v)
        for v in (clean_logits, noisy_logits, noise_std)
    )
    top_values, _ = ops.top_k(noisy_logits, top_k + 1)
    kth, next_after = top_values[:, top_k - 1 : top_k], top_values[:, top_k:]
    # For an expert in the top-k the bar to stay is the (k+1)-th value;
    # for one outside it, the k-th.
    in_top_k = ops.greater_equal(noisy_logits, kth)
    threshold = ops.where(in_top_k, next_after, kth)
    z = (clean_logits - threshold) / noise_std
    prob = 0.5 * (1.0 + ops.erf(z / 1.4142135623730951))
    if mask is not None:
        prob = prob * ops.cast(mask, prob.dtype)[:, None]
    return cv_squared(ops.sum(prob, axis=0))


def router_entropy(router_probs, mask=None):
    """Mean entropy (nats) of the router's distribution over experts.

    High means undecided routing, `log E` at most. The router's scores are
    normalised to sum to 1 first, so sigmoid scores are read as a
    distribution too.

    Args:
        router_probs: `[tokens, experts]` non-negative scores.
        mask: optional `[tokens]`; masked tokens are left out of the mean.
            Defaults to `None`.

    Returns:
        A float32 scalar.

    Example:

    >>> probs = np.full((2, 4), 0.25, "float32")
    >>> round(float(moe_keras.losses.router_entropy(probs)), 3)  # log(4)
    1.386
    """
    p = ops.cast(router_probs, "float32")
    p = p / ops.maximum(ops.sum(p, axis=-1, keepdims=True), 1e-9)
    entropy = -ops.sum(p * ops.log(ops.maximum(p, 1e-9)), axis=-1)
    return _masked_mean(entropy, mask)
