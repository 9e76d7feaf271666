"""A griffe extension: Keras-style `Example:` sections as examples.

Keras writes `Example:` followed by unindented `>>>` lines; the Google
parser mkdocstrings uses reads `Examples:` with an indented body, and
would render the Keras form as loose text. This rewrites the former into
the latter when the API pages are built; the docstrings stay as Keras
writes them (and run as doctests in `tests/test_docstrings.py`).
"""

import re

import griffe

# A section title of its own at the left margin ("Args:", "Returns:").
_SECTION = re.compile(r"^[A-Z][\w ]*:\s*$")


def keras_examples_to_google(text):
    lines = text.split("\n")
    out, inside = [], False
    for line in lines:
        if line.strip() in ("Example:", "Examples:") and not line[:1].isspace():
            out.append("Examples:")
            inside = True
            continue
        if inside and _SECTION.match(line):
            inside = False
        if inside and not line.strip() and out[-1] == "Examples:":
            continue  # the body starts right under its title
        out.append("    " + line if inside and line.strip() else line)
    return "\n".join(out)


class KerasExamples(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = keras_examples_to_google(obj.docstring.value)
