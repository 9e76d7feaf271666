"""Voting fusion: the `MoE` layer's `combine="vote"` inference mode.

Each expert of a classifier MoE votes for its argmax class; the layer
outputs the share of the votes each class got, counted with the gate's
weights, so `argmax` of the output is the (weighted) majority's class.
A vote counts with weight `max(g, 0)`: a gate function that can go
negative (tanh) never takes a vote away. Where no voting expert has a
positive weight (a ReLU gate at 0), each of them counts once, a plain
majority. Ties go to the lower class index, as `argmax` breaks them.
"""

from keras import ops

from moe_keras import _validation
from moe_keras import dispatch as dispatch_lib

COMBINE_MODES = ("weighted", "vote")


def check_combine(combine):
    """The `combine` argument, validated."""
    if not isinstance(combine, str):
        raise TypeError(
            f"`combine` must be one of {list(COMBINE_MODES)}; received "
            f"combine={combine!r}."
        )
    return _validation.one_of(combine, "combine", COMBINE_MODES)


def check_layer(layer):
    """Raises where `layer` cannot vote, whatever its inputs."""
    reasons = []
    if layer.gate.expert_choice:
        reasons.append("its experts choose tokens (ExpertChoiceGate)")
    if layer.shared_experts is not None:
        reasons.append("it has shared experts, which do not vote")
    if getattr(layer.gate, "per_feature", False):
        reasons.append(
            "its gate (FeatureGate) gives per-feature weights, not one "
            "weight per expert"
        )
    if layer.units is not None and layer.units < 2:
        reasons.append(
            f"its experts output units={layer.units} value: a vote needs "
            "classifier experts, one score per class (regression "
            "experts cannot vote)"
        )
    if reasons:
        raise ValueError(
            f"MoE '{layer.name}' cannot combine its experts by vote: "
            + "; ".join(reasons)
            + ". Use combine='weighted'."
        )


def vote(layer, x, routing, training):
    """`[T, units]`: the share of votes per class at each position.

    Args:
        layer: the `MoE` layer.
        x: `[T, features]` tokens.
        routing: the gate's routing dict for `x`.
        training: the call's training flag; voting applies at inference.
    """
    check_layer(layer)
    if training:
        raise ValueError(
            f"MoE '{layer.name}' has combine='vote', which applies at "
            "inference only: an argmax vote has no gradient. Train the "
            "layer with combine='weighted' and set `layer.combine = 'vote'` "
            "before predicting (or rebuild it with combine='vote' from its "
            "config and weights)."
        )
    weights, indices = routing["weights"], routing.get("indices")
    weights = ops.maximum(ops.cast(weights, "float32"), 0.0)
    voters = ops.ones_like(weights)
    if indices is not None:
        # [T, k] -> [T, E]: the experts off the top-k do not vote.
        weights = dispatch_lib.scatter_weights(
            weights, indices, layer.num_experts
        )
        voters = dispatch_lib.scatter_weights(
            voters, indices, layer.num_experts
        )
    outputs = layer.experts(x)  # [T, E, classes]
    classes = ops.shape(outputs)[-1]
    ballots = ops.one_hot(
        ops.argmax(outputs, axis=-1), classes, dtype="float32"
    )  # [T, E, classes]
    tally = ops.einsum("te,tec->tc", weights, ballots)
    total = ops.sum(tally, axis=-1, keepdims=True)
    # No positive weight at a position: every voter counts once there.
    majority = ops.einsum("te,tec->tc", voters, ballots)
    tally = ops.where(total > 0, tally, majority)
    return tally / ops.maximum(ops.sum(tally, axis=-1, keepdims=True), 1e-30)
