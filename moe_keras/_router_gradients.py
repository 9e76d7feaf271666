"""The gradient that reaches each MoE layer's router.

Keras callbacks never see gradients, and a JAX train step is stateless (a
layer cannot keep anything from its backward pass), so the gradient is
measured apart from `fit`: one forward and backward pass of the model's
training loss on a batch, with the backend's own autodiff. The forward
pass runs in a `keras.StatelessScope`, so it changes nothing in the
model (routing statistics, selection biases, dropout seeds and other
state assigned in `call` stay as they were).
"""

import weakref

import keras
import numpy as np
from keras import ops


def router_gradient_norms(model, x, y=None, sample_weight=None):
    """The norm of the training loss's gradient on each MoE layer's router.

    The loss is the one `fit` minimises, `model.compute_loss` in training
    mode: the compiled loss plus every loss the layers add (the MoE
    layers' load-balance and z-losses among them). A router that no loss
    reaches has gradient 0: a top-1 layer whose gate weight is
    renormalised to 1 gets nothing from the task loss, so only its
    auxiliary losses can train its router. `"auxiliary"` is the gradient
    of the added losses alone (`sum(model.losses)`), to tell the two
    apart. The model is not changed, and nothing is compiled: the pass
    runs eagerly, once per call.

    Args:
        model: a compiled Keras model with `MoE` layers.
        x: one batch of model inputs (what `fit` takes as `x`).
        y: its targets. Defaults to `None`.
        sample_weight: optional per-sample weights. Defaults to `None`.

    Returns:
        dict mapping each `MoE` layer's name whose router has trainable
        weights to `{"total": float, "auxiliary": float}`, the global L2
        norms of the two gradients over the router's trainable weights.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), MoE(4, 2, top_k=2, name="moe")]
    ... )
    >>> model.compile("sgd", "mse")
    >>> x, y = np.random.rand(8, 4), np.random.rand(8, 2)
    >>> norms = moe_keras.router_gradient_norms(model, x, y)
    >>> sorted(norms["moe"])
    ['auxiliary', 'total']
    >>> norms["moe"]["total"] > 0
    True
    """
    from moe_keras.callbacks import _moe_layers

    if not getattr(model, "compiled", False):
        raise ValueError(
            "router_gradient_norms() differentiates the model's training "
            "loss: compile the model first."
        )
    routers = {}
    for layer in _moe_layers(model, "router_gradient_norms"):
        if layer.gate.trainable_weights:
            routers[layer.name] = layer.gate.trainable_weights
    if not routers:
        return {}
    x, y, sample_weight = keras.tree.map_structure(
        _tensor, (x, y, sample_weight)
    )
    variables = [v for weights in routers.values() for v in weights]
    wanted = {id(v) for v in variables}
    others = [v for v in model.trainable_variables if id(v) not in wanted]
    fixed = model.non_trainable_variables + others + model.metrics_variables

    # A weak reference: the JAX cache keeps this function, and must not
    # keep the model alive.
    model_ref = weakref.ref(model)

    def losses(values, fixed_values, x, y, sample_weight):
        model = model_ref()
        mapping = list(zip(fixed, fixed_values)) + list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = model(x, training=True)
            total = model.compute_loss(
                x, y, y_pred, sample_weight, training=True
            )
            added = model.losses
            auxiliary = ops.sum(ops.stack(added)) if added else 0.0
        return ops.cast(total, "float32"), ops.cast(auxiliary, "float32")

    values = [ops.convert_to_tensor(v.value) for v in variables]
    inputs = ([v.value for v in fixed], x, y, sample_weight)
    key = tuple(id(v) for v in variables + fixed)
    gradients = _GRADIENTS[keras.backend.backend()](
        model, key, losses, values, inputs
    )
    out, start = {}, 0
    for name, weights in routers.items():
        end = start + len(weights)
        out[name] = {
            kind: _norm(grads[start:end])
            for kind, grads in zip(("total", "auxiliary"), gradients)
        }
        start = end
    return out


def _tensor(value):
    return None if value is None else ops.convert_to_tensor(value)


def _norm(gradients):
    squares = [
        np.sum(np.square(np.asarray(ops.convert_to_numpy(g), "float64")))
        for g in gradients
        if g is not None
    ]
    return float(np.sqrt(np.sum(squares)))


def _tensorflow(model, key, losses, values, inputs):
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(values)
        total, auxiliary = losses(values, *inputs)
    return tape.gradient(total, values), tape.gradient(auxiliary, values)


# One compiled function per model (while its variables stay the same): a
# JAX model run eagerly compiles each of its operations on first use,
# which takes far longer than compiling the pass once.
_JAX_FUNCTIONS = weakref.WeakKeyDictionary()


def _jax(model, key, losses, values, inputs):
    import jax
    import jax.numpy as jnp

    cached = _JAX_FUNCTIONS.get(model)
    if cached is None or cached[0] != key:

        def gradients(values, *inputs):
            def stacked(values):
                return jnp.stack(losses(values, *inputs))

            _, pullback = jax.vjp(stacked, values)
            unit = jnp.eye(2, dtype="float32")
            return [pullback(unit[i])[0] for i in range(2)]

        cached = (key, jax.jit(gradients))
        _JAX_FUNCTIONS[model] = cached
    return cached[1](values, *inputs)


def _torch(model, key, losses, values, inputs):
    import torch

    values = [v.detach().clone().requires_grad_(True) for v in values]
    total, auxiliary = losses(values, *inputs)
    gradients = []
    for loss in (total, auxiliary):
        if not torch.is_tensor(loss) or not loss.requires_grad:
            gradients.append([None] * len(values))
            continue
        gradients.append(
            torch.autograd.grad(
                loss, values, retain_graph=True, allow_unused=True
            )
        )
    return gradients


_GRADIENTS = {"tensorflow": _tensorflow, "jax": _jax, "torch": _torch}
