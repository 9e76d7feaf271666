"""Adapters for keras-hub models: `sparsify` and `upcycle`.

keras-hub is imported only when these functions run, or when a model they
made is loaded, so `import moe_keras` never needs it.
"""

from moe_keras.hub import _lazy
from moe_keras.hub._sparsify import sparsify
from moe_keras.hub._upcycle import upcycle

# A converted model's `.keras` file loads with a plain
# `keras.saving.load_model` after `import moe_keras`.
_lazy.register()


def custom_objects():
    """The classes `sparsify` and `upcycle` build models from, by name.

    A converted model's `.keras` file loads with a plain
    `keras.saving.load_model(path)` once `moe_keras` is imported (stand-ins
    registered at import bring keras-hub and these classes in when such a
    file is loaded); this dict is for code that wants the classes
    themselves, or passes `custom_objects=` explicitly.

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

    from moe_keras.hub import _common

    _common.import_keras_hub("hub.custom_objects")
    from moe_keras.hub import _sparse_families
    from moe_keras.hub import _sparse_gemma4
    from moe_keras.hub import _sparse_gpt_oss
    from moe_keras.hub import _sparse_qwen3_5_moe
    from moe_keras.hub import _upcycle_families

    objects = {}
    modules = (
        _sparse_families,
        _sparse_gpt_oss,
        _sparse_gemma4,
        _sparse_qwen3_5_moe,
        _upcycle_families,
    )
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(
                value, keras.layers.Layer
            ):
                name = keras.saving.get_registered_name(value)
                if name.startswith("moe_keras>"):
                    objects[name] = value
    return objects


__all__ = ["custom_objects", "sparsify", "upcycle"]
