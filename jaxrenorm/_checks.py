"""Argument validation, run at trace time so errors name what the caller passed.

Every check here looks only at shapes, dtypes and concrete Python values, so it
costs nothing in the compiled program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def canonical_axes(ndim: int, axis: Axes, name: str = "axis") -> tuple[int, ...]:
    """Returns `axis` as a sorted tuple of non-negative ints, or raises naming `name`."""
    if isinstance(axis, int | np.integer):
        axes = (axis,)
    elif isinstance(axis, Sequence):
        axes = tuple(axis)
    else:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
    if not axes:
        raise ValueError(f"`{name}` must name at least one axis, got {axis!r}.")
    out = []
    for ax in axes:
        if not isinstance(ax, int | np.integer):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"`{name}`={axis!r} is out of range for an input of rank {ndim}; "
                f"valid axes are {-ndim}..{ndim - 1}."
            )
        out.append(int(ax) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis!r} names the same axis twice (rank {ndim}).")
    return tuple(sorted(out))


def check_input(x: Any, name: str = "x") -> jax.Array:
    """Returns `x` as an array; raises TypeError unless it is real or complex floating."""
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"`{name}` must be a floating-point array, got dtype {x.dtype} with shape "
            f"{x.shape}; cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have at least one axis, got a scalar.")
    return x


def check_layout(shape: tuple[int, ...], axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Splits the axes of `shape` into (feature_axes, reduction_axes)."""
    feature_axes = canonical_axes(len(shape), axis)
    reduction_axes = tuple(i for i in range(len(shape)) if i not in feature_axes)
    if not reduction_axes:
        raise ValueError(
            f"`axis`={axis!r} makes every axis of the input (shape {shape}) a feature axis, "
            "leaving nothing to compute batch statistics over."
        )
    return feature_axes, reduction_axes


def check_feature_array(
    value: Any, name: str, feature_shape: tuple[int, ...], x_shape: tuple[int, ...], axis: Axes
) -> jax.Array:
    """Checks that a per-feature array (scale, bias, mean, var) has the feature shape."""
    value = jnp.asarray(value)
    if value.shape != feature_shape:
        raise ValueError(
            f"`{name}` has shape {value.shape}, but an input of shape {x_shape} with "
            f"axis={axis!r} has feature shape {feature_shape}."
        )
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        raise TypeError(f"`{name}` must be floating point, got dtype {value.dtype}.")
    return value


def check_params(
    params: Mapping[str, Any] | None,
    feature_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    axis: Axes,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Returns (scale, bias), each None when absent."""
    if params is None:
        return None, None
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`params` must be a mapping with optional 'scale' and 'bias', got {type(params)}."
        )
    unknown = set(params) - {"scale", "bias"}
    if unknown:
        raise ValueError(
            f"`params` has unexpected keys {sorted(unknown)}; only 'scale' and 'bias' are used."
        )
    out = []
    for key in ("scale", "bias"):
        value = params.get(key)
        out.append(
            None
            if value is None
            else check_feature_array(value, f'params["{key}"]', feature_shape, x_shape, axis)
        )
    return out[0], out[1]


def check_batch_stats(
    batch_stats: Mapping[str, Any],
    feature_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    axis: Axes,
) -> tuple[jax.Array, jax.Array]:
    """Returns (mean, var) from a `batch_stats` mapping."""
    if not isinstance(batch_stats, Mapping) or not {"mean", "var"} <= set(batch_stats):
        got = sorted(batch_stats) if isinstance(batch_stats, Mapping) else type(batch_stats)
        raise ValueError(
            "`batch_stats` must be a mapping with 'mean' and 'var' "
            f"(see `jaxrenorm.init_batch_stats`), got {got}."
        )
    mean = check_feature_array(
        batch_stats["mean"], 'batch_stats["mean"]', feature_shape, x_shape, axis
    )
    var = check_feature_array(
        batch_stats["var"], 'batch_stats["var"]', feature_shape, x_shape, axis
    )
    return mean, var


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array:
    """Returns `mask` as a boolean array broadcastable to the input's shape."""
    mask = jnp.asarray(mask)
    if mask.ndim > len(x_shape) or any(
        m not in (1, s) for m, s in zip(mask.shape[::-1], x_shape[::-1], strict=False)
    ):
        raise ValueError(
            f"`mask` of shape {mask.shape} does not broadcast to the input's shape {x_shape}."
        )
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _concrete(value: Any) -> float | None:
    """The Python value of a concrete scalar, or None when it is traced."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_scalar(value: Any, name: str, low: float, high: float | None = None) -> None:
    """Raises if a concrete scalar lies outside [low, high]; traced values pass."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}.")
    v = _concrete(value)
    if v is None:
        return
    if not (v >= low and (high is None or v <= high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}, got {v}.")


def check_virtual_batch(v: Any, x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> None:
    """Virtual batches split axis 0 into groups of `v` examples."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ValueError(f"`virtual_batch_size` must be a positive int, got {v!r}.")
    if 0 in feature_axes:
        raise ValueError(
            "`virtual_batch_size` groups examples along axis 0, which `axis` makes a "
            f"feature axis (input shape {x_shape})."
        )
    if x_shape[0] % v:
        raise ValueError(
            f"`virtual_batch_size`={v} does not divide the batch size {x_shape[0]} "
            f"(axis 0 of the input, shape {x_shape})."
        )
