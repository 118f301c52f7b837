"""A griffe extension: show the reStructuredText bits of our docstrings as Markdown.

The docstrings are written for Python's ``help()`` and Sphinx-style readers
(``:class:`Message```, ``Example::``); mkdocstrings renders Markdown.  This
turns the roles into code spans and ``::`` into ``:`` so the API pages read
cleanly, without changing a single docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


def to_markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return _LITERAL.sub(r"\1:", text)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring once, when griffe has loaded its object."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
