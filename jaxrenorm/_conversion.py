"""Conversion between the normalization layers of a family, and from Flax's.

Both families convert a model built with one kind of layer (`flax.linen.BatchNorm`
or `flax.nnx.BatchNorm`, jaxrenorm's BatchNorm, BatchRenorm, InstanceRenorm) to
another, keeping every variable both kinds have, adding with its initial value
what only the new kind has (`steps` = 0, the gate `rho`) and dropping what only
the old kind has. What differs is where the layers live:

- linen (`convert_tree`, behind `jaxrenorm.linen.convert_variables`): layers are
  names in a variables tree. Flax names a layer created without a name after its
  class and the order of creation in its scope (`BatchNorm_0`, `BatchNorm_1`,
  ...), so the same network built with `jaxrenorm.linen.BatchRenorm` stores its
  layers as `BatchRenorm_0`, `BatchRenorm_1`, ...: a checkpoint of one does not
  load into the other by name. The layers are paired by their order instead.
- NNX (`convert_layers`, behind `jaxrenorm.nnx.convert`): layers are objects in
  the model's graph. Each is rebuilt with its constructor arguments and handed
  the old layer's `nnx.Variable`s, in place.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrenorm._checks import (
    check_convert_target,
    check_converted_variables,
    check_known_arguments,
)
from jaxrenorm._layers import step_count

# --- linen: a variables tree refitted ---------------------------------------------

#: Flax's automatic names of the normalization layers: the class name and an index.
_AUTOMATIC = re.compile(r"^(BatchNorm|BatchRenorm|InstanceRenorm)_(\d+)$")
#: Variables that one kind of normalization layer has and another lacks.
_KIND_SPECIFIC = frozenset({"steps", "rho"})


def automatic_norm_names(keys: list[str]) -> list[str]:
    """The automatic normalization-layer names among `keys`, in the order of creation.

    With one class, by index; with several, in the order of the dict, which is the
    order of creation in the variables `init` returns and in Flax's checkpoints.
    """
    matches = {k: m for k in keys if isinstance(k, str) and (m := _AUTOMATIC.match(k))}
    if len({m.group(1) for m in matches.values()}) == 1:
        return sorted(matches, key=lambda k: int(matches[k].group(2)))
    return list(matches)


def _where(*path: Any) -> str:
    """A path as the error lists it: its components joined by '/'."""
    return "/".join(str(p) for p in path) or "(the root)"


def convert_tree(source: Any, target: Any) -> Any:
    """`source`'s values in `target`'s structure (see `jaxrenorm.linen.convert_variables`)."""
    problems: list[str] = []
    converted = _convert(source, target, (), problems)
    check_converted_variables(problems)
    return converted


def _convert(source: Any, target: Any, path: tuple[str, ...], problems: list[str]) -> Any:
    if isinstance(target, Mapping):
        if not isinstance(source, Mapping):
            kind = type(source).__name__
            problems.append(f"{_where(*path)}: a dict in the target, {kind} in the source")
            return target
        return _convert_scope(source, target, path, problems)
    if _is_leaf(target):
        return _convert_leaf(source, target, path, problems)
    # Any other pytree node (a TrainState, an optax state, a tuple): its children,
    # found in the source by name (attribute, key or index; an orbax restore
    # without a target returns these nodes as dicts and lists) or by position.
    keyed, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda n: n is not target)
    children = []
    for key_path, child in keyed:
        name = _key_name(key_path[0])
        found = _source_child(source, name, len(children))
        if found is _MISSING:
            problems.append(f"{_where(*path, name)}: in the target, not in the source")
            children.append(child)
        else:
            children.append(_convert(found, child, (*path, name), problems))
    return jax.tree_util.tree_unflatten(treedef, children)


_MISSING = object()


def _key_name(key: Any) -> str:
    """A pytree key as a path component: the attribute, the dict key or the index."""
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _source_child(source: Any, name: str, index: int) -> Any:
    """The source's child called `name` (or at `index`), or `_MISSING`."""
    if isinstance(source, Mapping):
        return source.get(name, source.get(int(name), _MISSING) if name.isdigit() else _MISSING)
    if hasattr(source, name) and not isinstance(source, list | tuple):
        return getattr(source, name)
    if isinstance(source, list | tuple) and index < len(source):
        return source[index]
    return _MISSING


def _convert_scope(
    source: Mapping, target: Mapping, path: tuple[str, ...], problems: list[str]
) -> dict[str, Any]:
    """A dict: the normalization layers paired by order, every other key by name."""
    target_norms = automatic_norm_names(list(target))
    source_norms = automatic_norm_names(list(source))
    if len(target_norms) != len(source_norms):
        source_list, target_list = (", ".join(n) or "none" for n in (source_norms, target_norms))
        problems.append(
            f"{_where(*path)}: {len(source_norms)} normalization layers without a name in the "
            f"source ({source_list}), {len(target_norms)} in the target ({target_list})"
        )
        return dict(target)
    pairs = dict(zip(target_norms, source_norms, strict=True))
    is_layer = bool(_KIND_SPECIFIC & (set(target) ^ set(source))) and (
        _looks_like_layer(target) or _looks_like_layer(source) or _is_norm_path(path)
    )
    converted = {}
    for key, value in target.items():
        source_key = pairs.get(key, key)
        if source_key in source:
            converted[key] = _convert(source[source_key], value, (*path, str(key)), problems)
        elif is_layer and key in _KIND_SPECIFIC:
            converted[key] = _added(key, value, (*path, str(key)), problems)
        else:
            problems.append(f"{_where(*path, key)}: in the target, not in the source")
    # Every unnamed normalization layer is paired (the counts are equal); any other
    # key is kept when the target has it too.
    kept = set(pairs.values()) | set(target)
    for key in source:
        if key not in kept and not (is_layer and key in _KIND_SPECIFIC):
            problems.append(f"{_where(*path, key)}: in the source, not in the target")
    return converted


