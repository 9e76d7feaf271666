"""Adapters for keras-hub models: `sparsify` and `upcycle`.

keras-hub is imported only when these functions run, so `import moe_keras`
never needs it.
"""

from moe_keras.hub._sparsify import sparsify
from moe_keras.hub._upcycle import upcycle


def custom_objects():
    """The classes `sparsify` and `upcycle` build models from, by name.

    They are registered with Keras when `sparsify` or `upcycle` first runs;
    to load a converted model's `.keras` file in a new process, call this
    first (it registers them) or pass its result to
    `keras.saving.load_model(path, custom_objects=...)`.

    Returns:
        A dict mapping registered names (`"moe_keras>SparseMixtralBackbone"`
        ...) to classes.

    Raises:
        ImportError: keras-hub is not installed.

    Example:

    >>> objects = moe_keras.hub.custom_objects()
    >>> objects["moe_keras>SparseMixtralBackbone"].__name__
    'SparseMixtralBackbone'
    """
    import keras

    from moe_keras.hub import _sparse_families
    from moe_keras.hub import _upcycle_families

    objects = {}
    for module in (_sparse_families, _upcycle_families):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(
                value, keras.layers.Layer
            ):
                name = keras.saving.get_registered_name(value)
                if name.startswith("moe_keras>"):
                    objects[name] = value
    return objects


__all__ = ["custom_objects", "sparsify", "upcycle"]
