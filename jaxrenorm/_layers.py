"""The contract of a module family, and the glue between its layers and the pure functions.

A module family (linen, NNX, Equinox) is one file of layers that hold variables and
answer the hooks below; the math is `jaxrenorm._norm`'s and everything else is
shared. `Layer` states the part the glue calls. A family provides:

- Classes: `BatchNorm`, `BatchRenorm(BatchNorm)` and
  `InstanceRenorm(BatchRenorm)`, so that `isinstance` answers alike in every
  family, and one `__call__`, BatchNorm's: `layer_input`, then
  `normalize_layer`, then, on a training call, the new running statistics
  written back and `_after_training_call`.
- Settings: a field named like a field of `jaxrenorm._norm.Options` (`axis`,
  `momentum`, `epsilon`, `virtual_batch_size`, ...) is that option, read by
  `normalize_layer` by name: adding an option to the pure functions and a field
  of the same name to the layers is all the layers need.
- Variables: params `scale` and `bias` (unless `use_scale` / `use_bias` is
  False) and InstanceRenorm's gate `rho`, of the feature shape; batch_stats
  `mean` and `var` of the feature shape, in `running_stats_dtype` (float32 by
  default; linen: `param_dtype` with `force_float32_reductions=False`), and,
  when a bound is a schedule (`is_scheduled`), the int32 scalar `steps`, the
  number of training calls so far. The counter is created with the running statistics: by NNX's
  constructor, by the linen call that creates them (a checkpoint without it, as
  `flax.linen.BatchNorm` writes, counts from 0: the counter is created when
  batch_stats is mutable and read as 0 otherwise).
- Hooks, with the same names and meanings in every family:
  - `_bounds()`: this call's renorm bounds `(r_max, d_max)` (schedules
    evaluated at the `steps` counter, `bounds_at`), or `(None, None)` for plain
    BatchNorm;
  - `_gate(feature_shape)`: InstanceRenorm's gate rho, or None;
  - `_after_training_call(terms)`: what a training call records besides the
    running statistics (the `steps` counter, the diagnostics);
  - `_record_input(moments)`: keeps the (count, mean, var) of the call's input
    where the family's runner in `jaxrenorm._recalibration` collects it (a linen
    collection, an `nnx.Intermediate`); `layer_input` calls it while
    `recalibrate` traces the model, and never otherwise.
- Conversion: a function that turns a peer's layers (Flax's, or the family's
  other kinds) into the family's, beside the others in `jaxrenorm._conversion`:
  it keeps the variables both kinds have (`scale`, `bias`, `mean`, `var`, and
  `steps`, `rho` where both have them), adds those only the new kind has at
  their initial values (`steps` = 0) and drops the rest.

Equinox's layers (`jaxrenorm.equinox`) are immutable and keep what changes in the
`eqx.nn.State` of the call: params `weight` and `bias` under Equinox's names, and
two state entries, `(mean, var)` (under Equinox's `batch_state_index` or
`ema_state_index`) and the `steps` counter (always: it also debiases the running
averages). So their `__call__` reads the counter from the state and
passes `bounds` to `normalize_layer` instead of answering `_bounds`, and returns
the new state rather than writing it back; their conversion lives beside them, as
Equinox is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxrenorm._checks import (
    Layout,
    check_floating_dtype,
    check_layout,
    check_positive_int,
    check_scalar,
    check_step_count,
)
from jaxrenorm._norm import Options, RenormTerms, _normalize
from jaxrenorm._recalibration import Moments, input_moments, is_recording_inputs
from jaxrenorm._xla import traced_once
from jaxrenorm.typing import ArrayLike, Bound


class Layer(Protocol):
    """A layer of any module family, as the glue sees it (see the module docstring)."""

    axis: Any
    dtype: Any

    def _bounds(self) -> tuple[Any, Any]:
        """This call's renorm bounds (r_max, d_max); (None, None) is plain BatchNorm."""
        ...

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        """The instance-normalization gate rho, or None."""
        ...

    def _record_input(self, moments: Moments) -> None:
        """Keeps the input's moments for `recalibrate`."""


#: The summaries of a renorm training call (`renorm_diagnostics`), in the order sown.
DIAGNOSTICS = ("r_clipped", "d_clipped", "r_mean_abs_dev", "d_mean_abs")


def renorm_diagnostics(terms: RenormTerms) -> dict[str, jax.Array]:
    """Scalar summaries of one renorm training call, over features (and groups).

    `r_clipped` / `d_clipped`: fraction of features where the bound was active;
    `r_mean_abs_dev`: mean |r - 1|; `d_mean_abs`: mean |d| (r and d as used,
    after clipping). With r = 1 and d = 0 the layer is BatchNorm; large values
    mean the batch statistics disagree with the running ones.
    """
    values = (
        jnp.mean((terms.r != terms.r_unclipped).astype(jnp.float32)),
        jnp.mean((terms.d != terms.d_unclipped).astype(jnp.float32)),
        jnp.mean(jnp.abs(terms.r - 1)),
        jnp.mean(jnp.abs(terms.d)),
    )
    return dict(zip(DIAGNOSTICS, values, strict=True))


def bounds_at(r_max: Bound, d_max: Bound, step: jax.Array | None) -> tuple[Any, Any]:
    """The renorm bounds at training step `step`: each a constant or a schedule's value.

    `step` is None for a layer without a counter, whose bounds are both constants.
    """
    if step is None:
        return r_max, d_max
    r, d = (traced_once(bound, step) if callable(bound) else bound for bound in (r_max, d_max))
    return r, d


