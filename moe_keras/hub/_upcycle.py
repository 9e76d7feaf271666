"""`upcycle`: dense FFNs into MoE layers of copied experts (sparse
upcycling, Komatsuzaki et al. 2022)."""

import math
import numbers
import sys

import keras
import numpy as np

from moe_keras.hub import _common
from moe_keras.hub._gate import TopKSoftmaxGate
from moe_keras.moe import MoE


def upcycle(
    model,
    *,
    num_experts,
    top_k=2,
    noise=0.0,
    seed=None,
    capacity_factor=None,
    load_balance_weight=0.01,
    z_loss_weight=0.001,
):
    """Sparse upcycling: dense FFNs become MoE layers of copied experts.

    Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts
    from Dense Checkpoints" (2022): every expert starts as a copy of the
    dense FFN and a new router is added. The router's k selected weights
    are renormalised to sum to 1 (`TopKSoftmaxGate`), so with identical
    experts the MoE computes exactly the dense FFN and the upcycled model's
    outputs at step 0 equal the dense model's (with `noise=0`); training
    then lets the experts diverge.

    `model` is either

    - a keras-hub dense decoder-only backbone or task (`LlamaCausalLM`,
      ...): returns a new model (the input is left unchanged) in which
      every decoder layer's FFN is a `moe_keras.MoE` whose experts have
      the FFN's form (gated or not, its activation, its biases); its
      backbone is a registered subclass (`UpcycledLlamaBackbone`, ...)
      that saves and loads as such with a plain `keras.saving.load_model`
      once `moe_keras` is imported. A task model comes back uncompiled.
      Covered backbones: SwiGLU `LlamaBackbone`, `Llama3Backbone`,
      `MistralBackbone`, `QwenBackbone` (`Qwen2Backbone`),
      `Qwen3Backbone`, `Qwen3_5Backbone`, `Phi3Backbone` and
      `SmolLM3Backbone`; GeGLU `GemmaBackbone` and `Gemma3Backbone`; and
      the two-`Dense` biased MLPs of `GPT2Backbone`, `OPTBackbone`,
      `GPTNeoXBackbone` and `FalconBackbone`. Not covered: Bloom (the
      GELU between its projections cannot be swapped out exactly),
      Gemma 4 (its decoder reads the FFN kernels directly), Gemma 3n
      (activation sparsity), RWKV-7, the MoE families (see `sparsify`),
      vision-language and encoder-decoder models.
    - a built Keras layer of your own mapping `(..., d)` to `(..., u)`:
      returns a built `MoE` layer to use in its place. A `Dense`, or a
      `Sequential` of two `Dense` layers (hidden activation, linear
      output), becomes stacked `DenseExperts` (sparse, dropless with
      `capacity_factor=None`); any other layer becomes a list of
      `num_experts` clones (`ExpertList`), run with the dense dispatch
      when `capacity_factor` is None (a list of experts has no dropless
      sparse form) and the sparse one otherwise.

    Args:
        model: a keras-hub dense backbone or task, or a built Keras layer.
        num_experts: int >= 1, experts per MoE layer. Required.
        top_k: int in `[1, num_experts]`, experts per token. Defaults to 2.
            At 1, the single weight is the constant 1 and the router then
            learns from the auxiliary loss only.
        noise: float >= 0, relative noise on the copies: each expert's
            weight is `w + noise * std(w) * N(0, 1)`. Defaults to 0 (exact
            copies; outputs at step 0 equal the dense model's).
        seed: int or None, seed of the noise and the routers' initial
            weights. Defaults to `None`.
        capacity_factor: `None` (dropless, default) or a float > 0.
        load_balance_weight: float >= 0, weight of the Switch
            load-balancing loss. Defaults to 0.01.
        z_loss_weight: float >= 0, weight of the router z-loss. Defaults
            to 0.001.

    Returns:
        The upcycled model, or an `MoE` layer for a layer.

    Raises:
        TypeError: `model` is not a Keras layer, or an argument is not of
            its type (the message names it).
        ValueError: an argument out of its range (the message names it), a
            keras-hub model this function does not cover or has already
            upcycled, or a layer that is not built.

    Example:

    >>> ffn = keras.Sequential(
    ...     [keras.Input((5,)), keras.layers.Dense(8, "relu"),
    ...      keras.layers.Dense(5)]
    ... )
    >>> moe = upcycle(ffn, num_experts=4, top_k=2)
    >>> x = np.random.rand(6, 5).astype("float32")
    >>> same = keras.ops.all(keras.ops.abs(moe(x) - ffn(x)) < 1e-5)
    >>> bool(keras.ops.convert_to_numpy(same))  # identical experts
    True
    >>> moe.experts.num_experts, moe.top_k
    (4, 2)
    """
    noise = _check_noise(noise)
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
    ):
        raise TypeError(
            f"`seed` must be an int or None; received seed={seed!r}."
        )
    seed = None if seed is None else int(seed)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a keras-hub backbone or task model, or a Keras "
            f"layer; received model={model!r} (of type "
            f"{type(model).__name__})."
        )
    options = _common.check_upcycle_options(
        num_experts, top_k, capacity_factor, load_balance_weight, z_loss_weight
    )
    if _is_keras_hub_model(model):
        return _upcycle_keras_hub(model, options, noise, seed)
    return _upcycle_layer(model, options, noise, seed)


