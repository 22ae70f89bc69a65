"""Variables of one model's normalization layers, fitted to another model's layers.

Flax names a layer created without a name after its class and the order of
creation in its scope (`BatchNorm_0`, `BatchNorm_1`, ...), so the same network
built with `jaxrenorm.linen.BatchRenorm` stores its layers as `BatchRenorm_0`,
`BatchRenorm_1`, ...: a checkpoint of one does not load into the other by name.
`convert_variables` pairs the layers by their order instead, and adds or drops
what one kind of layer has and the other lacks (the `steps` counter, the gate
`rho`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrenorm._checks import check_converted_variables
from jaxrenorm._layers import step_count

#: Flax's automatic names of the normalization layers: the class name and an index.
_AUTOMATIC = re.compile(r"^(BatchNorm|BatchRenorm|InstanceRenorm)_(\d+)$")
#: Variables that one kind of normalization layer has and another lacks.
_KIND_SPECIFIC = frozenset({"steps", "rho"})


def automatic_norm_names(keys: list[str]) -> list[str]:
    """The automatic normalization-layer names among `keys`, in the order of creation.

    With one class, by index; with several, in the order of the dict, which is the
    order of creation in the variables `init` returns and in Flax's checkpoints.
    """
    names = [k for k in keys if isinstance(k, str) and _AUTOMATIC.match(k)]
    classes = {_AUTOMATIC.match(k).group(1) for k in names}
    if len(classes) == 1:
        return sorted(names, key=lambda k: int(_AUTOMATIC.match(k).group(2)))
    return names


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
