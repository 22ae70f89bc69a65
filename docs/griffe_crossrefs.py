"""Griffe extension: names of the library in docstrings become links on the API pages.

A docstring names another part of the library as code, `jaxrenorm.batch_norm` or
`jaxrenorm.tools.recalibrate`, which `help()` shows as written. On the API pages
each such name that the reference documents becomes a cross-reference to its
entry (mkdocs-autorefs resolves it; `mkdocs build --strict` fails on a name that
has no entry), a module's name to its page. Names with a private part
(`jaxrenorm._xla.saved`) stay plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# `jaxrenorm.name` or `jaxrenorm.module.name`, with no private segment, in backticks.
NAME = re.compile(r"(?<![\[\w])`(jaxrenorm(?:\.[A-Za-z]\w*)*)`(?!\])")


class CrossReferences(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == "jaxrenorm":
            _link(pkg, pkg)


def _link(obj: griffe.Object, pkg: griffe.Module) -> None:
    if obj.docstring is not None:
        obj.docstring.value = NAME.sub(lambda m: _reference(m, pkg), obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias and (member.is_function or not member.name.startswith("__")):
            _link(member, pkg)  # a method's too: `__call__` is on the page


def _reference(match: re.Match, pkg: griffe.Module) -> str:
    path = match.group(1)
    try:
        target = pkg if path == "jaxrenorm" else pkg[path.removeprefix("jaxrenorm.")]
    except (KeyError, griffe.AliasResolutionError):
        return match.group(0)
    if target.is_module:
        # A module's page (docs/api/<name>.md, beside the page being rendered) shows
        # its members without a heading of its own to link to.
        page = "jaxrenorm" if path == "jaxrenorm" else path.split(".")[1]
        return f"[`{path}`]({page}.md)"
    return f"[`{path}`][{path}]"
