"""Sparse stand-ins for keras-hub's MoE blocks, one family at a time.

keras-hub's MoE blocks run every expert on every token and mask the
result. Each block here subclasses the keras-hub block it replaces (so the
decoder's own `isinstance` checks and call conventions still hold), keeps
its arguments, and runs the routed experts through `moe_keras.MoE` with the
sparse dispatch. The backbone subclasses swap the blocks in when they are
built, and record it in their config, so a `.keras` file of a converted
model loads back converted.

This module imports keras-hub; `moe_keras.hub.sparsify` imports it lazily.
"""

import keras
from keras import ops
from keras_hub.models import MixtralBackbone
from keras_hub.models import Qwen3MoeBackbone
from keras_hub.models import QwenMoeBackbone
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenMoeMLP
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

from moe_keras import losses
from moe_keras.hub import _common


def _to_numpy(variable):
    return keras.ops.convert_to_numpy(variable)


class _SparseBlockMixin:
    """The call shared by the sparse blocks.

    `self.moe` routes and runs the experts; the router logits are computed
    once more here (a `[tokens, features] x [features, experts]` matmul,
    small next to the experts) because the block returns them and the
    family's auxiliary loss reads them.
    """

    def _routed(self, hidden_states, training):
        shape = ops.shape(hidden_states)
        x = ops.reshape(hidden_states, (-1, self.hidden_dim))  # [T, d]
        logits = self.moe.gate.compute_logits(ops.cast(x, "float32"))
        y = self.moe(x, training=training)  # [T, d]
        return x, logits, y, shape

    def _add_balance_loss(self, logits, flat_mask, coefficient):
        """The family's load-balancing loss: `E * sum_i f_i * P_i` over the
        unmasked tokens (`moe_keras.losses.load_balance_loss`, which is the
        same formula as keras-hub's `compute_load_balancing_loss`)."""
        probs = ops.softmax(logits, axis=-1)  # [T, E]
        indices = ops.top_k(probs, k=self.top_k)[1]  # [T, k]
        loss = losses.load_balance_loss(
            probs, indices, self.num_experts, mask=flat_mask
        )
        self.add_loss(coefficient * loss)

    def _load_routed_weights(self, router_kernel, gate_up, down):
        """Router `[d, E]`, fused gate|up `[E, d, 2h]`, down `[E, h, d]`."""
        _common.assign(self.moe.gate.kernel, router_kernel)
        _common.assign(self.moe.experts.kernel_in, gate_up)
        _common.assign(self.moe.experts.kernel_out, down)


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseMixtralMoeBlock(_SparseBlockMixin, MixtralSparseMoeBlock):
    """`MixtralSparseMoeBlock` on the sparse dispatch of `moe_keras.MoE`.

    Same routing (softmax over the experts, top-k, renormalised), same
    SwiGLU experts, same auxiliary loss (`router_aux_loss_coef` times the
    load-balancing loss over the unpadded tokens), same outputs
    `(output, router_logits)`; each token runs its k experts only.

    Args:
        As `MixtralSparseMoeBlock`, plus `capacity_factor`: `None`
        (dropless, the default: the same outputs as the original) or a
        float > 0 for fixed-capacity buffers that drop overflow.
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_experts,
        top_k=2,
        router_jitter_noise=0.0,
        layer_norm_epsilon=1e-5,
        router_aux_loss_coef=0.02,
        kernel_initializer="glorot_uniform",
        capacity_factor=None,
        **kwargs,
    ):
        super().__init__(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            router_jitter_noise=router_jitter_noise,
            layer_norm_epsilon=layer_norm_epsilon,
            router_aux_loss_coef=router_aux_loss_coef,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        self.moe = _common.routed_moe(
            num_experts=num_experts,
            units=hidden_dim,
            hidden_units=intermediate_dim,
            top_k=top_k,
            normalize=True,
            capacity_factor=self.capacity_factor,
            jitter=router_jitter_noise,
            kernel_initializer=self.kernel_initializer,
            router_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
        )

    def build(self, decoder_sequence_shape):
        self.moe.build((None, self.hidden_dim))
        self.built = True

    def call(self, hidden_states, attention_mask=None, training=False):
        _, logits, y, shape = self._routed(hidden_states, training)
        if training:
            flat_mask = None
            if attention_mask is not None:
                flat_mask = ops.reshape(attention_mask, (-1,))  # [T]
            self._add_balance_loss(logits, flat_mask, self.router_aux_loss_coef)
        return ops.reshape(y, shape), logits

    def load_hub_weights(self, block):
        """Takes the weights of a keras-hub `MixtralSparseMoeBlock`."""
        bank = block.expert_bank
        gate = _to_numpy(bank._expert_feedforward_gate_dense)
        up = _to_numpy(bank._expert_feedforward_intermediate_dense)
        self._load_routed_weights(
            _to_numpy(block._sparse_feedforward_gate_dense.kernel),
            ops.convert_to_numpy(ops.concatenate([gate, up], axis=-1)),
            _to_numpy(bank._expert_feedforward_output_dense),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "router_jitter_noise": self.router_jitter_noise,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "capacity_factor": self.capacity_factor,
            }
        )
        return config


class _SparseQwenBlockMixin(_SparseBlockMixin):
    """Qwen-MoE and Qwen3-MoE: `norm_top_k_prob`, and an auxiliary loss
    masked by the rows of the self-attention mask."""

    def _make_moe(self, capacity_factor):
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        self.moe = _common.routed_moe(
            num_experts=self.num_experts,
            units=self.hidden_dim,
            hidden_units=self.intermediate_dim,
            top_k=self.top_k,
            normalize=bool(self.norm_top_k_prob),
            capacity_factor=self.capacity_factor,
            kernel_initializer=self.kernel_initializer,
            router_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
        )

    def _balance_loss_if_training(self, logits, attention_mask, training):
        if not training:
            return
        flat_mask = None
        if attention_mask is not None:
            # [batch, q, k] -> [T]: a query row that attends anywhere.
            flat_mask = ops.reshape(ops.any(attention_mask, axis=-1), (-1,))
        self._add_balance_loss(
            logits, flat_mask, self.router_aux_loss_coefficient
        )

    def _load_qwen_routed(self, block):
        self._load_routed_weights(
            _to_numpy(block._sparse_feedforward_gate_dense.kernel),
            _to_numpy(block.expert_bank._expert_feedforward_gate_dense),
            _to_numpy(block.expert_bank._expert_feedforward_output_dense),
        )

    def _qwen_config(self, config):
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "moe_intermediate_dim": self.intermediate_dim,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "norm_top_k_prob": self.norm_top_k_prob,
                "kernel_initializer": keras.initializers.serialize(
                    keras.initializers.get(self.kernel_initializer)
                ),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "router_aux_loss_coefficient": (
                    self.router_aux_loss_coefficient
                ),
                "capacity_factor": self.capacity_factor,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwen3MoeBlock(_SparseQwenBlockMixin, Qwen3SparseMoeBlock):
    """`Qwen3SparseMoeBlock` on the sparse dispatch of `moe_keras.MoE`.

    Same routing (softmax, top-k, renormalised when `norm_top_k_prob`),
    experts, auxiliary loss and outputs as the original.

    Args:
        As `Qwen3SparseMoeBlock`, plus `capacity_factor` (`None`: dropless).
    """

    def __init__(self, *args, capacity_factor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_moe(capacity_factor)

    def build(self, decoder_sequence_shape):
        self.moe.build((None, self.hidden_dim))
        self.built = True

    def call(self, hidden_states, attention_mask=None, training=None):
        _, logits, y, shape = self._routed(hidden_states, training)
        self._balance_loss_if_training(logits, attention_mask, training)
        return ops.reshape(y, shape), logits

    def load_hub_weights(self, block):
        """Takes the weights of a keras-hub `Qwen3SparseMoeBlock`."""
        self._load_qwen_routed(block)

    def get_config(self):
        return self._qwen_config(super().get_config())


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwenMoeBlock(_SparseQwenBlockMixin, QwenSparseMoeBlock):
    """`QwenSparseMoeBlock` (Qwen1.5/Qwen2-MoE) on the sparse dispatch of
    `moe_keras.MoE`, with its shared expert and the shared expert's sigmoid
    gate kept as they are: `y = moe(x) + sigmoid(x w_g) * shared(x)`.

    Args:
        As `QwenSparseMoeBlock`, plus `capacity_factor` (`None`: dropless).
    """

    def __init__(self, *args, capacity_factor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_moe(capacity_factor)
        # The shared expert and its gate, as keras-hub builds them.
        self.shared_expert_dense = QwenMoeMLP(
            intermediate_dim=self.intermediate_dim_shared,
            hidden_dim=self.hidden_dim,
            kernel_initializer=self.kernel_initializer,
            layer_norm_epsilon=self.layer_norm_epsilon,
            name="shared_expert_dense",
            dtype=self.dtype_policy,
        )
        self.shared_expert_gate_dense = keras.layers.Dense(
            1,
            use_bias=False,
            name="shared_expert_gate_dense",
            dtype=self.dtype_policy,
        )

    def build(self, decoder_sequence_shape):
        self.moe.build((None, self.hidden_dim))
        self.shared_expert_dense.build((None, self.hidden_dim))
        self.shared_expert_gate_dense.build((None, self.hidden_dim))
        self.built = True

    def call(self, hidden_states, attention_mask=None, training=None):
        x, logits, y, shape = self._routed(hidden_states, training)
        shared = self.shared_expert_dense(x)  # [T, d]
        shared = shared * ops.sigmoid(self.shared_expert_gate_dense(x))
        self._balance_loss_if_training(logits, attention_mask, training)
        return ops.reshape(y + shared, shape), logits

    def load_hub_weights(self, block):
        """Takes the weights of a keras-hub `QwenSparseMoeBlock`."""
        self._load_qwen_routed(block)
        self.shared_expert_dense.set_weights(
            block.shared_expert_dense.get_weights()
        )
        self.shared_expert_gate_dense.set_weights(
            block.shared_expert_gate_dense.get_weights()
        )

    def get_config(self):
        config = self._qwen_config(super().get_config())
        config["shared_expert_intermediate_dim"] = self.intermediate_dim_shared
        return config


# --- backbones ----------------------------------------------------------------


def _block_kwargs(block, names):
    kwargs = {name: getattr(block, name) for name in names}
    kwargs["dtype"] = block.dtype_policy
    kwargs["name"] = "sparse_moe_block"
    return kwargs


def _mixtral_block(block, capacity_factor):
    return SparseMixtralMoeBlock(
        capacity_factor=capacity_factor,
        **_block_kwargs(
            block,
            (
                "hidden_dim",
                "intermediate_dim",
                "num_experts",
                "top_k",
                "router_jitter_noise",
                "layer_norm_epsilon",
                "router_aux_loss_coef",
                "kernel_initializer",
            ),
        ),
    )


def _qwen3_block(block, capacity_factor):
    kwargs = _block_kwargs(
        block,
        (
            "hidden_dim",
            "num_experts",
            "top_k",
            "norm_top_k_prob",
            "kernel_initializer",
            "layer_norm_epsilon",
            "router_aux_loss_coefficient",
        ),
    )
    return SparseQwen3MoeBlock(
        moe_intermediate_dim=block.intermediate_dim,
        capacity_factor=capacity_factor,
        **kwargs,
    )


def _qwen_block(block, capacity_factor):
    kwargs = _block_kwargs(
        block,
        (
            "hidden_dim",
            "num_experts",
            "top_k",
            "norm_top_k_prob",
            "kernel_initializer",
            "layer_norm_epsilon",
            "router_aux_loss_coefficient",
        ),
    )
    return SparseQwenMoeBlock(
        moe_intermediate_dim=block.intermediate_dim,
        shared_expert_intermediate_dim=block.intermediate_dim_shared,
        capacity_factor=capacity_factor,
        **kwargs,
    )


class _SparseBackboneMixin:
    """Swaps each decoder's keras-hub MoE block for its sparse stand-in.

    Subclasses name the decoder attribute holding the block
    (`block_attribute`), the keras-hub block class (`hub_block`) and the
    function making the stand-in (`make_block`).
    """

    block_attribute = None
    hub_block = None
    # Every decoder attribute the conversion replaces, `block_attribute`
    # first; its sparse block's `load_hub_weights` takes their originals.
    block_attributes = None

    @classmethod
    def _attributes(cls):
        return cls.block_attributes or (cls.block_attribute,)

    @classmethod
    def hub_layers(cls, backbone):
        """The keras-hub layers the conversion replaces, `[[layer of each
        attribute] of each converted decoder]`."""
        return [
            [getattr(decoder, name) for name in cls._attributes()]
            for decoder in backbone.transformer_layers
            if type(getattr(decoder, cls.block_attribute, None))
            is cls.hub_block
        ]

    def converted_layers(self):
        """This backbone's replacements, in the order of `hub_layers`."""
        return [
            [getattr(decoder, name) for name in self._attributes()]
            for decoder, _ in self.sparse_blocks()
        ]

    def __init__(self, *args, capacity_factor=None, **kwargs):
        # The keras-hub backbone builds its functional graph first; the
        # blocks are swapped in the built decoders after.
        super().__init__(*args, **kwargs)
        self._sparsify_blocks(capacity_factor)

    def _sparsify_blocks(self, capacity_factor):
        self.capacity_factor = _common.check_capacity_factor(capacity_factor)
        for decoder in self.transformer_layers:
            block = getattr(decoder, self.block_attribute, None)
            if type(block) is not self.hub_block:
                continue  # a dense layer (Qwen's `mlp_only_layers`)
            with keras.name_scope(decoder.name):
                sparse = type(self).make_block(block, self.capacity_factor)
                sparse.build(getattr(decoder, "_decoder_sequence_shape", None))
            _common.replace_sublayer(decoder, self.block_attribute, sparse)

    def sparse_blocks(self):
        """`[(decoder, sparse block)]` of every converted decoder layer."""
        return [
            (decoder, getattr(decoder, self.block_attribute))
            for decoder in self.transformer_layers
            if isinstance(
                getattr(decoder, self.block_attribute, None), _SparseBlockMixin
            )
        ]

    def get_config(self):
        config = super().get_config()
        config["capacity_factor"] = self.capacity_factor
        return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseMixtralBackbone(_SparseBackboneMixin, MixtralBackbone):
    """`MixtralBackbone` whose MoE blocks run sparse
    (`SparseMixtralMoeBlock`). Made by `moe_keras.sparsify`.

    Args:
        As `MixtralBackbone`, plus `capacity_factor`: `None` (dropless,
        the default) or a float > 0.
    """

    block_attribute = "_sparse_moe_block"
    hub_block = MixtralSparseMoeBlock
    make_block = staticmethod(_mixtral_block)


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwenMoeBackbone(_SparseBackboneMixin, QwenMoeBackbone):
    """`QwenMoeBackbone` whose MoE blocks run sparse (`SparseQwenMoeBlock`).
    Made by `moe_keras.sparsify`.

    Args:
        As `QwenMoeBackbone`, plus `capacity_factor` (`None`: dropless).
    """

    block_attribute = "mlp"
    hub_block = QwenSparseMoeBlock
    make_block = staticmethod(_qwen_block)


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseQwen3MoeBackbone(_SparseBackboneMixin, Qwen3MoeBackbone):
    """`Qwen3MoeBackbone` whose MoE blocks run sparse
    (`SparseQwen3MoeBlock`). Made by `moe_keras.sparsify`.

    Args:
        As `Qwen3MoeBackbone`, plus `capacity_factor` (`None`: dropless).
    """

    block_attribute = "mlp"
    hub_block = Qwen3SparseMoeBlock
    make_block = staticmethod(_qwen3_block)


# keras-hub backbone class -> its sparse subclass.
SPARSE_BACKBONES = {
    MixtralBackbone: SparseMixtralBackbone,
    QwenMoeBackbone: SparseQwenMoeBackbone,
    Qwen3MoeBackbone: SparseQwen3MoeBackbone,
}
