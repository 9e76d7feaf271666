"""The README's Python examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_quickstart_examples():
    assert len(_python_blocks()) >= 2


def test_readme_examples_run_and_train():
    namespace = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
        model = namespace["model"]
        # Every example model trains a step on inputs of its own shape.
        shape = (4,) + tuple(model.inputs[0].shape[1:])
        if "int" in str(model.inputs[0].dtype):
            x = np.random.randint(1, 100, size=shape)
        else:
            x = np.random.normal(size=shape).astype("float32")
        y = np.zeros((4,), "int32")
        history = model.fit(x, y, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
