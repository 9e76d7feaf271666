"""The README's Python examples run as written, each on its own.

Every ```python block is executed separately, in a fresh namespace, as a
user pasting it into a new interpreter would: a block may not lean on the
imports or variables of the block before it. (In-process rather than one
subprocess a block: a fresh interpreter would re-import the backend for
every block, several seconds each, for no other difference.) The
notebooks, which the README also points to, are executed as written by
`tests/test_examples.py`.
"""

import pathlib
import re
import textwrap

import keras
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    """`(line number, source)` of every ```python block."""
    text = README.read_text()
    return [
        # Blocks inside list items are indented with their item.
        (text.count("\n", 0, match.start()) + 2, textwrap.dedent(match[1]))
        for match in re.finditer(r"```python\n(.*?)```", text, re.S)
    ]


BLOCKS = _python_blocks()


def test_readme_has_quickstart_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize(
    "line, source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS]
)
def test_readme_block_runs_alone(line, source):
    # A block for one backend says so on its first line, as a user would
    # read it: `# KERAS_BACKEND=jax`.
    wanted = re.match(r"# KERAS_BACKEND=(\w+)", source)
    if wanted and wanted.group(1) != keras.backend.backend():
        pytest.skip(f"the README block at line {line} is for {wanted[1]}")
    namespace = {"__name__": "__readme__"}
    # Blank lines in front keep tracebacks pointing at README.md lines.
    code = compile("\n" * (line - 1) + source, str(README), "exec")
    try:
        exec(code, namespace)
    finally:
        # A block may set a global distribution; the next one starts
        # without it, as in a fresh interpreter.
        keras.distribution.set_distribution(None)
    model = namespace.get("model")
    if model is not None and getattr(model, "optimizer", None) is not None:
        # A block that compiles a model also trains it, as written.
        assert (
            int(keras.ops.convert_to_numpy(model.optimizer.iterations)) > 0
        ), (
            f"the README block at line {line} compiles a model but never "
            "trains it"
        )
        history = getattr(model, "history", None)
        if history is not None and history.history.get("loss"):
            assert np.all(np.isfinite(history.history["loss"]))
