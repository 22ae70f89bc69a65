"""Griffe extension: the API pages show the signatures `help()` shows.

The docstrings need nothing: their argument sections are written into the
source (`jaxrenorm._docs`). Signatures do: where a constructor passes `**kwargs`
on to its base class's (the NNX `BatchRenorm` and `InstanceRenorm`), the
signature shows the base's arguments in their place, with their types and
defaults, as the argument section describes them. And the linen modules, which
Flax turns into dataclasses at run time, get the constructor signature of their
fields, whose defaults the argument sections then show as the NNX ones do. A name
a module imports through another private module (`Axes` in `jaxrenorm._norm`,
from `jaxrenorm._checks`, from `jaxrenorm.typing`) links to where it is defined.
"""

from __future__ import annotations

from typing import Any

import griffe


class RuntimeSignatures(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == "jaxrenorm":
            _link_through_imports(pkg, pkg)
            _spell_out_kwargs(pkg)
            for cls in pkg["linen"].classes.values():
                if not cls.name.startswith("_"):
                    _dataclass_signature(cls)


def _link_through_imports(obj: griffe.Object, pkg: griffe.Module) -> None:
    """Points each name in a signature at the object it finally names: griffe links a
    name by the path of its module's import, which may be another import."""
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_module or member.is_class:
            _link_through_imports(member, pkg)
        elif member.is_function:
            annotations = [p.annotation for p in member.parameters] + [member.returns]
            for annotation in annotations:
                if isinstance(annotation, griffe.Expr):
                    for part in annotation.iterate(flat=True):
                        if isinstance(part, griffe.ExprName):
                            _relink(part, pkg)


def _relink(name: griffe.ExprName, pkg: griffe.Module) -> None:
    # Follows the imports by their paths, resolving nothing: a resolved private
    # alias would be listed in objects.inv.
    path, hops = name.canonical_path, 0
    while path.startswith("jaxrenorm."):
        try:
            target = pkg[path.removeprefix("jaxrenorm.")]
        except (KeyError, griffe.AliasResolutionError):
            return
        if not target.is_alias:
            if hops and target.name == name.name:
                name.parent = target.parent  # where the name is defined
            return
        path, hops = target.target_path, hops + 1


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
