"""`run_layer_test`: one call that checks a layer's whole Keras contract.

In the spirit of Keras' own `TestCase.run_layer_test`: build, shapes and
dtypes, weight counts, config round trip, `.keras` round trip with equal
predictions, a training step that moves every trainable weight, and a
mixed-precision call.
"""

import json
import os

import keras
import numpy as np


def _inputs(input_shape, seed=0):
    return (
        np.random.RandomState(seed).normal(size=input_shape).astype("float32")
    )


def reload_keras_file(model, x, tmp_path):
    """Saves `model` to a `.keras` file and loads it back: the reloaded
    model has the same config (to the JSON) and predicts `x` exactly as
    `model` does. Returns the reloaded model."""
    before = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert json.dumps(reloaded.get_config(), sort_keys=True) == json.dumps(
        model.get_config(), sort_keys=True
    )
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), before)
    return reloaded


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    expected_num_trainable_weights,
    tmp_path,
    expected_num_losses=0,
    expected_num_non_trainable_weights=0,
    check_training=True,
    check_mixed_precision=True,
    mixed_precision_output_dtype="float16",
):
    x = _inputs(input_shape)

    # Build and call, eagerly.
    layer = layer_cls(**init_kwargs)
    y = layer(x)
    assert tuple(y.shape) == tuple(expected_output_shape)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert (
        len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    )

    # Symbolic call agrees with the eager one.
    symbolic = layer_cls(**init_kwargs)(keras.Input(input_shape[1:]))
    assert tuple(symbolic.shape)[1:] == tuple(expected_output_shape)[1:]

    # Config round trip is the identity.
    config = layer.get_config()
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config

    # Losses: only in training.
    layer(x, training=True)
    assert len(layer.losses) == expected_num_losses

    # `.keras` round trip gives identical predictions.
    inputs = keras.Input(input_shape[1:])
    model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
    before = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "layer.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), before)

    if check_training:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        old = [np.array(w) for w in model.trainable_weights]
        target = _inputs(tuple(expected_output_shape), seed=1)
        model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)
        for w, w_old in zip(model.trainable_weights, old):
            assert not np.allclose(np.array(w), w_old), (
                f"training did not change {w.path}"
            )

    if check_mixed_precision:
        try:
            keras.config.set_dtype_policy("mixed_float16")
            mp_layer = layer_cls(**init_kwargs)
            y = mp_layer(x)
            assert (
                keras.backend.standardize_dtype(y.dtype)
                == mixed_precision_output_dtype
            )
            for w in mp_layer.weights:
                assert keras.backend.standardize_dtype(w.dtype) == "float32"
        finally:
            keras.config.set_dtype_policy("float32")
