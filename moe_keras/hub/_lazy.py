"""Converted keras-hub models load with a plain `keras.saving.load_model`.

Their classes subclass keras-hub's, so they can only be defined once
keras-hub is imported, which `import moe_keras` does not do. Instead each
registered name gets a stand-in here: Keras finds it by the name written
in the `.keras` file, and its `from_config` imports the module that
defines the real class (and keras-hub with it), which registers the real
class over the stand-in, then builds from it. A process that never loads
such a model never imports keras-hub.
"""

import importlib

import keras

# Registered name -> the module of this package that defines it. A test
# checks this against the classes those modules register.
LAZY_CLASSES = {
    "SparseMixtralBackbone": "_sparse_families",
    "SparseMixtralMoeBlock": "_sparse_families",
    "SparseQwen3MoeBackbone": "_sparse_families",
    "SparseQwen3MoeBlock": "_sparse_families",
    "SparseQwenMoeBackbone": "_sparse_families",
    "SparseQwenMoeBlock": "_sparse_families",
    "SparseGptOssBackbone": "_sparse_gpt_oss",
    "SparseGptOssMoeBlock": "_sparse_gpt_oss",
    "SparseGemma4Backbone": "_sparse_gemma4",
    "SparseGemma4MoEBlock": "_sparse_gemma4",
    "Gemma4RouterInputs": "_sparse_gemma4",
    "SparseQwen3_5MoeBackbone": "_sparse_qwen3_5_moe",
    "SparseQwen3_5MoeBlock": "_sparse_qwen3_5_moe",
    "FullLike": "_upcycle_families",
    "OnesLike": "_upcycle_families",
    "Scale": "_upcycle_families",
    "UpcycledFalconBackbone": "_upcycle_families",
    "UpcycledGPT2Backbone": "_upcycle_families",
    "UpcycledGPTNeoXBackbone": "_upcycle_families",
    "UpcycledGemma3Backbone": "_upcycle_families",
    "UpcycledGemmaBackbone": "_upcycle_families",
    "UpcycledLlama3Backbone": "_upcycle_families",
    "UpcycledLlamaBackbone": "_upcycle_families",
    "UpcycledMistralBackbone": "_upcycle_families",
    "UpcycledOPTBackbone": "_upcycle_families",
    "UpcycledPhi3Backbone": "_upcycle_families",
    "UpcycledQwen3Backbone": "_upcycle_families",
    "UpcycledQwen3_5Backbone": "_upcycle_families",
    "UpcycledQwenBackbone": "_upcycle_families",
    "UpcycledSmolLM3Backbone": "_upcycle_families",
}


def _real_class(name):
    try:
        import keras_hub  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"This model holds `{name}`, a keras-hub model converted by "
            "moe_keras; loading it needs keras-hub: `pip install "
            "keras-hub>=0.32`."
        ) from error
    module = importlib.import_module(f"moe_keras.hub.{LAZY_CLASSES[name]}")
    return getattr(module, name)


def _stand_in(name):
    def from_config(cls, config):
        return _real_class(name).from_config(config)

    def get_config(self):  # never made: `from_config` returns the real one
        raise NotImplementedError

    return type(
        name,
        (),
        {
            "from_config": classmethod(from_config),
            "get_config": get_config,
            "__doc__": f"Stands in for `{name}` until keras-hub is imported.",
        },
    )


def register():
    """Registers a stand-in for each class not registered yet."""
    objects = keras.saving.get_custom_objects()
    for name in LAZY_CLASSES:
        objects.setdefault(f"moe_keras>{name}", _stand_in(name))
