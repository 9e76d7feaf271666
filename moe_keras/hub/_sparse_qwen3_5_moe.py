"""Qwen3.5-MoE's MoE block on the sparse dispatch.

Its routing is Qwen-MoE's with the top-k always renormalised, and a shared
expert behind a sigmoid gate; the hybrid backbone around it (Gated
DeltaNet and attention layers, an optional vision encoder) is left as
keras-hub builds it, since only the MoE blocks are swapped.

This module imports keras-hub; `moe_keras.hub.sparsify` imports it lazily.
"""

import keras
from keras import ops
from keras_hub.models import Qwen3_5MoeBackbone
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeMLP
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import (
    Qwen3_5MoeSparseMoeBlock,
)

from moe_keras.hub import _common
from moe_keras.hub import _sparse_families


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwen3_5MoeBlock(
    _sparse_families._SparseBlockMixin, Qwen3_5MoeSparseMoeBlock
):
    """`Qwen3_5MoeSparseMoeBlock` on the sparse dispatch of `moe_keras.MoE`.

    Same routing (softmax, top-k, renormalised), experts, shared expert and
    its sigmoid gate, auxiliary loss (over the unpadded tokens) and outputs
    `(output, router_logits)` as the original.

    Args:
        As `Qwen3_5MoeSparseMoeBlock`, plus `capacity_factor` (`None`:
        dropless).
    """

    def __init__(self, *args, capacity_factor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        self.moe = _common.routed_moe(
            num_experts=self.num_experts,
            units=self.hidden_dim,
            hidden_units=self.moe_intermediate_dim,
            top_k=self.top_k,
            normalize=True,
            capacity_factor=self.capacity_factor,
            kernel_initializer=self.kernel_initializer,
            router_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
        )

    def build(self, decoder_sequence_shape):
        self.moe.build((None, self.hidden_dim))
        # The shared expert and its gate, as keras-hub builds them.
        self.shared_expert = Qwen3_5MoeMLP(
            intermediate_dim=self.shared_expert_intermediate_size,
            hidden_dim=self.hidden_dim,
            kernel_initializer=self.kernel_initializer,
            name="shared_expert",
            dtype=self.dtype_policy,
        )
        self.shared_expert.build((None, self.hidden_dim))
        self._shared_expert_gate = keras.layers.Dense(
            1,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name="shared_expert_gate",
            dtype=self.dtype_policy,
        )
        self._shared_expert_gate.build((None, self.hidden_dim))
        self.built = True

    def call(self, hidden_states, attention_mask=None, training=None):
        x, logits, y, shape = self._routed(hidden_states, training)
        shared = self.shared_expert(x)  # [T, d]
        shared = shared * ops.sigmoid(self._shared_expert_gate(x))
        if training:
            flat_mask = None
            if attention_mask is not None:
                if len(attention_mask.shape) == 3:
                    attention_mask = ops.any(attention_mask, axis=-1)
                flat_mask = ops.reshape(attention_mask, (-1,))  # [T]
            self._add_balance_loss(
                logits, flat_mask, self.router_aux_loss_coefficient
            )
        return ops.reshape(y + shared, shape), logits

    def load_hub_weights(self, block):
        """Takes the weights of a keras-hub `Qwen3_5MoeSparseMoeBlock`."""
        numpy = keras.ops.convert_to_numpy
        bank = block.expert_bank
        self._load_routed_weights(
            numpy(block._router_gate.kernel),
            numpy(bank._expert_feedforward_gate_dense),
            numpy(bank._expert_feedforward_output_dense),
        )
        self.shared_expert.set_weights(block.shared_expert.get_weights())
        self._shared_expert_gate.set_weights(
            block._shared_expert_gate.get_weights()
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "moe_intermediate_dim": self.moe_intermediate_dim,
                "shared_expert_intermediate_size": (
                    self.shared_expert_intermediate_size
                ),
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "kernel_initializer": keras.initializers.serialize(
                    keras.initializers.get(self.kernel_initializer)
                ),
                "router_aux_loss_coefficient": (
                    self.router_aux_loss_coefficient
                ),
                "capacity_factor": self.capacity_factor,
            }
        )
        return config


def _qwen3_5_block(block, capacity_factor):
    return SparseQwen3_5MoeBlock(
        capacity_factor=capacity_factor,
        **_sparse_families._block_kwargs(
            block,
            (
                "hidden_dim",
                "moe_intermediate_dim",
                "shared_expert_intermediate_size",
                "num_experts",
                "top_k",
                "kernel_initializer",
                "router_aux_loss_coefficient",
            ),
        ),
    )


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwen3_5MoeBackbone(
    _sparse_families._SparseBackboneMixin, Qwen3_5MoeBackbone
):
    """`Qwen3_5MoeBackbone` whose MoE blocks run sparse
    (`SparseQwen3_5MoeBlock`). Made by `moe_keras.sparsify`.

    Args:
        As `Qwen3_5MoeBackbone`, plus `capacity_factor` (`None`: dropless).
    """

    block_attribute = "mlp"
    hub_block = Qwen3_5MoeSparseMoeBlock
    make_block = staticmethod(_qwen3_5_block)


SPARSE_BACKBONES = {Qwen3_5MoeBackbone: SparseQwen3_5MoeBackbone}
