"""`sparsify`: keras-hub MoE models on this package's sparse dispatch."""

from moe_keras.hub import _common


def sparsify(model, *, capacity_factor=None):
    """Converts a keras-hub MoE model to run its experts sparsely.

    keras-hub's MoE blocks compute every expert on every token and mask
    the result, `num_experts / top_k` times the expert work needed. This
    returns a copy of `model` in which every such block is replaced by one
    that routes each token to its top-k experts through `moe_keras.MoE`'s
    sparse dispatch, with the same weights and the same routing: Mixtral's
    softmax then renormalised top-k, Qwen's `norm_top_k_prob`, the shared
    expert and its sigmoid gate of Qwen-MoE and Qwen3.5-MoE, GPT-OSS's
    biased router with the softmax over the top-k logits and its clamped
    SwiGLU experts with biases, Gemma 4's router input transform and
    per-expert output scale, and the family's load-balancing auxiliary
    loss with its coefficient (GPT-OSS and Gemma 4 have none). With
    `capacity_factor=None` the dispatch is dropless, so outputs, losses
    and gradients equal the original's up to float rounding.

    Covered: all six keras-hub MoE families, `MixtralBackbone`,
    `QwenMoeBackbone`, `Qwen3MoeBackbone`, `GptOssBackbone`,
    `Gemma4Backbone` (with `enable_moe_block=True`) and
    `Qwen3_5MoeBackbone`, and the task models built on them
    (`MixtralCausalLM`, `GptOssCausalLM`, ...). The result is
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
        ValueError: the model has no keras-hub MoE block or was already
            converted; or `capacity_factor` is not > 0.

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
        backbone, sparse_backbones(), "sparsify"
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
    old_layers = sparse_class.hub_layers(backbone)
    new_layers = new_backbone.converted_layers()
    _common.copy_weights_except(
        backbone,
        new_backbone,
        _common.variable_ids([layer for old in old_layers for layer in old]),
        _common.variable_ids([layer for new in new_layers for layer in new]),
    )
    for old, new in zip(old_layers, new_layers):
        new[0].load_hub_weights(*old)
    if task is None:
        return new_backbone
    return _common.rebuild_task(task, new_backbone)


def sparse_backbones():
    """`{keras-hub backbone class: its sparse subclass}` of every family."""
    from moe_keras.hub import _sparse_families
    from moe_keras.hub import _sparse_gemma4
    from moe_keras.hub import _sparse_gpt_oss
    from moe_keras.hub import _sparse_qwen3_5_moe

    return {
        **_sparse_families.SPARSE_BACKBONES,
        **_sparse_gpt_oss.SPARSE_BACKBONES,
        **_sparse_gemma4.SPARSE_BACKBONES,
        **_sparse_qwen3_5_moe.SPARSE_BACKBONES,
    }


def _raise_not_covered(backbone):
    """The `ValueError` for a backbone `sparsify` has no mapping for."""
    raise ValueError(
        f"`model` (a {type(backbone).__name__}) is not a keras-hub MoE model "
        "that `moe_keras.sparsify` converts: it covers Mixtral, Qwen-MoE, "
        "Qwen3-MoE, GPT-OSS, Gemma 4 and Qwen3.5-MoE. To turn a dense "
        "model's FFNs into MoE layers, use `moe_keras.upcycle`."
    )
