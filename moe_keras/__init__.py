"""Mixture-of-Experts layers for Keras 3: sparse, XLA-compiled, serializable."""

from moe_keras import losses
from moe_keras.callbacks import ExpertLoadCallback
from moe_keras.callbacks import RoutingMetrics
from moe_keras.experts import DenseExperts
from moe_keras.experts import ExpertList
from moe_keras.gates import ExpertChoiceGate
from moe_keras.gates import FeatureGate
from moe_keras.gates import Gate
from moe_keras.gates import HashGate
from moe_keras.gates import NoisyTopKGate
from moe_keras.gates import RandomGate
from moe_keras.gates import RoundRobinGate
from moe_keras.gates import SigmoidGate
from moe_keras.gates import SoftmaxGate
from moe_keras.gates import StaticGate
from moe_keras.gates import UniformGate
from moe_keras.moe import MoE
from moe_keras.statistics import RoutingStatistics

__version__ = "0.1.0"

__all__ = [
    "DenseExperts",
    "ExpertChoiceGate",
    "ExpertList",
    "ExpertLoadCallback",
    "FeatureGate",
    "Gate",
    "HashGate",
    "MoE",
    "NoisyTopKGate",
    "RandomGate",
    "RoundRobinGate",
    "RoutingMetrics",
    "RoutingStatistics",
    "SigmoidGate",
    "SoftmaxGate",
    "StaticGate",
    "UniformGate",
    "losses",
]
