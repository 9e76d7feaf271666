"""Upcycled keras-hub dense decoders: each FFN becomes a `moe_keras.MoE`.

keras-hub's dense decoders compute their FFN in one of four forms; each
upcycled family swaps the FFN's sublayers so that the decoder's own,
unchanged `call` computes `MoE(x)` instead, exactly (the swaps only
multiply by 1, or by 8 and then 1/8, and cast to float32 and back, which
lose nothing barring a float16 overflow):

- `_Gated`: SwiGLU inline in `call`, `down(act(gate(x)) * up(x))` with
  `act` the decoder's `activation` (Llama, Llama 3, Mistral, Qwen2,
  Qwen3, Qwen3.5, Phi-3). `gate` becomes the `MoE`, `act` the identity,
  `up` a layer of ones and `down` the identity: `MoE(x) * 1`.
- `_GeGLU`: GeGLU inline, `down(gelu_tanh(gate(x)) * up(x))` with the
  approximate GELU written in `call` (Gemma, Gemma 2, Gemma 3). `up`
  becomes the `MoE`, `gate` a layer of eights (`gelu_tanh(8) == 8`
  exactly: the tanh rounds to 1) and `down` a scale by 1/8:
  `(8 * MoE(x)) / 8`.
- `_MLP`: a plain MLP of two biased `Dense` layers, `down(up(x))` with the
  activation inside `up` (GPT-2, OPT, GPT-NeoX, Falcon). `up` becomes the
  `MoE` (two-layer experts with biases) and `down` the identity.
- `_Sublayer`: the FFN is a sublayer of its own (`decoder.mlp(x)`, a
  SwiGLU; SmolLM3), which becomes the `MoE`.

The decoder's attention, norms and caching are untouched, and its class is
not changed. The backbone subclasses redo the swap when they are built and
record it in their config, so a saved upcycled model loads back as one.

This module imports keras-hub; `moe_keras.upcycle` imports it lazily.
"""

import keras
import numpy as np
from keras import ops
from keras_hub.models import FalconBackbone
from keras_hub.models import Gemma3Backbone
from keras_hub.models import GemmaBackbone
from keras_hub.models import GPT2Backbone
from keras_hub.models import GPTNeoXBackbone
from keras_hub.models import Llama3Backbone
from keras_hub.models import LlamaBackbone
from keras_hub.models import MistralBackbone
from keras_hub.models import OPTBackbone
from keras_hub.models import Phi3Backbone
from keras_hub.models import Qwen3_5Backbone
from keras_hub.models import Qwen3Backbone
from keras_hub.models import QwenBackbone
from keras_hub.models import SmolLM3Backbone

from moe_keras.hub import _common


@keras.saving.register_keras_serializable(package="moe_keras")
class OnesLike(keras.layers.Layer):
    """Outputs ones of its input's shape; stands in for the up projection
    of an upcycled decoder, whose `MoE` output it multiplies."""

    def call(self, inputs):
        return ops.ones_like(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="moe_keras")
