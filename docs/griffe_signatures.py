"""Griffe extension: the API pages show the signatures `help()` shows.

The docstrings need nothing: their argument sections are written into the
source (`jaxrenorm._docs`). Signatures do: where a constructor passes `**kwargs`
on to its base class's (the NNX `BatchRenorm` and `InstanceRenorm`), the
signature shows the base's arguments in their place, with their types and
defaults, as the argument section describes them. And the linen modules, which
Flax turns into dataclasses at run time, get the constructor signature of their
fields.
"""

from __future__ import annotations

from typing import Any

import griffe


class RuntimeSignatures(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == "jaxrenorm":
            _spell_out_kwargs(pkg)
            for cls in pkg["linen"].classes.values():
                if not cls.name.startswith("_"):
                    _dataclass_signature(cls)


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
