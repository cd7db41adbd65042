"""Griffe extension: a Google-style ``Example:`` heading is read as ``Examples:``.

The code's docstrings title their doctests ``Example:``; griffe reads only ``Examples:`` as a
doctest section (``Example:`` becomes an admonition whose ``>>>`` lines Markdown would quote).
The docstrings are read, not changed.
"""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleHeadings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):  # noqa: ARG002 - griffe passes more
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
