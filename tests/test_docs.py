"""The README and the docs site cannot rot.

Every ```python block of README.md and of the pages under docs/ is
executed separately, in a fresh namespace, as a user pasting it into a
new interpreter would: a block may not lean on the imports or variables
of the block before it. (In-process rather than one subprocess a block:
a fresh interpreter would re-import the backend for every block, several
seconds each, for no other difference.) The notebooks, which the docs
render, are executed as written by `tests/test_examples.py`.

Then the site itself: `mkdocs build --strict` fails on a broken link or
anchor, a reference mkdocstrings cannot resolve, or a docstring argument
the signature lacks; and every public name has a reference page.
"""

import importlib
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if "api" not in p.parts
)


def _python_blocks():
    """`(path, line number, source)` of every ```python block."""
    return [
        # Blocks inside list items are indented with their item.
        (
            path,
            text.count("\n", 0, match.start()) + 2,
            textwrap.dedent(match[1]),
        )
        for path in PAGES
        for text in [path.read_text()]
        for match in re.finditer(r"```python\n(.*?)```", text, re.S)
    ]


# A block shown on two pages (the README's quickstart is also the docs'
# quickstart) runs once.
BLOCKS = list(
    {source: (p, n, source) for p, n, source in _python_blocks()[::-1]}.values()
)[::-1]


def test_readme_has_quickstart_examples():
    assert sum(path == README for path, _, _ in BLOCKS) >= 2


@pytest.mark.parametrize(
    "path, line, source",
    BLOCKS,
    ids=[f"{path.relative_to(ROOT)}:{line}" for path, line, _ in BLOCKS],
)
def test_block_runs_alone(path, line, source):
    # A block for one backend says so on its first line, as a user would
    # read it: `# KERAS_BACKEND=jax`.
    wanted = re.match(r"# KERAS_BACKEND=(\w+)", source)
    if wanted and wanted.group(1) != keras.backend.backend():
        pytest.skip(f"the block at {path.name}:{line} is for {wanted[1]}")
    namespace = {"__name__": "__readme__"}
    # Blank lines in front keep tracebacks pointing at the page's lines.
    code = compile("\n" * (line - 1) + source, str(path), "exec")
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
            f"the block at {path.name}:{line} compiles a model but never "
            "trains it"
        )
        history = getattr(model, "history", None)
        if history is not None and history.history.get("loss"):
            assert np.all(np.isfinite(history.history["loss"]))


def _public_names():
    """Every public name: `moe_keras.__all__`, the public functions of
    its modules `losses` and `kernels`, and `moe_keras.hub.__all__`."""
    import moe_keras
    import moe_keras.hub

    names = set()
    for name in moe_keras.__all__:
        obj = getattr(moe_keras, name)
        if isinstance(obj, type(moe_keras)):  # a module
            for attr, value in vars(obj).items():
                if not attr.startswith("_") and callable(value):
                    if getattr(value, "__module__", None) == obj.__name__:
                        names.add(f"moe_keras.{name}.{attr}")
        else:
            names.add(f"moe_keras.{name}")
    names.update(f"moe_keras.hub.{name}" for name in moe_keras.hub.__all__)
    return sorted(names)


def test_every_public_name_has_a_reference_page():
    directives = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        directives.update(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    # The top-level sparsify/upcycle are the hub's, documented there.
    aliases = {"moe_keras.sparsify": "moe_keras.hub.sparsify",
               "moe_keras.upcycle": "moe_keras.hub.upcycle"}  # fmt: skip
    missing = [
        name
        for name in _public_names()
        if aliases.get(name, name) not in directives
        and name.rpartition(".")[0] not in directives  # a whole module
    ]
    assert not missing, f"public names without a reference page: {missing}"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the site does not depend on the backend: built once",
)
def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    importlib.import_module("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
         str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    warnings = [
        line for line in result.stderr.splitlines() if "WARNING" in line
    ]
    assert result.returncode == 0, "\n".join(warnings) or result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "layers" / "index.html").exists()


def test_readme_links_resolve():
    # The site's links are checked by `mkdocs build --strict`; the README
    # is not part of the site, so its own links are checked here.
    text = README.read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", title).strip().lower().replace(" ", "-")
        for title in re.findall(r"^#+ (.+)$", text, re.M)
    }
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path and not (ROOT / path).exists():
            broken.append(target)
        elif not path and anchor not in anchors:
            broken.append(target)
    assert not broken, f"README links that lead nowhere: {broken}"
