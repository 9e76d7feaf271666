"""Routers: layers that score experts for each position and pick among them.

One family a file: `base` (the `Gate` base class), `learned` (softmax,
sigmoid, any gate function, noisy top-k), `feature` (per-feature gates),
`static` (input-independent weights: learned, or from measured
performance), `cluster` (learned weights per cluster id), `rule`
(hash, round-robin, random and uniform assignment) and `expert_choice`.

Every gate answers two calls:

- `gate(x)`: gate probabilities `[..., E]`, for standalone use;
- `gate(x, routing=True, top_k=k, training=..., routing_mask=...)`: a dict
  with the router's `logits` and `probs` `[T, E]` (float32), the combine
  `weights` (`[T, k]`, or `[T, E]` for the dense mixture; with a trailing
  `units` axis for per-feature gates), the chosen `indices` `[T, k]` when
  `top_k` is set, and `losses`, the gate's own auxiliary terms by name.

The `MoE` layer only consumes that dict, so gates can be swapped without
touching dispatch or experts. The registered names (`moe_keras>SoftmaxGate`
and so on) are those of the single-module `gates.py` before it, so older
`.keras` files load unchanged.
"""

from moe_keras.gates.base import Gate
from moe_keras.gates.base import top_k_indices
from moe_keras.gates.cluster import ClusterGate
from moe_keras.gates.expert_choice import ExpertChoiceGate
from moe_keras.gates.feature import FeatureGate
from moe_keras.gates.learned import ActivationGate
from moe_keras.gates.learned import NoisyTopKGate
from moe_keras.gates.learned import SigmoidGate
from moe_keras.gates.learned import SoftmaxGate
from moe_keras.gates.lookup import _GATES  # noqa: F401
from moe_keras.gates.lookup import get
from moe_keras.gates.rule import HashGate
from moe_keras.gates.rule import RandomGate
from moe_keras.gates.rule import RoundRobinGate
from moe_keras.gates.rule import UniformGate
from moe_keras.gates.rule import _FixedGate  # noqa: F401
from moe_keras.gates.static import PerformanceGate
from moe_keras.gates.static import StaticGate

__all__ = [
    "ActivationGate",
    "ClusterGate",
    "ExpertChoiceGate",
    "FeatureGate",
    "Gate",
    "HashGate",
    "NoisyTopKGate",
    "PerformanceGate",
    "RandomGate",
    "RoundRobinGate",
    "SigmoidGate",
    "SoftmaxGate",
    "StaticGate",
    "UniformGate",
    "get",
    "top_k_indices",
]
