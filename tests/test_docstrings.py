"""Every public name has a Keras-style docstring, and its example runs.

The public names are `moe_keras.__all__` (its modules `losses` and
`kernels` stand for their public functions), and `moe_keras.hub.__all__`.
They are collected here, not listed, so that a name added later without
documentation fails.
"""

import doctest
import inspect
import re

import keras
import numpy as np
import pytest

import moe_keras
from moe_keras import hub

# Sections in the order the docstrings give them.
SECTIONS = (
    "Args",
    "Call arguments",
    "Input shape",
    "Output shape",
    "Returns",
    "Raises",
    "Example",
)


def _module_functions(module):
    """The public functions defined in `module` (not imported into it)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == module.__name__
    }


def _public_objects():
    """`(qualified name, object)` of every public name, each object once
    (`moe_keras.upcycle` is also `moe_keras.hub.upcycle`)."""
    named = []
    for name in moe_keras.__all__:
        value = getattr(moe_keras, name)
        if inspect.ismodule(value):
            named += [
                (f"moe_keras.{name}.{function}", obj)
                for function, obj in sorted(_module_functions(value).items())
            ]
        else:
            named.append((f"moe_keras.{name}", value))
    named += [
        (f"moe_keras.hub.{name}", getattr(hub, name)) for name in hub.__all__
    ]
    seen = set()
    unique = []
    for name, value in named:
        if id(value) not in seen:
            seen.add(id(value))
            unique.append((name, value))
    return unique


OBJECTS = _public_objects()
IDS = [name for name, _ in OBJECTS]

# Their examples build keras-hub models, or read classes that import it
# (as does any example that names `keras_hub`).
NEEDS_KERAS_HUB = {id(hub.sparsify), id(hub.custom_objects)}


def _sections(doc):
    """`{section title: its text}` of a Google-style docstring."""
    titles = "|".join(SECTIONS)
    parts = re.split(rf"^\s*({titles}):[ \t]*$", doc, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _parameters(obj):
    """The named parameters of a function, or of a class's constructor."""
    return [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def test_collects_every_kind_of_public_name():
    assert {"moe_keras.MoE", "moe_keras.hub.custom_objects"} <= set(IDS)
    assert "moe_keras.losses.load_balance_loss" in IDS
    assert "moe_keras.kernels.grouped_matmul" in IDS
    assert not any(name.split(".")[-1].startswith("_") for name in IDS)
    # The modules themselves say what they hold.
    for name in moe_keras.__all__:
        value = getattr(moe_keras, name)
        if inspect.ismodule(value):
            assert value.__doc__ and value.__doc__.strip(), name


@pytest.mark.parametrize("name, obj", OBJECTS, ids=IDS)
def test_docstring_has_keras_sections(name, obj):
    # `__doc__`, not `inspect.getdoc`: a class without its own docstring
    # must not pass on its base class's.
    doc = obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
    summary = doc.strip().splitlines()[0]
    assert summary.strip(), f"{name}: the docstring opens with a blank line"
    sections = _sections(doc)
    required = ["Example"]
    parameters = _parameters(obj)
    if parameters:
        required.append("Args")
    if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer):
        required += ["Input shape", "Output shape"]
    if inspect.isfunction(obj):
        required.append("Returns")
    missing = [title for title in required if title not in sections]
    assert not missing, f"{name} lacks the sections {missing}"
    present = [title for title in SECTIONS if title in sections]
    order = re.findall(rf"^\s*({'|'.join(SECTIONS)}):[ \t]*$", doc, re.M)
    assert order == present, f"{name}: sections out of order: {order}"
    if parameters:
        undocumented = [
            p.name
            for p in parameters
            if not re.search(rf"\b{p.name}\b", sections["Args"])
        ]
        assert not undocumented, f"{name}: `Args` misses {undocumented}"
    assert ">>>" in sections["Example"], f"{name}: the example is no doctest"


def _globs():
    names = {name: getattr(moe_keras, name) for name in moe_keras.__all__}
    return {"np": np, "keras": keras, "moe_keras": moe_keras, **names}


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="run on TensorFlow and torch: JAX's eager compiles of every "
    "example cost more of the suite's time than they check",
)
@pytest.mark.parametrize("name, obj", OBJECTS, ids=IDS)
def test_docstring_example_runs(name, obj):
    if id(obj) in NEEDS_KERAS_HUB or "keras_hub" in obj.__doc__:
        pytest.importorskip("keras_hub")
    test = doctest.DocTestParser().get_doctest(
        obj.__doc__,
        _globs(),
        name,
        inspect.getsourcefile(obj),
        inspect.getsourcelines(obj)[1],
    )
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    )
    report = []
    result = runner.run(test, out=report.append)
    assert result.attempted > 0, f"{name} has no example to run"
    assert result.failed == 0, "".join(report)