def _check_noise(noise):
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise TypeError(
            f"`noise` must be a float >= 0; received noise={noise!r}."
        )
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(
            f"`noise` must be a finite float >= 0; received noise={noise!r}."
        )
    return float(noise)


def _is_keras_hub_model(model):
    """Whether `model` is a keras-hub backbone or task (keras-hub cannot
    have made it unless it is imported, so this never imports it)."""
    if "keras_hub" not in sys.modules:
        return False
    from keras_hub.models import Backbone
    from keras_hub.models import Task

    return isinstance(model, (Backbone, Task))


def _copies(value, num_experts, noise, rng):
    """`[E, ...]`: `num_experts` copies of `value`, each with its own noise."""
    value = np.asarray(value)
    stacked = np.repeat(value[None], num_experts, axis=0)
    if noise > 0:
        scale = noise * float(np.std(value))
        stacked = stacked + scale * rng.standard_normal(stacked.shape)
    return stacked


def _init_router(moe, seed):
    if seed is None:
        return
    kernel = moe.gate.kernel
    initializer = keras.initializers.GlorotUniform(seed=seed)
    _common.assign(
        kernel, keras.ops.convert_to_numpy(initializer(tuple(kernel.shape)))
    )


def _upcycle_keras_hub(model, options, noise, seed):
    _common.import_keras_hub("upcycle")
    from moe_keras.hub import _upcycle_families as families

    backbone, task = _common.split_model(model)
    if isinstance(backbone, families._UpcycledBackboneMixin):
        raise ValueError(
            f"`model` ('{model.name}') is already upcycled: its backbone is "
            f"a {type(backbone).__name__}."
        )
    upcycled_class = _common.family_class(
        backbone, families.UPCYCLED_BACKBONES, "upcycle"
    )
    if upcycled_class is None:
        covered = ", ".join(c.__name__ for c in families.UPCYCLED_BACKBONES)
        raise ValueError(
            f"`model` has a {type(backbone).__name__}, which "
            f"`moe_keras.upcycle` does not cover (it covers {covered}). "
            "To upcycle an FFN layer of your own, pass that layer."
        )
    new_backbone = upcycled_class.from_config(
        {**backbone.get_config(), "upcycle": options}
    )
    form = upcycled_class.ffn_form
    ffns = [
        form.dense_layers(decoder) for decoder in backbone.transformer_layers
    ]
    moes = new_backbone.moe_layers()
    _common.copy_weights_except(
        backbone,
        new_backbone,
        _common.variable_ids([layer for ffn in ffns for layer in ffn]),
        _common.variable_ids(moes),
    )
    rng = np.random.default_rng(seed)
    for i, (ffn, moe) in enumerate(zip(ffns, moes)):
        # Drawn in this order: kernel_in, bias_in, kernel_out, bias_out.
        for name, value in form.expert_weights(ffn).items():
            if value is not None:
                _common.assign(
                    getattr(moe.experts, name),
                    _copies(value, moe.num_experts, noise, rng),
                )
        _init_router(moe, None if seed is None else seed + i)
    if task is None:
        return new_backbone
    return _common.rebuild_task(task, new_backbone)