class FullLike(keras.layers.Layer):
    """Outputs `value` in its input's shape and dtype; stands in for the
    gate projection of an upcycled GeGLU decoder.

    Args:
        value: float, the value of every output element.
        **kwargs: base layer keyword arguments.
    """

    def __init__(self, value, **kwargs):
        super().__init__(**kwargs)
        self.value = float(value)

    def call(self, inputs):
        return ops.full_like(inputs, self.value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["value"] = self.value
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class Scale(keras.layers.Layer):
    """Multiplies its input by `factor`, in the input's dtype; stands in
    for the down projection of an upcycled GeGLU decoder.

    Args:
        factor: float, the factor (a power of 2 keeps it exact).
        **kwargs: base layer keyword arguments.
    """

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, inputs):
        return ops.multiply(inputs, ops.cast(self.factor, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["factor"] = self.factor
        return config


def _activation_identifier(activation):
    """A serializable identifier for a decoder's activation (keras-hub
    passes `ops.silu`, which `keras.activations.serialize` rejects)."""
    name = getattr(activation, "__name__", None)
    if name in ("silu", "swish"):
        return "silu"
    return keras.activations.serialize(activation)


def _numpy(value):
    return None if value is None else keras.ops.convert_to_numpy(value)


class _Form:
    """Where a family's decoder keeps its dense FFN and how its `call`
    computes it. `gate`, `up` and `down` name the FFN's projections
    (`gate` None for a plain MLP, whose `up` holds the activation); with
    `sublayer`, they are attributes of `decoder.<sublayer>`, else of the
    decoder."""

    gated = True

    def __init__(self, gate, up, down, sublayer=None):
        self.gate, self.up, self.down = gate, up, down
        self.sublayer = sublayer

    def owner(self, decoder):
        """The layer that holds the projections; the `MoE` takes its
        dtype policy."""
        if self.sublayer is None:
            return decoder
        return getattr(decoder, self.sublayer)

    def dense_layers(self, decoder):
        """The dense FFN's projection layers, `[gate, up, down]` (no gate
        in a plain MLP)."""
        owner = self.owner(decoder)
        names = [self.gate, self.up, self.down]
        return [getattr(owner, name) for name in names if name is not None]

    def activation(self, decoder):
        raise NotImplementedError

    def expert_options(self, decoder):
        """The `DenseExperts` options that compute the dense FFN."""
        layers = self.dense_layers(decoder)
        biases = {getattr(layer, "bias", None) is not None for layer in layers}
        if len(biases) != 1:
            raise ValueError(
                f"Cannot upcycle '{decoder.name}': some of its FFN's "
                "projections have a bias and some do not, which "
                "`DenseExperts` does not compute."
            )
        # Only a plain MLP's first projection holds the activation.
        linear = layers if self.gated else layers[1:]
        if any(
            getattr(layer, "activation", None) is not keras.activations.linear
            for layer in linear
        ):
            raise ValueError(
                f"Cannot upcycle '{decoder.name}': an activation inside its "
                "FFN's projections is not where its family puts it."
            )
        units = int(layers[-1].kernel.shape[-1])
        return dict(
            units=units,
            hidden_units=int(layers[0].kernel.shape[-1]),
            activation=self.activation(decoder),
            gated=self.gated,
            use_bias=biases.pop(),
        )

    def expert_weights(self, layers):
        """One expert's weights, by `DenseExperts` weight name, from the
        dense FFN's layers (`dense_layers`); `None` for a missing bias."""
        *first, down = layers
        weights = {
            "kernel_in": np.concatenate(
                [_numpy(layer.kernel) for layer in first], axis=-1
            ),
            "bias_in": None,
            "kernel_out": _numpy(down.kernel),
            "bias_out": _numpy(getattr(down, "bias", None)),
        }
        if getattr(first[0], "bias", None) is not None:
            weights["bias_in"] = np.concatenate(
                [_numpy(layer.bias) for layer in first], axis=-1
            )
        return weights

    def swap(self, decoder, moe):
        """Puts the built `moe` in the FFN's place."""
        raise NotImplementedError

    def moe(self, decoder):
        """The `MoE` layer of an upcycled decoder."""
        raise NotImplementedError


class _Gated(_Form):
    """`down(decoder.activation(gate(x)) * up(x))`."""

    def activation(self, decoder):
        return _activation_identifier(decoder.activation)

    def swap(self, decoder, moe):
        policy = decoder.dtype_policy
        _common.replace_sublayer(decoder, self.gate, moe)
        _common.replace_sublayer(
            decoder, self.up, OnesLike(dtype=policy, name="ones")
        )
        _common.replace_sublayer(
            decoder,
            self.down,
            keras.layers.Identity(dtype=policy, name="identity"),
        )
        decoder.activation = keras.activations.linear

    def moe(self, decoder):
        return getattr(decoder, self.gate)


# `gelu_tanh(_GELU_FIXED_POINT)` is `_GELU_FIXED_POINT` exactly: the tanh
# rounds to 1 in every float type; a power of 2, so dividing is exact too.
_GELU_FIXED_POINT = 8.0


class _GeGLU(_Form):
    """`down(gelu(gate(x), approximate=True) * up(x))`, the GELU written in
    the decoder's `call`."""

    def activation(self, decoder):
        gelu = keras.saving.get_registered_object("keras_hub>gelu_approximate")
        if gelu is None:  # pragma: no cover - keras-hub 0.32 registers it
            raise ValueError(
                f"Cannot upcycle '{decoder.name}': keras-hub registers no "
                "`gelu_approximate` activation for its experts."
            )
        return keras.activations.serialize(gelu)

    def swap(self, decoder, moe):
        policy = decoder.dtype_policy
        _common.replace_sublayer(decoder, self.up, moe)
        _common.replace_sublayer(
            decoder,
            self.gate,
            FullLike(_GELU_FIXED_POINT, dtype=policy, name="full"),
        )
        _common.replace_sublayer(
            decoder,
            self.down,
            Scale(1.0 / _GELU_FIXED_POINT, dtype=policy, name="scale"),
        )

    def moe(self, decoder):
        return getattr(decoder, self.up)


class _MLP(_Form):
    """`down(up(x))`: two biased `Dense` layers, the activation in `up`."""

    gated = False

    def activation(self, decoder):
        return _activation_identifier(getattr(decoder, self.up).activation)

    def swap(self, decoder, moe):
        _common.replace_sublayer(decoder, self.up, moe)
        _common.replace_sublayer(
            decoder,
            self.down,
            keras.layers.Identity(dtype=decoder.dtype_policy, name="identity"),
        )

    def moe(self, decoder):
        return getattr(decoder, self.up)


class _Sublayer(_Form):
    """`decoder.<sublayer>(x)`, a SwiGLU layer of its own."""

    def activation(self, decoder):
        return "silu"

    def swap(self, decoder, moe):
        _common.replace_sublayer(decoder, self.sublayer, moe)

    def moe(self, decoder):
        return getattr(decoder, self.sublayer)


_LLAMA_NAMES = (
    "_feedforward_gate_dense",
    "_feedforward_intermediate_dense",
    "_feedforward_output_dense",
)
_LLAMA_FORM = _Gated(*_LLAMA_NAMES)
_PHI3_FORM = _Gated(*(name.lstrip("_") for name in _LLAMA_NAMES))
_GEMMA_FORM = _GeGLU("gating_ffw", "gating_ffw_2", "ffw_linear")
_TRANSFORMER_DECODER_FORM = _MLP(
    None, "_feedforward_intermediate_dense", "_feedforward_output_dense"
)
_FALCON_FORM = _MLP(None, "dense_h_to_4h", "dense_4h_to_h")
_SMOLLM3_FORM = _Sublayer("gate_proj", "up_proj", "down_proj", "mlp")


def _upcycle_moe(decoder, form, options):
    """The built `MoE` layer that takes a decoder's FFN's place."""
    experts = form.expert_options(decoder)
    moe = _common.routed_moe(
        num_experts=options["num_experts"],
        top_k=options["top_k"],
        normalize=True,
        capacity_factor=options["capacity_factor"],
        load_balance_weight=options["load_balance_weight"],
        z_loss_weight=options["z_loss_weight"],
        dtype=form.owner(decoder).dtype_policy,
        name="moe",
        **experts,
    )
    moe.build((None, None, experts["units"]))
    return moe


def _upcycle_decoder(decoder, form, options):
    with keras.name_scope(decoder.name):
        moe = _upcycle_moe(decoder, form, options)
    form.swap(decoder, moe)


class _UpcycledBackboneMixin:
    """Upcycles every decoder layer's FFN when the backbone is built;
    `upcycle` is the dict of options (see `moe_keras.upcycle`).
    `ffn_form` (a `_Form`) says where the decoders keep their FFN."""

    def __init__(self, *args, upcycle=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._upcycle_decoders(upcycle)

    ffn_form = _LLAMA_FORM

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
            _upcycle_decoder(decoder, self.ffn_form, self.upcycle)

    def moe_layers(self):
        """The `MoE` layer of each decoder layer, in order."""
        return [
            self.ffn_form.moe(decoder) for decoder in self.transformer_layers
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


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledLlama3Backbone(_UpcycledBackboneMixin, Llama3Backbone):
    """`Llama3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledMistralBackbone(_UpcycledBackboneMixin, MistralBackbone):
    """`MistralBackbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledQwenBackbone(_UpcycledBackboneMixin, QwenBackbone):
    """`QwenBackbone` (`Qwen2Backbone`) with upcycled FFNs; see
    `UpcycledLlamaBackbone`."""


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledQwen3Backbone(_UpcycledBackboneMixin, Qwen3Backbone):
    """`Qwen3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledQwen3_5Backbone(_UpcycledBackboneMixin, Qwen3_5Backbone):
    """`Qwen3_5Backbone` with upcycled FFNs (full and linear attention
    layers alike); see `UpcycledLlamaBackbone`."""


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledPhi3Backbone(_UpcycledBackboneMixin, Phi3Backbone):
    """`Phi3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""

    ffn_form = _PHI3_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledGemmaBackbone(_UpcycledBackboneMixin, GemmaBackbone):
    """`GemmaBackbone` (Gemma, Gemma 2) with upcycled GeGLU FFNs; see
    `UpcycledLlamaBackbone`."""

    ffn_form = _GEMMA_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledGemma3Backbone(_UpcycledBackboneMixin, Gemma3Backbone):
    """`Gemma3Backbone` with upcycled GeGLU FFNs (the text decoder's; a
    vision encoder stays as it is); see `UpcycledLlamaBackbone`."""

    ffn_form = _GEMMA_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledSmolLM3Backbone(_UpcycledBackboneMixin, SmolLM3Backbone):
    """`SmolLM3Backbone` with upcycled FFNs; see `UpcycledLlamaBackbone`."""

    ffn_form = _SMOLLM3_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledGPT2Backbone(_UpcycledBackboneMixin, GPT2Backbone):
    """`GPT2Backbone` whose two-layer MLPs are `moe_keras.MoE` layers of
    biased two-layer experts; see `UpcycledLlamaBackbone`."""

    ffn_form = _TRANSFORMER_DECODER_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledOPTBackbone(_UpcycledBackboneMixin, OPTBackbone):
    """`OPTBackbone` with upcycled MLPs; see `UpcycledGPT2Backbone`."""

    ffn_form = _TRANSFORMER_DECODER_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledGPTNeoXBackbone(_UpcycledBackboneMixin, GPTNeoXBackbone):
    """`GPTNeoXBackbone` with upcycled MLPs; see `UpcycledGPT2Backbone`."""

    ffn_form = _TRANSFORMER_DECODER_FORM


@keras.saving.register_keras_serializable(package="moe_keras")
class UpcycledFalconBackbone(_UpcycledBackboneMixin, FalconBackbone):
    """`FalconBackbone` with upcycled MLPs; see `UpcycledGPT2Backbone`."""

    ffn_form = _FALCON_FORM


# keras-hub dense backbone class -> its upcycled subclass.
UPCYCLED_BACKBONES = {
    LlamaBackbone: UpcycledLlamaBackbone,
    Llama3Backbone: UpcycledLlama3Backbone,
    MistralBackbone: UpcycledMistralBackbone,
    QwenBackbone: UpcycledQwenBackbone,
    Qwen3Backbone: UpcycledQwen3Backbone,
    Qwen3_5Backbone: UpcycledQwen3_5Backbone,
    Phi3Backbone: UpcycledPhi3Backbone,
    GemmaBackbone: UpcycledGemmaBackbone,
    Gemma3Backbone: UpcycledGemma3Backbone,
    SmolLM3Backbone: UpcycledSmolLM3Backbone,
    GPT2Backbone: UpcycledGPT2Backbone,
    OPTBackbone: UpcycledOPTBackbone,
    GPTNeoXBackbone: UpcycledGPTNeoXBackbone,
    FalconBackbone: UpcycledFalconBackbone,
}
