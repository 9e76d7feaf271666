"""Gemma 4's MoE block on the sparse dispatch.

A Gemma 4 MoE decoder layer runs a dense MLP beside the experts. Its
router (`Gemma4Router`) and expert bank (`Gemma4MoEBlock`) are two layers
of the decoder: the router scores the raw hidden states, RMS-normalised
without a learned scale, times `hidden_dim ** -0.5` and a learned
per-feature scale; the bank runs every expert (GeGLU, with a learned
per-expert output scale) on the pre-normalised hidden states and keeps
the top-k. Here the bank becomes one `moe_keras.MoE` that routes on the
raw states (`router_inputs`) with the gate's input transform
(`input_norm="rms"`, `input_multiplier`, `use_input_scale`) and runs only
the chosen experts (`use_output_scale`); the router becomes a pass-through
that hands the raw states to the bank, so the decoder's own `call` is
unchanged. Gemma 4 adds no auxiliary loss.

This module imports keras-hub; `moe_keras.hub.sparsify` imports it lazily.
"""

import keras
from keras import ops
from keras_hub.models import Gemma4Backbone
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock

from moe_keras.hub import _common
from moe_keras.hub import _sparse_families


@keras.saving.register_keras_serializable(package="moe_keras")
class Gemma4RouterInputs(keras.layers.Layer):
    """Stands where `Gemma4Router` stood: it passes the decoder's raw hidden
    states, as `[tokens, hidden_dim]`, to the `SparseGemma4MoEBlock` in
    place of the dense dispatch weights, and that block routes on them.

    Args:
        **kwargs: base layer keyword arguments, such as `name`.
    """

    def call(self, hidden_states):
        return ops.reshape(hidden_states, (-1, ops.shape(hidden_states)[-1]))


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseGemma4MoEBlock(
    _sparse_families._SparseBlockMixin, keras.layers.Layer
):
    """Gemma 4's router and expert bank as one `moe_keras.MoE`: the same
    routing (softmax over the experts of the transformed raw states, top-k,
    renormalised) and the same experts (GeGLU times a per-expert scale),
    each token running its k experts only.

    Args:
        num_experts: int, the number of experts.
        hidden_dim: int, the input and output width.
        expert_intermediate_dim: int, each expert's hidden width.
        num_experts_per_token: int, the k of the top-k.
        layer_norm_epsilon: float, the epsilon of the router's RMS norm.
        capacity_factor: `None` (dropless, the default: the same outputs
            as the original) or a float > 0.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        x: `(tokens, hidden_dim)`, the pre-normalised states the experts
            run on.
        router_inputs: `(tokens, hidden_dim)`, the raw states the router
            scores (what `Gemma4RouterInputs` returns).
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        expert_intermediate_dim,
        num_experts_per_token,
        layer_norm_epsilon=1e-6,
        capacity_factor=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.expert_intermediate_dim = expert_intermediate_dim
        self.num_experts_per_token = num_experts_per_token
        self.layer_norm_epsilon = layer_norm_epsilon
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        gelu = keras.saving.get_registered_object("keras_hub>gelu_approximate")
        self.moe = _common.routed_moe(
            num_experts=num_experts,
            units=hidden_dim,
            hidden_units=expert_intermediate_dim,
            top_k=num_experts_per_token,
            normalize=True,
            capacity_factor=self.capacity_factor,
            activation=gelu,
            use_output_scale=True,
            gate_options={
                "input_norm": "rms",
                "input_norm_epsilon": layer_norm_epsilon,
                "input_multiplier": float(hidden_dim) ** -0.5,
                "use_input_scale": True,
            },
            dtype=self.dtype_policy,
        )

    def build(self, input_shape, router_inputs_shape=None):
        self.moe.build((None, self.hidden_dim))
        self.built = True

    def call(self, x, router_inputs):
        return self.moe(x, router_inputs=router_inputs)

    def load_hub_weights(self, bank, router):
        """Takes the weights of a keras-hub `Gemma4MoEBlock` and of the
        `Gemma4Router` beside it."""
        numpy = keras.ops.convert_to_numpy
        _common.assign(self.moe.gate.kernel, numpy(router.proj.kernel))
        _common.assign(self.moe.gate.input_scale, numpy(router.per_dim_scale))
        experts = self.moe.experts
        _common.assign(
            experts.kernel_in,
            ops.convert_to_numpy(
                ops.concatenate([bank.gate_proj, bank.up_proj], axis=-1)
            ),
        )
        _common.assign(experts.kernel_out, numpy(bank.down_proj))
        _common.assign(experts.output_scale, numpy(bank.per_expert_scale))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "expert_intermediate_dim": self.expert_intermediate_dim,
                "num_experts_per_token": self.num_experts_per_token,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "capacity_factor": self.capacity_factor,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseGemma4Backbone(
    _sparse_families._SparseBackboneMixin, Gemma4Backbone
):
    """`Gemma4Backbone` whose MoE decoder layers run their experts sparse
    (`SparseGemma4MoEBlock`, routed on `Gemma4RouterInputs`). Made by
    `moe_keras.sparsify`.

    Args:
        As `Gemma4Backbone`, plus `capacity_factor` (`None`: dropless).
    """

    block_attribute = "moe_expert_bank"
    block_attributes = ("moe_expert_bank", "moe_router")
    hub_block = Gemma4MoEBlock

    def _sparsify_blocks(self, capacity_factor):
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        for decoder in self.transformer_layers:
            bank = getattr(decoder, self.block_attribute, None)
            if type(bank) is not self.hub_block:
                continue  # a layer without the MoE block
            router = decoder.moe_router
            with keras.name_scope(decoder.name):
                sparse = SparseGemma4MoEBlock(
                    num_experts=bank.num_experts,
                    hidden_dim=bank.hidden_dim,
                    expert_intermediate_dim=bank.expert_intermediate_dim,
                    num_experts_per_token=router.num_experts_per_token,
                    layer_norm_epsilon=router.layer_norm_epsilon,
                    capacity_factor=self.capacity_factor,
                    dtype=bank.dtype_policy,
                    name="moe_expert_bank",
                )
                sparse.build((None, bank.hidden_dim))
                inputs = Gemma4RouterInputs(
                    dtype=router.dtype_policy, name="moe_router"
                )
            _common.replace_sublayer(decoder, "moe_expert_bank", sparse)
            _common.replace_sublayer(decoder, "moe_router", inputs)


SPARSE_BACKBONES = {Gemma4Backbone: SparseGemma4Backbone}
