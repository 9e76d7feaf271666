"""Expert-choice routing: the experts choose their tokens."""

import keras
from keras import ops

from moe_keras.gates.learned import SoftmaxGate


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertChoiceGate(SoftmaxGate):
    """Expert-choice routing (Zhou et al. 2022).

    From "Mixture-of-Experts with Expert Choice Routing". Instead of each
    token picking k experts, each expert picks the `C` tokens that score it
    highest, `C = ceil(capacity_factor * tokens / E)` (the `MoE` layer's
    `capacity_factor`, on average how many experts each token gets), and
    weights each by its softmax probability. Load is balanced by
    construction, so no load-balancing loss is added (the router z-loss
    still is); a token chosen by no expert gets zero output (the residual
    carries it). Use with `top_k=None` and a `capacity_factor`.

    Args:
        num_experts: int or None, the number of experts. Defaults to
            `None`, which lets the owning `MoE` fill it in.
        **kwargs: the other arguments of `Gate` that shape the router:
            `use_bias`, `kernel_initializer`, `bias_initializer`,
            `kernel_regularizer`, `bias_regularizer`, `jitter`, `seed`,
            `hidden_units`, `hidden_activation`, the router input transform
            (`input_norm`, `input_norm_epsilon`, `input_multiplier`,
            `use_input_scale`), and base layer keyword arguments such as
            `name`. (`normalize_top_k`,
            `bias_update_rate` and `dropout` act on a token's selection of
            experts, which this gate does not make; so do `expert_groups`,
            `top_groups` and `routed_scaling_factor`, which must keep
            their defaults, a `ValueError` otherwise.)

    Input shape:
        `(..., features)`.

    Output shape:
        `(..., num_experts)`, the softmax probabilities; with
        `routing=True`, the routing dict of `Gate` (the `MoE` layer then
        lets the experts choose with `choose`).

    Example:

    >>> layer = MoE(4, 8, gate=ExpertChoiceGate(), capacity_factor=2.0)
    >>> tuple(layer(np.ones((6, 5), "float32")).shape)
    (6, 8)
    """

    expert_choice = True

    def choose(self, probs, capacity, mask=None):
        """`(token_indices, weights)`, both `[E, C]`: the C tokens each
        expert takes and their gate probabilities for it."""
        scores = ops.transpose(probs)  # [E, T]
        if mask is not None:
            # Padding ranks below every real token (probabilities are >= 0).
            scores = ops.where(ops.cast(mask, "bool")[None, :], scores, -1.0)
        weights, tokens = ops.top_k(scores, capacity)
        weights = ops.maximum(weights, 0.0)
        return ops.cast(tokens, "int32"), weights
