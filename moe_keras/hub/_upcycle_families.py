"""Upcycled keras-hub dense decoders: each FFN becomes a `moe_keras.MoE`.

Llama and Qwen3 decoders compute their SwiGLU FFN inline in `call`:

    g = gate_dense(x); g = activation(g); u = intermediate_dense(x)
    y = output_dense(u * g)

Upcycling swaps those three sublayers so that the same `call` computes the
MoE instead: `gate_dense` becomes the `MoE` layer, `activation` the
identity, `intermediate_dense` a layer of ones and `output_dense` the
identity, so `y = MoE(x) * 1`, exactly (in float32 and in a float16 or
bfloat16 policy alike: the cast to float32 and back loses nothing). The
decoder's attention, norms and caching are untouched, and its class is
not changed. The backbone subclasses redo the swap when they are built
and record it in their config, so a saved upcycled model loads back as
one.

This module imports keras-hub; `moe_keras.upcycle` imports it lazily.
"""

import keras
from keras import ops
from keras_hub.models import Llama3Backbone
from keras_hub.models import LlamaBackbone
from keras_hub.models import Qwen3Backbone

from moe_keras.hub import _common


@keras.saving.register_keras_serializable(package="moe_keras")
class OnesLike(keras.layers.Layer):
    """Outputs ones of its input's shape; stands in for the up projection
    of an upcycled decoder, whose `MoE` output it multiplies."""

    def call(self, inputs):
        return ops.ones_like(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


def _activation_identifier(activation):
    """A serializable identifier for a decoder's activation (keras-hub
    passes `ops.silu`, which `keras.activations.serialize` rejects)."""
    name = getattr(activation, "__name__", None)
    if name in ("silu", "swish"):
        return "silu"
    return keras.activations.serialize(activation)


def _upcycle_moe(decoder, options):
    """The built `MoE` layer that takes a decoder's FFN's place."""
    moe = _common.routed_moe(
        num_experts=options["num_experts"],
        units=decoder.hidden_dim,
        hidden_units=decoder.intermediate_dim,
        top_k=options["top_k"],
        normalize=True,
        capacity_factor=options["capacity_factor"],
        activation=_activation_identifier(decoder.activation),
        gated=True,
        use_bias=False,
        load_balance_weight=options["load_balance_weight"],
        z_loss_weight=options["z_loss_weight"],
        dtype=decoder.dtype_policy,
        name="moe",
    )
    moe.build(decoder._decoder_sequence_shape)
    return moe


def _upcycle_decoder(decoder, options):
    with keras.name_scope(decoder.name):
        moe = _upcycle_moe(decoder, options)
    policy = decoder.dtype_policy
    _common.replace_sublayer(decoder, "_feedforward_gate_dense", moe)
    _common.replace_sublayer(
        decoder,
        "_feedforward_intermediate_dense",
        OnesLike(dtype=policy, name="ones"),
    )
    _common.replace_sublayer(
        decoder,
        "_feedforward_output_dense",
        keras.layers.Identity(dtype=policy, name="identity"),
    )
    decoder.activation = keras.activations.linear


class _UpcycledBackboneMixin:
    """Upcycles every decoder layer's FFN when the backbone is built;
    `upcycle` is the dict of options (see `moe_keras.upcycle`)."""

    def _upcycle_decoders(self, upcycle):
        if not isinstance(upcycle, dict):
            raise TypeError(
                "`upcycle` must be a dict of upcycling options; received "
                f"upcycle={upcycle!r}."
            )
        self.upcycle = _common.check_upcycle_options(
            upcycle.get("num_experts"),
            upcycle.get("top_k", 2),
            upcycle.get("capacity_factor"),
            upcycle.get("load_balance_weight", 0.01),
            upcycle.get("z_loss_weight", 0.001),
        )
        for decoder in self.transformer_layers:
            _upcycle_decoder(decoder, self.upcycle)

    def moe_layers(self):
        """The `MoE` layer of each decoder layer, in order."""
        return [
            decoder._feedforward_gate_dense
            for decoder in self.transformer_layers
        ]

    def get_config(self):
        config = super().get_config()
        config["upcycle"] = dict(self.upcycle)
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledLlamaBackbone(_UpcycledBackboneMixin, LlamaBackbone):
    """`LlamaBackbone` whose FFNs are `moe_keras.MoE` layers; made by
    `moe_keras.upcycle`.

    Args:
        As `LlamaBackbone`, plus `upcycle`: the dict of upcycling options
        (`num_experts`, `top_k`, `capacity_factor`, `load_balance_weight`,
        `z_loss_weight`).
    """

    def __init__(self, *args, upcycle=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._upcycle_decoders(upcycle)


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledLlama3Backbone(_UpcycledBackboneMixin, Llama3Backbone):
    """`Llama3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""

    def __init__(self, *args, upcycle=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._upcycle_decoders(upcycle)


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledQwen3Backbone(_UpcycledBackboneMixin, Qwen3Backbone):
    """`Qwen3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""

    def __init__(self, *args, upcycle=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._upcycle_decoders(upcycle)


# keras-hub dense backbone class -> its upcycled subclass.
UPCYCLED_BACKBONES = {
    LlamaBackbone: UpcycledLlamaBackbone,
    Llama3Backbone: UpcycledLlama3Backbone,
    Qwen3Backbone: UpcycledQwen3Backbone,
}
