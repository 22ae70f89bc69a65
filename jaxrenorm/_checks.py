"""Argument validation, run at trace time so errors name what the caller passed.

Every error the library raises is raised here: each check is a function that the
public entry points call, so one message serves every caller and
docs/errors.md lists it once. The checks look only at shapes, dtypes and
concrete Python values, so they cost nothing in the compiled program.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from jaxrenorm.typing import Axes


class Layout(NamedTuple):
    """An input's axes: the feature axes, and the axes its statistics reduce over."""

    shape: tuple[int, ...]
    axis: Axes  # as the caller wrote it, for messages
    feature_axes: tuple[int, ...]  # sorted, non-negative
    reduction_axes: tuple[int, ...]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.feature_axes)

    @property
    def context(self) -> str:
        """How messages describe the input: "an input of shape (8, 4) with axis=-1"."""
        return f"an input of shape {self.shape} with axis={self.axis!r}"


# --- inputs and their axes ----------------------------------------------------


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


def check_layout(x: Any, axis: Axes, named_axes: bool = False) -> tuple[jax.Array, Layout]:
    """Checks the input and `axis`; returns the input as an array and its `Layout`.

    With `named_axes` (an `axis_name` is set) the input may have no axis to reduce:
    one example's features, under a `vmap` or `pmap` whose named axes hold the batch.
    """
    x = check_input(x)
    feature_axes = canonical_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    if not reduction_axes and not named_axes:
        raise ValueError(
            f"`axis`={axis!r} makes every axis of the input (shape {x.shape}) a feature axis, "
            "leaving nothing to compute batch statistics over. One example's features "
            "(a function `vmap`ped over the batch) need `axis_name`, the named axis the "
            "statistics are computed over."
        )
    return x, Layout(x.shape, axis, feature_axes, reduction_axes)


def check_instance_layout(layout: Layout) -> None:
    """Instance statistics need axis 0 as the batch and at least one spatial axis."""
    if 0 in layout.feature_axes or len(layout.reduction_axes) < 2:
        raise ValueError(
            "Instance normalization needs axis 0 as the batch axis and at least one "
            "spatial axis (neither batch nor feature), e.g. an input of shape (N, H, W, C) "
            f"with axis=-1; got an input of shape {layout.shape} with axis={layout.axis!r}."
        )


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array:
    """Returns `mask` as a boolean array broadcastable to the input's shape."""
    mask = jnp.asarray(mask)
    if not _broadcasts(mask.shape, x_shape):
        raise ValueError(
            f"`mask` of shape {mask.shape} does not broadcast to the input's shape {x_shape}."
        )
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of `shape` broadcasts to `target` (NumPy's rules, one way)."""
    return len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)
    )


def check_shift(shift: Any, result_shape: tuple[int, ...]) -> jax.Array:
    """`moments`' shift broadcasts to the shape of its results; returned at that shape."""
    shift = jnp.asarray(shift)
    if not _broadcasts(shift.shape, result_shape):
        raise ValueError(
            f"`shift` of shape {shift.shape} does not broadcast to the shape of the "
            f"results, {result_shape} (the input's shape without `axes`)."
        )
    return jnp.broadcast_to(shift, result_shape)


# --- per-feature arrays -------------------------------------------------------


def check_feature_array(
    value: Any, name: str, feature_shape: tuple[int, ...], context: str
) -> jax.Array:
    """Checks a per-feature array (scale, bias, rho, mean, var): feature shape, floating.

    `context` says where the feature shape comes from, e.g. `Layout.context`.
    """
    value = jnp.asarray(value)
    if value.shape != feature_shape:
        raise ValueError(
            f"`{name}` has shape {value.shape}, but {context} has feature shape {feature_shape}."
        )
    return check_input(value, name)


def check_params(
    params: Mapping[str, Any] | None,
    feature_shape: tuple[int, ...],
    context: str,
    *,
    gate: bool = False,
) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """Returns (scale, bias, rho), each None when absent; `gate` requires `params["rho"]`."""
    if gate and (not isinstance(params, Mapping) or params.get("rho") is None):
        got = sorted(params) if isinstance(params, Mapping) else type(params)
        raise ValueError(
            f'`params` must hold the gate "rho" (feature-shaped) for instance_renorm, got {got}.'
        )
    if params is None:
        return None, None, None
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`params` must be a mapping with optional 'scale' and 'bias', got {type(params)}."
        )
    keys = ("scale", "bias", "rho") if gate else ("scale", "bias")
    unknown = set(params) - set(keys)
    if unknown:
        raise ValueError(
            f"`params` has unexpected keys {sorted(unknown)}; only 'scale' and 'bias' are used"
            + (" (with the gate 'rho')." if gate else ".")
        )
    checked = {
        key: check_feature_array(params[key], f'params["{key}"]', feature_shape, context)
        for key in keys
        if params.get(key) is not None
    }
    return checked.get("scale"), checked.get("bias"), checked.get("rho")