def _looks_like_layer(scope: Mapping) -> bool:
    """A normalization layer's variables: running statistics or scale and bias."""
    return {"mean", "var"} <= set(scope) or bool({"scale", "bias"} & set(scope))


def _is_norm_path(path: tuple[str, ...]) -> bool:
    return bool(path) and bool(_AUTOMATIC.match(path[-1]))


def _added(name: str, template: Any, path: tuple[str, ...], problems: list[str]) -> Any:
    """A variable only the target's layer has: `steps` starts at 0, `rho` at its init."""
    if name == "steps":
        return jnp.zeros(np.shape(template), jnp.int32)
    if isinstance(template, jax.ShapeDtypeStruct):
        problems.append(
            f"{_where(*path)}: the target gives only its shape; pass the variables `init` "
            "returns, whose value is the initial one"
        )
    return template


def _convert_leaf(source: Any, target: Any, path: tuple[str, ...], problems: list[str]) -> Any:
    if source is None or target is None:
        if (source is None) != (target is None):
            problems.append(f"{_where(*path)}: None on one side only")
        return source
    if _is_leaf(source) and np.shape(source) == np.shape(target):
        if path and path[-1] == "steps" and np.ndim(source) == 0:
            return step_count(source)
        return source
    shape = np.shape(source) if _is_leaf(source) else type(source).__name__
    where = _where(*path)
    problems.append(f"{where}: shape {np.shape(target)} in the target, {shape} in the source")
    return target


_LEAVES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, int, float)


def _is_leaf(value: Any) -> bool:
    return value is None or isinstance(value, _LEAVES)


# --- NNX: a model's layers rebuilt in place ------------------------------------------

#: What `convert_layers` hands from an old layer to its replacement, where both have it.
_VARIABLES = ("mean", "var", "scale", "bias", "steps", "rho")


def convert_layers(
    model: Any, to: type, overrides: dict[str, Any], layer_types: tuple[type, ...]
) -> Any:
    """`model` with every `layer_types` layer replaced by a `to` layer (`jaxrenorm.nnx.convert`).

    `layer_types` are the layers to replace (Flax's and the family's base), which
    `to` must subclass; `overrides` are `convert`'s keyword arguments.
    """
    check_convert_target(to, layer_types)
    accepted = _constructor_arguments(to, layer_types)
    arguments = [name for name in accepted if name != "num_features"]
    check_known_arguments(
        overrides,
        arguments,
        "convert",
        to.__name__,
        f"the overrides are its constructor arguments: {', '.join(sorted(arguments))}",
    )
    rngs = overrides.pop("rngs", None) or nnx.Rngs(0)
    new: dict[int, Any] = {}  # id(old layer) -> its replacement

    def replacement(old):
        if id(old) not in new:
            new[id(old)] = _rebuilt(old, to, accepted, overrides, rngs)
        return new[id(old)]

    if isinstance(model, layer_types):
        return replacement(model)
    while True:  # until no old layer is left (shared ones appear under one path per scan)
        created = {id(layer) for layer in new.values()}
        old = [
            (path, node)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, layer_types) and id(node) not in created
        ]
        if not old:
            break
        for path, node in old:
            model = _replaced(model, path, replacement(node))
    if not new:
        warnings.warn(
            "convert found no flax.nnx.BatchNorm and no jaxrenorm.nnx layer in the model; "
            "it is returned unchanged.",
            stacklevel=3,  # the line that called jaxrenorm.nnx.convert
        )
    return model


def _constructor_arguments(cls: type, layer_types: tuple[type, ...]) -> list[str]:
    """The named constructor arguments of `cls`, along its bases (which take **kwargs)."""
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, layer_types):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name != "self" and p.kind != inspect.Parameter.VAR_KEYWORD:
                    names[name] = None
    return list(names)


def _rebuilt(old: Any, to: type, accepted: list[str], overrides: dict, rngs: nnx.Rngs) -> Any:
    """A `to` layer with `old`'s settings and variables, and `overrides`."""
    settings = {
        name: getattr(old, name)
        for name in accepted
        if name not in ("num_features", "rngs") and hasattr(old, name)
    }
    layer = to(old.num_features, rngs=rngs, **(settings | overrides))
    for name in _VARIABLES:
        if getattr(old, name, None) is not None and getattr(layer, name, None) is not None:
            setattr(layer, name, getattr(old, name))
    return layer


def _replaced(root: Any, path: tuple, value: Any) -> Any:
    """`root` with the node at `path` replaced by `value` (in place where it can be)."""
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key] if _indexed(parent) else getattr(parent, key)
    key = path[-1]
    if isinstance(parent, tuple):  # immutable: replace the tuple in its own parent
        items = [value if i == key else item for i, item in enumerate(parent)]
        return _replaced(root, path[:-1], type(parent)(items))
    if _indexed(parent):
        parent[key] = value
    else:
        setattr(parent, key, value)
    return root


def _indexed(node: Any) -> bool:
    """Whether a graph node's children are items (lists, dicts) rather than attributes."""
    return isinstance(node, Mapping | Sequence) and not isinstance(node, str)
