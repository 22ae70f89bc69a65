"""Griffe extension: the API pages show the docstrings and arguments `help()` shows.

The layers' and pure functions' argument sections are written at import time
from one table of descriptions (`jaxrenorm._docs`), which griffe's static
analysis of the source cannot see. After griffe has loaded the package, this
replaces every docstring that differs at run time by the run-time one, keeping
griffe's parser and source location. Where a constructor passes `**kwargs` on
to its base class's (the NNX `BatchRenorm` and `InstanceRenorm`), the signature
shows the base's arguments in their place, with their types and defaults, as the
argument section describes them. And the linen modules, which Flax turns into
dataclasses at run time, get the constructor signature of their fields.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == "jaxrenorm":
            _replace(pkg, importlib.import_module("jaxrenorm"))
            _spell_out_kwargs(pkg)
            for cls in pkg["linen"].classes.values():
                if not cls.name.startswith("_"):
                    _dataclass_signature(cls)


def _replace(obj: griffe.Object, runtime: Any) -> None:
    for name, member in obj.members.items():
        if member.is_alias or not (member.is_class or member.is_function or member.is_module):
            continue
        value = _member(runtime, name, member)
        if value is None:
            continue
        doc, old = inspect.getdoc(value), member.docstring
        if doc and old is not None and doc != inspect.cleandoc(old.value):
            member.docstring = griffe.Docstring(
                doc,
                lineno=old.lineno,
                endlineno=old.endlineno,
                parent=member,
                parser=old.parser,
                parser_options=old.parser_options,
            )
        if member.is_class or member.is_module:
            _replace(member, value)


def _member(runtime: Any, name: str, member: griffe.Object) -> Any:
    if member.is_module:
        try:
            return importlib.import_module(member.path)
        except ImportError:
            return None
    return inspect.getattr_static(runtime, name, None)


def _spell_out_kwargs(obj: griffe.Object) -> None:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_module:
            _spell_out_kwargs(member)
        elif member.is_class and "__init__" in member.members:
            _spell_out(member)


def _spell_out(cls: griffe.Class) -> None:
    init = cls.members["__init__"]
    params = list(init.parameters)
    if not params or params[-1].kind is not griffe.ParameterKind.var_keyword:
        return
    base = next((b for b in cls.mro() if "__init__" in b.members), None)
    if base is None:
        return
    _spell_out(base)
    names = {p.name for p in params}
    inherited = [
        p
        for p in base.members["__init__"].parameters
        if p.name not in names and p.kind is griffe.ParameterKind.keyword_only
    ]
    init.parameters = griffe.Parameters(*params[:-1], *inherited)


def _dataclass_signature(cls: griffe.Class) -> None:
    fields: dict[str, griffe.Parameter] = {}
    for base in reversed([cls, *cls.mro()]):
        for name, attr in base.members.items():
            if attr.is_attribute and attr.annotation is not None and attr.value is not None:
                fields[name] = griffe.Parameter(
                    name,
                    annotation=attr.annotation,
                    kind=griffe.ParameterKind.positional_or_keyword,
                    default=attr.value,
                )
    init = griffe.Function("__init__", parent=cls, parameters=griffe.Parameters(*fields.values()))
    cls.set_member("__init__", init)