def check_batch_stats(
    batch_stats: Mapping[str, Any], feature_shape: tuple[int, ...], context: str
) -> tuple[jax.Array, jax.Array]:
    """Returns (mean, var) from a `batch_stats` mapping."""
    if not isinstance(batch_stats, Mapping) or not {"mean", "var"} <= set(batch_stats):
        got = sorted(batch_stats) if isinstance(batch_stats, Mapping) else type(batch_stats)
        raise ValueError(
            "`batch_stats` must be a mapping with 'mean' and 'var' "
            f"(see `jaxrenorm.init_batch_stats`), got {got}."
        )
    mean, var = (
        check_feature_array(batch_stats[key], f'batch_stats["{key}"]', feature_shape, context)
        for key in ("mean", "var")
    )
    return mean, var


def check_feature_shape(feature_shape: int | Sequence[int]) -> tuple[int, ...]:
    """Returns a feature shape (an int or a sequence of them) as a tuple of ints >= 0."""
    is_int = lambda s: isinstance(s, int | np.integer) and not isinstance(s, bool)  # noqa: E731
    shape = (feature_shape,) if not isinstance(feature_shape, Sequence) else tuple(feature_shape)
    if not all(is_int(s) and s >= 0 for s in shape):
        raise ValueError(
            f"`feature_shape` must be a non-negative int or tuple of them, got {feature_shape!r}."
        )
    return tuple(int(s) for s in shape)


# --- settings -----------------------------------------------------------------


def check_floating_dtype(dtype: Any, name: str = "dtype") -> None:
    """Raises unless `dtype` is a real or complex floating-point dtype."""
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"`{name}` must be a floating-point dtype, got {jnp.dtype(dtype).name}.")


def _concrete(value: Any) -> float | None:
    """The Python value of a concrete scalar, or None when it is traced."""
    if isinstance(value, Tracer):  # cheaper than the error float() raises
        return None
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


def check_positive_int(value: Any, name: str) -> None:
    """Raises unless `value` is a positive Python or NumPy int (not a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_divisor(value: int, total: int, name: str, total_name: str) -> None:
    """Raises unless the positive int `value` divides `total` (groups of equal size)."""
    if total % value:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(
            f"`{name}` ({value}) must divide `{total_name}` ({total}): groups of equal "
            f"size; divisors of {total}: {divisors}."
        )


def check_schedule(schedule: Any, name: str) -> None:
    """Raises unless `schedule` is callable (a function of the step)."""
    if not callable(schedule):
        raise TypeError(f"`{name}` must be a schedule (a function of the step), got {schedule!r}.")


def check_path_patterns(patterns: Sequence[Any], caller: str) -> None:
    """Raises unless every pattern is a string that compiles as a regular expression."""
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"{caller}: the paths must be strings (regular expressions), got {pattern!r}."
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{caller}: {pattern!r} is not a regular expression: {e}.") from e


def check_renorm(r_max: Any, d_max: Any, dtype: jnp.dtype, caller: str) -> None:
    """Batch Renormalization's bounds, and a real input (r and d are clipped as reals)."""
    check_scalar(r_max, "r_max", 1.0)
    check_scalar(d_max, "d_max", 0.0)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{caller} does not support complex inputs (r and d are clipped as real numbers), "
            f"got dtype {jnp.dtype(dtype).name}; BatchNorm (batch_norm or the BatchNorm "
            "modules) supports them."
        )


def check_moment_gradient(value: Any) -> None:
    """`grad_through_batch_moments`: True, False or "adaptive"."""
    if not (isinstance(value, bool | np.bool_) or (isinstance(value, str) and value == "adaptive")):
        raise ValueError(
            f"`grad_through_batch_moments` must be True, False or 'adaptive', got {value!r}."
        )


