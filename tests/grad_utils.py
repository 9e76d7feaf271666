"""Gradients of a function of arrays on whichever backend is active."""

import keras
import numpy as np


def gradients(fn, *args):
    """d sum(fn(*args) * cotangent) / d args, with a fixed random cotangent."""
    args = [np.asarray(a, "float32") for a in args]
    out_shape = tuple(keras.ops.shape(fn(*args)))
    cotangent = (
        np.random.RandomState(7).normal(size=out_shape).astype("float32")
    )
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = tf.reduce_sum(fn(*tensors) * cotangent)
        grads = tape.gradient(value, tensors)
        return [np.asarray(tf.convert_to_tensor(g)) for g in grads]
    if backend == "jax":
        import jax

        def scalar(*a):
            return (fn(*a) * cotangent).sum()

        grads = jax.grad(scalar, argnums=tuple(range(len(args))))(*args)
        return [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        value = (fn(*tensors) * torch.tensor(cotangent)).sum()
        grads = torch.autograd.grad(value, tensors)
        return [g.detach().cpu().numpy() for g in grads]
    raise NotImplementedError(backend)
