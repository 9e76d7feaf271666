"""Mixture-of-Experts layers for Keras 3: sparse, XLA-compiled, serializable."""

from moe_keras import losses
from moe_keras.experts import DenseExperts
from moe_keras.gates import Gate
from moe_keras.gates import SigmoidGate
from moe_keras.gates import SoftmaxGate
from moe_keras.moe import MoE

__version__ = "0.1.0"

__all__ = [
    "DenseExperts",
    "Gate",
    "MoE",
    "SigmoidGate",
    "SoftmaxGate",
    "losses",
]