def check_virtual_batch(v: Any, layout: Layout) -> None:
    """Virtual batches split axis 0 into groups of `v` examples."""
    check_positive_int(v, "virtual_batch_size")
    if 0 in layout.feature_axes:
        raise ValueError(
            "`virtual_batch_size` groups examples along axis 0, which `axis` makes a "
            f"feature axis (input shape {layout.shape})."
        )
    remainder = layout.shape[0] % v
    if not isinstance(remainder, int):  # a symbolic batch size (`jax.export`)
        raise ValueError(
            f"`virtual_batch_size`={v} needs a batch size known to be a multiple of it; "
            f"the symbolic batch size {layout.shape[0]} (input shape {layout.shape}) is "
            f"not: write it as a multiple, e.g. `{v}*k` in `jax.export.symbolic_shape`."
        )
    if remainder:
        raise ValueError(
            f"`virtual_batch_size`={v} does not divide the batch size {layout.shape[0]} "
            f"(axis 0 of the input, shape {layout.shape})."
        )


def check_axis_bound(axis_name: Any, caller: str) -> None:
    """Every name of a training call's `axis_name` is bound by an enclosing transform.

    A `NameError`, as JAX's own unbound-axis error, so that code catching that one
    (Equinox's among it) keeps working; this one names the layer and what to do.
    """
    for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise NameError(
                f"{caller}: `axis_name`={name!r} names no axis bound here, so the batch "
                "statistics cannot be shared across devices. Call it inside a transform "
                f"that binds the axis (`jax.pmap`, `jax.shard_map`, `jax.vmap`, or NNX's "
                f"`nnx.pmap`/`nnx.vmap`, with axis_name={name!r}), or leave `axis_name` "
                "unset (None) for a single device or a batch sharded under `jit`, where "
                "XLA inserts the collectives."
            ) from None


def check_more_than_one_value(values: int, shape: tuple[int, ...], where: str, caller: str) -> None:
    """A training call's statistics groups must hold more than one value per feature.

    A symbolic count (`jax.export` with a symbolic batch size) passes: whether the
    batch will hold one example is not known until the exported function is called.
    """
    if isinstance(values, int) and values == 1:
        raise ValueError(
            f"{caller}: a training call on an input of shape {shape} gives every statistics "
            f"group one value per feature ({where}). The batch statistics of one value are "
            "the value itself, so the output would be `bias` whatever the input and the "
            "running variance would decay to 0. Train with more than one value per feature "
            "(a larger batch, or a larger `virtual_batch_size` if one is set), call with "
            "`use_running_average=True` to evaluate, or use a normalization without batch "
            "statistics (GroupNorm, LayerNorm)."
        )


