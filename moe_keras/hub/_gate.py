"""The router of converted keras-hub blocks: softmax, top-k, renormalised."""

import keras

from moe_keras import gates as gates_lib


@keras.saving.register_keras_serializable(package="moe_keras")
class TopKSoftmaxGate(gates_lib.SoftmaxGate):
    """Softmax router whose k selected weights are renormalised at every k.

    keras-hub's MoE blocks take the softmax over all experts, keep the top-k
    probabilities and (Mixtral always; Qwen with `norm_top_k_prob=True`)
    divide them by their sum, at k = 1 as well, where the weight becomes 1.
    `SoftmaxGate` keeps the probability at k = 1 (Switch), so the converted
    blocks route with this gate instead, which reproduces the original
    weights exactly. Upcycling uses it too: weights that sum to 1 make a
    mixture of identical experts equal the dense FFN it was copied from.

    Note that at k = 1 with `normalize=True` the weight is the constant 1,
    so the router then learns from the auxiliary loss only.

    Args:
        normalize: bool, renormalise the k selected weights to sum to 1.
            Defaults to `True`.
        **kwargs: as in `moe_keras.Gate`.
    """

    def __init__(self, normalize=True, **kwargs):
        super().__init__(**kwargs)
        self.normalize = bool(normalize)

    def normalizes(self, top_k):
        return self.normalize

    def get_config(self):
        config = super().get_config()
        config["normalize"] = self.normalize
        return config
