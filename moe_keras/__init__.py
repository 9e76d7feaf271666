"""Mixture-of-Experts layers for Keras 3: sparse, XLA-compiled, serializable."""

from moe_keras import kernels
from moe_keras import losses
from moe_keras._router_gradients import router_gradient_norms
from moe_keras.callbacks import ExpertLoadCallback
from moe_keras.callbacks import ExpertPerformanceCallback
from moe_keras.callbacks import RoutingMetrics
from moe_keras.distribution import get_layout_map
from moe_keras.experts import DenseExperts
from moe_keras.experts import ExpertList
from moe_keras.gates import ActivationGate
from moe_keras.gates import ClusterGate
from moe_keras.gates import ExpertChoiceGate
from moe_keras.gates import FeatureGate
from moe_keras.gates import Gate
from moe_keras.gates import HashGate
from moe_keras.gates import NoisyTopKGate
from moe_keras.gates import PerformanceGate
from moe_keras.gates import RandomGate
from moe_keras.gates import RoundRobinGate
from moe_keras.gates import SigmoidGate
from moe_keras.gates import SoftmaxGate
from moe_keras.gates import StaticGate
from moe_keras.gates import UniformGate
from moe_keras.hub import sparsify
from moe_keras.hub import upcycle
from moe_keras.moe import MoE
from moe_keras.replay import RoutingRecorder
from moe_keras.replay import RoutingReplayer
from moe_keras.statistics import RoutingStatistics

__version__ = "0.1.0"

__all__ = [
    "ActivationGate",
    "ClusterGate",
    "DenseExperts",
    "ExpertChoiceGate",
    "ExpertList",
    "ExpertLoadCallback",
    "ExpertPerformanceCallback",
    "FeatureGate",
    "Gate",
    "HashGate",
    "MoE",
    "NoisyTopKGate",
    "PerformanceGate",
    "RandomGate",
    "RoundRobinGate",
    "RoutingMetrics",
    "RoutingRecorder",
    "RoutingReplayer",
    "RoutingStatistics",
    "SigmoidGate",
    "SoftmaxGate",
    "StaticGate",
    "UniformGate",
    "get_layout_map",
    "kernels",
    "losses",
    "router_gradient_norms",
    "sparsify",
    "upcycle",
]
