"""Flax NNX modules. They hold variables; the math is in `jaxrenorm._norm`.

`BatchNorm` mirrors `flax.nnx.BatchNorm` (constructor, `nnx.Param` `scale`/`bias`,
`nnx.BatchStat` `mean`/`var`, `.train()` / `.eval()` and the call-time
`use_running_average`); `BatchRenorm` adds the clipping bounds and
`InstanceRenorm` the gate between batch and instance statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from

from jaxrenorm import schedules
from jaxrenorm._checks import check_layout
from jaxrenorm._layers import (
    DIAGNOSTICS,
    Bound,
    bounds_at,
    is_scheduled,
    normalize_layer,
    renorm_diagnostics,
)
from jaxrenorm._norm import RenormTerms

__all__ = ["BatchNorm", "BatchRenorm", "InstanceRenorm"]
_ZEROS, _ONES = initializers.zeros_init(), initializers.ones_init()  # flax.nnx's defaults
_HALF = initializers.constant(0.5)


class BatchNorm(nnx.Module):
    """Batch Normalization (Ioffe & Szegedy 2015), mirroring `flax.nnx.BatchNorm`.

    The same constructor and variables as `flax.nnx.BatchNorm`, plus
    `virtual_batch_size` and `bessel_correction` (see `jaxrenorm.batch_norm`). The
    default variance is accurate on offset data, where Flax's is not.

    Examples:
      >>> import jax, jaxrenorm
      >>> from flax import nnx
      >>> bn = jaxrenorm.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 4
      >>> y = bn(x)  # training: batch statistics, running statistics updated
      >>> bn.eval(); y = bn(x)  # inference: running statistics
      >>> bool(bn.mean[...].mean() > 0.03)
      True
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = _ZEROS,
        scale_init: Callable = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        virtual_batch_size: int | None = None,
        bessel_correction: bool = False,
        rngs: nnx.Rngs,
    ):
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale = (
            nnx.Param(scale_init(rngs.params(), shape, param_dtype))
            if use_scale
            else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else nnx.data(None)
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.virtual_batch_size = virtual_batch_size
        self.bessel_correction = bessel_correction

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; the call-time `use_running_average` takes precedence."""
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg="Pass `use_running_average` to the constructor or the call, or use "
            "`.train()` / `.eval()`.",
        )
        x, layout = check_layout(x, self.axis)
        affine = {"scale": self.scale, "bias": self.bias}
        params = {name: v[...] for name, v in affine.items() if v is not None}
        y, new_stats, terms = normalize_layer(
            self,
            x,
            layout,
            params,
            {"mean": self.mean[...], "var": self.var[...]},
            use_running_average=use_running_average,
            mask=mask,
        )
        if not use_running_average:
            self.mean[...] = new_stats["mean"]
            self.var[...] = new_stats["var"]
            self._after_training_call(terms)
        return y

    # The hooks, named as in `jaxrenorm.linen` (see `jaxrenorm._layers`).

    def _bounds(self) -> tuple[Any, Any]:
        """This call's renorm bounds (r_max, d_max); (None, None) is plain BatchNorm."""
        return None, None

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        """The instance-normalization gate rho, or None."""
        return None

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        """Records what a training call leaves besides the running statistics."""


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) as a Flax NNX module.

    `BatchNorm`'s constructor plus `r_max` and `d_max` (floats or schedules
    `step -> value`; the defaults are the paper's schedules), and
    `grad_through_batch_moments` and `diagnostics` (see `jaxrenorm.linen.
    BatchRenorm`). With a schedule the module holds an int32 `steps` BatchStat,
    incremented once per training call. With `diagnostics=True` each training call
    stores the dict of `jaxrenorm.linen.BatchRenorm`'s summaries in
    `self.diagnostics_values`, an `nnx.Intermediate` (read it with `.get_value()`;
    zeros until the first training call).

    Examples:
      >>> import jax, jaxrenorm
      >>> from flax import nnx
      >>> brn = jaxrenorm.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))
      >>> y = brn(jax.random.normal(jax.random.key(0), (8, 3)))
      >>> int(brn.steps[...])
      1
    """

    def __init__(
        self,
        num_features: int,
        *,
        r_max: Bound = schedules.PAPER_R_MAX,
        d_max: Bound = schedules.PAPER_D_MAX,
        grad_through_batch_moments: bool = True,
        diagnostics: bool = False,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.r_max = r_max
        self.d_max = d_max
        self.grad_through_batch_moments = grad_through_batch_moments
        self.diagnostics = diagnostics
        scheduled = is_scheduled(r_max, d_max)
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32)) if scheduled else nnx.data(None)
        if diagnostics:
            # Created now rather than by the first training call, so that the module's
            # structure does not change then (which would retrace an `nnx.jit` step).
            zero = jnp.zeros((), jnp.float32)
            self.diagnostics_values = nnx.Intermediate(dict.fromkeys(DIAGNOSTICS, zero))

    def _bounds(self) -> tuple[Any, Any]:
        step = None if self.steps is None else self.steps[...]
        return bounds_at(self.r_max, self.d_max, step)

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        if self.steps is not None:
            self.steps[...] = self.steps[...] + 1
        if self.diagnostics:
            self.diagnostics_values = nnx.Intermediate(renorm_diagnostics(terms))


class InstanceRenorm(BatchRenorm):
    """Batch Renormalization mixed with instance normalization, as a Flax NNX module.

    `BatchRenorm`'s constructor plus `rho_init` (default: 0.5 everywhere); the
    gate is the `nnx.Param` `rho` of shape `(num_features,)`. See
    `jaxrenorm.linen.InstanceRenorm` and, for the math, `jaxrenorm.instance_renorm`.
    Inputs need a batch axis, at least one spatial axis and the features (rank >= 3).

    Examples:
      >>> import jax, jaxrenorm
      >>> from flax import nnx
      >>> layer = jaxrenorm.nnx.InstanceRenorm(3, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (4, 6, 6, 3)))
      >>> layer.rho[...].tolist()
      [0.5, 0.5, 0.5]
    """

    def __init__(
        self,
        num_features: int,
        *,
        rho_init: Callable = _HALF,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.rho = nnx.Param(rho_init(rngs.params(), (num_features,), self.param_dtype))

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array:
        return self.rho[...]