def check_groups_over_shards(v: int, batch: int, shards: int, spec: Any) -> None:
    """Virtual groups of an explicitly sharded batch must spread evenly over the shards."""
    if (batch // v) % shards:
        raise ValueError(
            f"`virtual_batch_size`={v} splits the batch of {batch} into {batch // v} "
            f"groups, which cannot be spread evenly over the {shards} shards of axis 0 "
            f"(sharded over {spec!r}); choose a size that makes the number of groups a "
            f"multiple of {shards}, e.g. {batch // shards}."
        )


def check_ramp(begin: int, end: int, name: str) -> None:
    """A schedule's ramp runs from step `begin` to step `end`."""
    if not 0 <= begin <= end:
        raise ValueError(f"{name}: need 0 <= begin <= end, got begin={begin}, end={end}.")


# --- modules and tools --------------------------------------------------------


def check_statistics_present(
    layer: str, missing: Sequence[str], x_shape: tuple[int, ...], others: Sequence[str] = ()
) -> None:
    """A linen layer applied to variables without its running statistics.

    Flax would silently start them from 0 and 1 when the collection is mutable:
    a checkpoint that lost its statistics must not train on. `others` are layers
    of another class in the same scope with statistics of this layer's shape.
    """
    if missing:
        hint = (
            f" Found {', '.join(others)} with statistics of this shape in the same scope: a "
            "checkpoint of a model built with another normalization layer (e.g. "
            "flax.linen.BatchNorm), whose layers without a name are named after their class? "
            "jaxrenorm.linen.convert_variables(variables, model.init(...)) maps them (see "
            "the guide 'Migrating from flax.linen.BatchNorm')."
            if others
            else ""
        )
        raise ValueError(
            f"{layer}: the variables passed to `apply` have no batch_stats {list(missing)} for "
            f"this layer (input shape {x_shape}). Pass the variables returned by `init` or "
            f"restored from a checkpoint, including the 'batch_stats' collection.{hint}"
        )


def check_step_count(shape: tuple[int, ...], dtype: Any) -> None:
    """A renorm layer's `steps` counter: a real scalar (int32, or a float read as an integer)."""
    if shape != () or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(
            f"batch_stats `steps` must be a real scalar (the layer's training-step counter), "
            f"got shape {shape} and dtype {jnp.dtype(dtype).name}."
        )


def check_converted_variables(problems: Sequence[str]) -> None:
    """`convert_variables` refuses what it cannot map, naming every path."""
    if problems:
        listed = "\n  ".join(problems)
        raise ValueError(
            f"convert_variables cannot map these variables onto the target:\n  {listed}\n"
            "Normalization layers without a name are paired in order of creation within "
            "each scope; every other variable must have the same path on both sides."
        )


def check_mode(mode: Any) -> None:
    """An Equinox layer's `mode`: how it keeps its running averages."""
    if mode not in ("batch", "ema"):
        raise ValueError(
            f"`mode` must be 'batch' (zero-debiased running averages) or 'ema' (running "
            f"averages that start at the first batch's statistics), got {mode!r}."
        )


def check_recorded(recorded: bool) -> None:
    """`recalibrate` must have seen at least one normalization layer run."""
    if not recorded:
        raise ValueError(
            "recalibrate saw no jaxrenorm normalization layer run (or no batch); check "
            "`batches` and that the model's layers are jaxrenorm.linen or jaxrenorm.nnx "
            "modules (jaxrenorm.nnx.convert turns an NNX model's flax.nnx.BatchNorm layers "
            "into jaxrenorm's), or jaxrenorm.equinox layers (jaxrenorm.equinox.convert)."
        )


def check_batch_dependence_input(x_shape: tuple[int, ...]) -> None:
    """`batch_dependence` swaps batch-mates: it needs a batch of at least 4."""
    if not x_shape or x_shape[0] < 4:
        raise ValueError(f"`x` needs at least 4 examples to swap batch-mates, got shape {x_shape}.")


def check_batch_dependence_output(x_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    """`batch_dependence` compares outputs example by example."""
    if out_shape[:1] != x_shape[:1]:
        raise ValueError(
            f"`apply_fn` must keep the batch size: input shape {x_shape}, output {out_shape}."
        )


def check_convert_target(to: Any, bases: tuple[type, ...]) -> None:
    """`jaxrenorm.nnx.convert` builds layers of class `to`: a batch normalization layer."""
    if not (isinstance(to, type) and issubclass(to, bases)):
        names = ", ".join(f"{b.__module__}.{b.__name__}" for b in bases)
        raise TypeError(
            f"`to` must be a batch normalization class (a subclass of {names}), got {to!r}."
        )


def check_known_arguments(
    given: Mapping[str, Any], accepted: Sequence[str], caller: str, target: str, takes: str
) -> None:
    """Keyword arguments passed on to a constructor are among those it accepts.

    `caller` got them, `target` would not take them, and `takes` says what it does take.
    """
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(
            f"{caller} got {', '.join(f'`{name}`' for name in unknown)}, which {target} does "
            f"not take; {takes}."
        )


# --- PyTorch state dicts ------------------------------------------------------


def check_torch_momentum(momentum: float | None) -> None:
    """PyTorch's momentum: a weight in [0, 1], not None (its cumulative average)."""
    if momentum is None:
        raise ValueError(
            "PyTorch's momentum=None (a cumulative average) has no exponential-moving-"
            "average equivalent; use jaxrenorm.recalibrate for exact population statistics."
        )
    check_scalar(momentum, "momentum", 0.0, 1.0)


def check_state_dict(state_dict: Mapping[str, Any], prefix: str) -> None:
    """A BatchNorm state dict holds running statistics under `prefix`."""
    missing = [k for k in ("running_mean", "running_var") if prefix + k not in state_dict]
    if missing:
        raise ValueError(
            f"state_dict has no {[prefix + k for k in missing]}: check `prefix` (the "
            "submodule's name followed by a dot, e.g. 'bn1.'); a BatchNorm created with "
            "track_running_stats=False has no running statistics to import. "
            f"Keys present: {sorted(state_dict)[:10]}."
        )


def check_state_dict_entries(entries: Mapping[str, np.ndarray]) -> None:
    """A BatchNorm state dict's entries are vectors of one length."""
    for key, array in entries.items():
        if array.ndim != 1:
            raise ValueError(
                f"state_dict[{key!r}] must be one-dimensional, got shape {array.shape}."
            )
    shapes = {k: v.shape for k, v in entries.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"state_dict entries have different shapes: {shapes}.")