def _dense_layers(layer):
    """The `Dense` layers of a Dense or a two-Dense Sequential FFN that
    `DenseExperts` can hold, or None."""
    dense = keras.layers.Dense
    if type(layer) is dense:
        return [layer]
    if isinstance(layer, keras.Sequential):
        inner = [sub for sub in layer.layers]
        if (
            len(inner) == 2
            and all(type(sub) is dense for sub in inner)
            and inner[0].use_bias == inner[1].use_bias
            and inner[1].activation is keras.activations.linear
        ):
            return inner
    return None


def _upcycle_layer(layer, options, noise, seed):
    if not layer.built:
        raise ValueError(
            f"`model` (the layer '{layer.name}') must be built so that its "
            "weights can be copied: call it on an input or `build` it first."
        )
    num_experts = options["num_experts"]
    capacity_factor = options["capacity_factor"]
    rng = np.random.default_rng(seed)
    gate = TopKSoftmaxGate(normalize=True, name="gate")
    common = dict(
        num_experts=num_experts,
        top_k=options["top_k"],
        gate=gate,
        load_balance_weight=options["load_balance_weight"],
        z_loss_weight=options["z_loss_weight"],
        dtype=layer.dtype_policy,
        name=f"{layer.name}_moe",
    )
    denses = _dense_layers(layer)
    if denses is not None:
        first, last = denses[0], denses[-1]
        features = first.kernel.shape[0]
        moe = MoE(
            units=last.units,
            hidden_units=first.units if len(denses) == 2 else None,
            activation=keras.activations.serialize(first.activation),
            use_bias=first.use_bias,
            dispatch="auto",
            capacity_factor=capacity_factor,
            **common,
        )
        moe.build((None, features))
        experts = moe.experts
        numpy = keras.ops.convert_to_numpy
        if len(denses) == 1:
            pairs = [(experts.kernel, first.kernel), (experts.bias, first.bias)]
        else:
            pairs = [
                (experts.kernel_in, first.kernel),
                (experts.bias_in, first.bias),
                (experts.kernel_out, last.kernel),
                (experts.bias_out, last.bias),
            ]
        for target, source in pairs:
            if target is not None:
                _common.assign(
                    target, _copies(numpy(source), num_experts, noise, rng)
                )
    else:
        build_config = {"input_shape": _input_shape(layer)}
        clones = [_clone(layer, build_config) for _ in range(num_experts)]
        for clone in clones:
            clone.set_weights(
                [_copies(w, 1, noise, rng)[0] for w in layer.get_weights()]
            )
        moe = MoE(
            experts=clones,
            dispatch="dense" if capacity_factor is None else "sparse",
            capacity_factor=capacity_factor or 1.25,
            **common,
        )
        moe.build(tuple(build_config["input_shape"]))
    _init_router(moe, seed)
    return moe


def _input_shape(layer):
    """The shape `layer` was built for: a functional model's inputs, or
    what `build` received."""
    if (
        isinstance(layer, keras.Model)
        and len(getattr(layer, "inputs", None) or []) == 1
    ):
        return tuple(layer.inputs[0].shape)
    shape = (layer.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ValueError(
            f"Cannot tell the input shape of `model` (the layer "
            f"'{layer.name}'): build it with `layer.build(shape)`."
        )
    return tuple(shape)


def _clone(layer, build_config):
    if isinstance(layer, keras.Model):
        clone = keras.models.clone_model(layer)
    else:
        clone = type(layer).from_config(layer.get_config())
    if not clone.built:
        clone.build_from_config(build_config)
    return clone