def step_count(steps: Any) -> jax.Array:
    """The `steps` counter as int32; a floating-point one is read as the nearest integer.

    Loops that average the whole `batch_stats` tree with `lax.pmean` (the pattern
    of Flax's examples) hand the counter back as a float; it is written back as
    int32 by the next training call.
    """
    steps = jnp.asarray(steps)
    check_step_count(steps.shape, steps.dtype)
    if jnp.issubdtype(steps.dtype, jnp.floating):
        steps = jnp.round(steps)
    return steps.astype(jnp.int32)


def debiased_momentum(momentum: float, steps: ArrayLike) -> jax.Array:
    """The momentum of training call `steps` (0, 1, ...) that keeps a debiased average.

    With m = `momentum`, m (1 - m^t) / (1 - m^(t + 1)): 0 on the first call (the
    running statistics become the batch's), then rising towards m. Updating with it
    keeps the zero-debiased average hidden_t / (1 - m^t) of the batches seen so far,
    hidden_t = m hidden_(t-1) + (1 - m) batch_t from hidden_0 = 0, as the running
    values themselves: after a few calls they describe the batches, not the initial
    values, however close m is to 1. m = 0 and m = 1 are returned as they are.

    Args:
      momentum: the decay rate m of the running statistics, in [0, 1] (Flax's
        convention: the weight of the old value).
      steps: the number of training calls before this one (0 for the first), a
        Python int or an integer array (traced under `jit`).

    Returns:
      A float32 scalar: the momentum to pass to this call.

    Examples:
      >>> import jaxrenorm
      >>> [round(float(jaxrenorm.debiased_momentum(0.9, t)), 4) for t in range(4)]
      [0.0, 0.4737, 0.631, 0.7092]
    """
    if momentum in (0.0, 1.0):
        return jnp.asarray(momentum, jnp.float32)
    t = jnp.asarray(steps).astype(jnp.float32)
    return momentum * (1 - momentum**t) / (1 - momentum ** (t + 1))


def micro_batch_momentum(momentum: float, micro_batches: int) -> float:
    """The momentum per micro-batch that keeps the running averages' time constant
    in optimizer steps.

    With gradient accumulation over k micro-batches the running statistics are
    updated k times per optimizer step, so a momentum m per call forgets k times
    faster than intended. m ** (1 / k) per call decays by m per optimizer step,
    as one update with the whole batch's statistics would.

    Args:
      momentum: the decay rate per optimizer step, in [0, 1] (Flax's convention:
        the weight of the old value).
      micro_batches: training calls of each layer per optimizer step, >= 1.

    Returns:
      `momentum ** (1 / micro_batches)`, a Python float for the layers' `momentum`.

    Examples:
      >>> import jaxrenorm
      >>> round(jaxrenorm.micro_batch_momentum(0.99, 8), 6)
      0.998744
    """
    check_scalar(momentum, "momentum", 0.0, 1.0)
    check_positive_int(micro_batches, "micro_batches")
    return float(momentum) ** (1.0 / micro_batches)


def is_scheduled(r_max: Bound, d_max: Bound) -> bool:
    """Whether a bound is a schedule, so the layer needs its `steps` counter."""
    return callable(r_max) or callable(d_max)


def running_stats_dtype(batch_stats_dtype: Any, default: Any = jnp.float32) -> Any:
    """The dtype of a layer's `mean` and `var`: its `batch_stats_dtype`, if set, else
    the family's default (checked: a floating-point dtype)."""
    dtype = default if batch_stats_dtype is None else batch_stats_dtype
    check_floating_dtype(dtype, "batch_stats_dtype")
    return dtype


def layer_input(layer: Layer, x: ArrayLike, mask: ArrayLike | None) -> tuple[jax.Array, Layout]:
    """The call's input checked against the layer's `axis`, and its layout (`check_layout`).

    While `recalibrate` traces the model, the input's moments go to the layer's
    `_record_input` hook first: before any promotion to the layer's dtype, so that
    the population statistics are those of the input as given.
    """
    x, layout = check_layout(x, layer.axis, getattr(layer, "axis_name", None) is not None)
    if is_recording_inputs():
        layer._record_input(input_moments(x, layout, mask))
    return x, layout


def normalize_layer(
    layer: Layer,
    x: ArrayLike,
    layout: Layout,
    params: Mapping[str, jax.Array],
    batch_stats: Mapping[str, jax.Array],
    bounds: tuple[Any, Any] | None = None,
    **overrides: Any,
) -> tuple[jax.Array, dict[str, jax.Array], RenormTerms | None]:
    """Runs `_normalize` on a checked input (`layer_input`) with the layer's fields as options.

    `params` holds the layer's scale and bias (either may be missing); the gate,
    if the layer has one, comes from its `_gate` hook, the bounds from `_bounds`
    unless the call passes `bounds` (Equinox's layers, whose counter is in the
    `State` of the call rather than in the layer).
    `overrides` (the call's `use_running_average`, `mask`, ...) take precedence
    over the fields. As in Flax, the output dtype is the layer's `dtype` or,
    without one, the promotion of the input's and the params' dtypes.
    """
    dtype: Any = layer.dtype
    if dtype is None:
        dtype = jnp.result_type(x, *params.values())
    gate = layer._gate(layout.feature_shape)
    r_max, d_max = layer._bounds() if bounds is None else bounds
    fields: dict[str, Any] = {
        name: getattr(layer, name) for name in Options._fields if hasattr(layer, name)
    }
    options = Options(
        **fields
        | dict(dtype=dtype, r_max=r_max, d_max=d_max, instance=gate is not None)
        | overrides
    )
    params = dict(params) if gate is None else {**params, "rho": gate}
    return _normalize(x, params, batch_stats, options, type(layer).__name__, layout)
