"""`sparsify`: keras-hub MoE models on this package's sparse dispatch."""

from moe_keras.hub import _common

# Why each keras-hub MoE block that `sparsify` does not convert is left out
# (block class name -> reason).
_NOT_COVERED = {
    "GptOssSparseMoeBlock": (
        "its experts have biases and a clamped SwiGLU "
        "(`(clip(up) + 1) * g * sigmoid(1.702 g)`, g = clip(gate)) that "
        "`moe_keras.DenseExperts` does not compute, and its router has a "
        "bias and takes the softmax over the top-k logits only"
    ),
    "Gemma4MoEBlock": (
        "its router (`Gemma4Router`) is a separate layer of the decoder "
        "that RMS-normalises and scales its input, and the experts apply a "
        "learned per-expert output scale, neither of which "
        "`moe_keras.MoE` expresses"
    ),
    "Qwen3_5MoeSparseMoeBlock": (
        "its routing matches Qwen-MoE's, but Qwen3.5-MoE's hybrid "
        "(Gated DeltaNet and attention, multimodal) backbone has no "
        "verified mapping here yet"
    ),
}


def _find_blocks(backbone, class_names):
    """`[(path, class name)]` of sublayers of `backbone` of those classes."""
    found = []
    for layer in backbone._flatten_layers(include_self=False):
        name = type(layer).__name__
        if name in class_names:
            found.append((layer.path, name))
    return found


def sparsify(model, *, capacity_factor=None):
    """Converts a keras-hub MoE model to run its experts sparsely.

    keras-hub's MoE blocks compute every expert on every token and mask
    the result, `num_experts / top_k` times the expert work needed. This
    returns a copy of `model` in which every such block is replaced by one
    that routes each token to its top-k experts through `moe_keras.MoE`'s
    sparse dispatch, with the same weights and the same routing: Mixtral's
    softmax then renormalised top-k, Qwen's `norm_top_k_prob`, Qwen-MoE's
    shared expert and its sigmoid gate, and the family's load-balancing
    auxiliary loss with its coefficient. With `capacity_factor=None` the
    dispatch is dropless, so outputs, losses and gradients equal the
    original's up to float rounding.

    Covered: `MixtralBackbone`, `QwenMoeBackbone`, `Qwen3MoeBackbone` and
    the task models built on them (`MixtralCausalLM`, ...). The result is
    a new model (the input is left unchanged; both are in memory while it
    is built) whose backbone is `SparseMixtralBackbone` etc., a registered
    subclass that records the conversion in its config, so
    `keras.saving.load_model(path)` returns it converted, in a new process
    too once `moe_keras` is imported (no `custom_objects` needed). A task
    model comes back uncompiled. keras-hub is
    imported when this runs (an `ImportError` without it).

    Args:
        model: a keras-hub `Backbone` or `Task` (e.g. `MixtralCausalLM`).
        capacity_factor: `None` (default) for dropless dispatch, or a
            float > 0: each expert then takes at most
            `ceil(capacity_factor * tokens * k / E)` tokens while training
            and the overflow is dropped (inference stays dropless).

    Returns:
        The converted model, of the same task class as `model`.

    Raises:
        TypeError: `model` is not a keras-hub backbone or task model, or
            `capacity_factor` is not a number.
        ValueError: the model has no keras-hub MoE block, has one this
            function does not cover (the error names it and says why), or
            was already converted; or `capacity_factor` is not > 0.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=8, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=4, intermediate_dim=4,
    ...     num_experts=4, top_k=2,
    ... )
    >>> sparse = sparsify(backbone)
    >>> type(sparse).__name__
    'SparseMixtralBackbone'
    >>> sparse.count_params() == backbone.count_params()  # the same weights
    True
    """
    _common.import_keras_hub("sparsify")
    from moe_keras.hub import _sparse_families as families

    capacity_factor = _common.check_capacity_factor(capacity_factor)
    backbone, task = _common.split_model(model)
    if isinstance(backbone, families._SparseBackboneMixin):
        raise ValueError(
            f"`model` ('{model.name}') is already sparse: its backbone is a "
            f"{type(backbone).__name__}."
        )
    from moe_keras.hub import _upcycle_families

    if isinstance(backbone, _upcycle_families._UpcycledBackboneMixin):
        raise ValueError(
            f"`model` ('{model.name}') was upcycled by `moe_keras.upcycle`: "
            f"its FFNs are `moe_keras.MoE` layers already (a "
            f"{type(backbone).__name__})."
        )
    sparse_class = _common.family_class(
        backbone, families.SPARSE_BACKBONES, "sparsify"
    )
    if sparse_class is None:
        _raise_not_covered(backbone)
    new_backbone = sparse_class.from_config(
        {**backbone.get_config(), "capacity_factor": capacity_factor}
    )
    converted = new_backbone.sparse_blocks()
    if not converted:
        raise ValueError(
            f"`model` ('{model.name}', a {type(backbone).__name__}) has no "
            f"sparse MoE block ({sparse_class.hub_block.__name__}) to "
            "convert: every decoder layer is dense."
        )
    old_blocks = [
        getattr(decoder, sparse_class.block_attribute)
        for decoder in backbone.transformer_layers
        if type(getattr(decoder, sparse_class.block_attribute, None))
        is sparse_class.hub_block
    ]
    _common.copy_weights_except(
        backbone,
        new_backbone,
        _common.variable_ids(old_blocks),
        _common.variable_ids([block for _, block in converted]),
    )
    for old, (_, new) in zip(old_blocks, converted):
        new.load_hub_weights(old)
    if task is None:
        return new_backbone
    return _common.rebuild_task(task, new_backbone)


def _raise_not_covered(backbone):
    """The `ValueError` for a backbone `sparsify` has no mapping for."""
    found = _find_blocks(backbone, _NOT_COVERED)
    if found:
        path, name = found[0]
        raise ValueError(
            f"`model` has a keras-hub {name} (at '{path}'), which "
            f"`moe_keras.sparsify` does not cover: {_NOT_COVERED[name]}. "
            "Covered: Mixtral, Qwen-MoE and Qwen3-MoE."
        )
    raise ValueError(
        f"`model` (a {type(backbone).__name__}) has no keras-hub sparse MoE "
        "block that `moe_keras.sparsify` converts (it covers "
        "MixtralSparseMoeBlock, QwenSparseMoeBlock and Qwen3SparseMoeBlock, "
        "in MixtralBackbone, QwenMoeBackbone and Qwen3MoeBackbone). To turn "
        "a dense model's FFNs into MoE layers, use `moe_keras.upcycle`."
    )
