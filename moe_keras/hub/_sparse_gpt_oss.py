"""GPT-OSS's MoE block on the sparse dispatch.

keras-hub's `GptOssSparseMoeBlock` runs all experts on every token (top-4
of 32 in GPT-OSS-20b: 8 times the expert work). Its experts are the
package's `DenseExperts` with `gated="clamped_swiglu"` and biases, its
router a `TopKSoftmaxGate` with a bias: the softmax over the k selected
logits is the full softmax renormalised over the k selected, the same
weights. GPT-OSS adds no auxiliary loss.

This module imports keras-hub; `moe_keras.hub.sparsify` imports it lazily.
"""

import keras
import numpy as np
from keras import ops
from keras_hub.models import GptOssBackbone
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock

from moe_keras.hub import _common
from moe_keras.hub import _sparse_families


def _fused(interleaved):
    """keras-hub keeps gate and up columns interleaved (`[..., 0::2]` gate,
    `[..., 1::2]` up); `DenseExperts` keeps the gate half, then the up."""
    interleaved = np.asarray(interleaved)
    return np.concatenate(
        [interleaved[..., 0::2], interleaved[..., 1::2]], axis=-1
    )


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseGptOssMoeBlock(
    _sparse_families._SparseBlockMixin, GptOssSparseMoeBlock
):
    """`GptOssSparseMoeBlock` on the sparse dispatch of `moe_keras.MoE`.

    Same router (a biased linear layer, softmax over the top-k logits),
    same experts (clamped SwiGLU with biases on both matmuls), same outputs
    `(output, router_scores)` with `router_scores` the `[tokens, experts]`
    weights (zero off the top-k); each token runs its k experts only.

    Args:
        As `GptOssSparseMoeBlock`, plus `capacity_factor`: `None`
        (dropless, the default: the same outputs as the original) or a
        float > 0 for fixed-capacity buffers that drop overflow.
    """

    def __init__(self, *args, capacity_factor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        # keras-hub's `GptOssExperts` defaults; the block never sets them.
        self.moe = _common.routed_moe(
            num_experts=self.num_experts,
            units=self.hidden_dim,
            hidden_units=self.intermediate_dim,
            top_k=self.top_k,
            normalize=True,
            capacity_factor=self.capacity_factor,
            activation=None,
            gated="clamped_swiglu",
            glu_alpha=1.702,
            glu_limit=7.0,
            use_bias=True,
            kernel_initializer=self.kernel_initializer,
            router_initializer=self.kernel_initializer,
            gate_options={"use_bias": True},
            dtype=self.dtype_policy,
        )

    def build(self, decoder_sequence_shape):
        self.moe.build((None, self.hidden_dim))
        self.built = True

    def call(self, hidden_states, training=None):
        x, logits, y, shape = self._routed(hidden_states, training)
        weights, indices = self.moe.gate.select(
            ops.softmax(logits, axis=-1), self.top_k
        )
        scores = ops.sum(
            ops.one_hot(indices, self.num_experts) * weights[..., None],
            axis=1,
        )  # [T, E]
        return ops.reshape(y, shape), ops.cast(scores, self.compute_dtype)

    def load_hub_weights(self, block):
        """Takes the weights of a keras-hub `GptOssSparseMoeBlock`."""
        router, experts = block.router.router_dense, block.experts
        numpy = keras.ops.convert_to_numpy
        _common.assign(self.moe.gate.kernel, numpy(router.kernel))
        _common.assign(self.moe.gate.bias, numpy(router.bias))
        bank = self.moe.experts
        _common.assign(bank.kernel_in, _fused(numpy(experts.gate_up_proj)))
        _common.assign(bank.bias_in, _fused(numpy(experts.gate_up_proj_bias)))
        _common.assign(bank.kernel_out, numpy(experts.down_proj))
        _common.assign(bank.bias_out, numpy(experts.down_proj_bias))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "kernel_initializer": keras.initializers.serialize(
                    keras.initializers.get(self.kernel_initializer)
                ),
                "capacity_factor": self.capacity_factor,
            }
        )
        return config


def _gpt_oss_block(block, capacity_factor):
    return SparseGptOssMoeBlock(
        capacity_factor=capacity_factor,
        **_sparse_families._block_kwargs(
            block,
            (
                "hidden_dim",
                "intermediate_dim",
                "num_experts",
                "top_k",
                "kernel_initializer",
            ),
        ),
    )


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseGptOssBackbone(
    _sparse_families._SparseBackboneMixin, GptOssBackbone
):
    """`GptOssBackbone` whose MoE blocks run sparse
    (`SparseGptOssMoeBlock`). Made by `moe_keras.sparsify`.

    Args:
        As `GptOssBackbone`, plus `capacity_factor`: `None` (dropless, the
        default) or a float > 0.
    """

    block_attribute = "sparse_moe_block"
    hub_block = GptOssSparseMoeBlock
    make_block = staticmethod(_gpt_oss_block)


SPARSE_BACKBONES = {GptOssBackbone: SparseGptOssBackbone}
