"""Flax linen modules. They create and write variables; the math is in `jaxrenorm._norm`.

`BatchNorm` is a drop-in for `flax.linen.BatchNorm`: the same fields, defaults,
call signature and variables (`params/scale`, `params/bias`, `batch_stats/mean`,
`batch_stats/var`), so a checkpoint written by one loads into the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.module import merge_param

from jaxrenorm import schedules
from jaxrenorm._checks import Axes, check_input, check_layout
from jaxrenorm._norm import Renorm, _normalize, layer_options, renorm_diagnostics

__all__ = ["BatchNorm", "BatchRenorm", "InstanceRenorm"]

Initializer = Callable[..., jax.Array]
Bound = float | Callable[[jax.Array], jax.Array]


class _Normalization(nn.Module):
    """Fields and variables shared by BatchNorm and BatchRenorm (Flax's names and defaults)."""

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    virtual_batch_size: int | None = None
    bessel_correction: bool = False

    def _variables(self, x: jax.Array):
        """Declares the variables; returns (params, running-statistics variables, out dtype)."""
        x = check_input(x)
        feature_axes, _ = check_layout(x.shape, self.axis)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        if not self.is_initializing():
            missing = [n for n in ("mean", "var") if not self.has_variable("batch_stats", n)]
            if missing:
                # Flax would silently start them from 0 and 1 when the collection is
                # mutable: a checkpoint that lost its statistics must not train on.
                layer = "(the top-level module)" if self.name is None else repr(self.name)
                raise ValueError(
                    f"{type(self).__name__} {layer}: the variables passed to `apply` "
                    f"have no batch_stats {missing} for this layer (input shape {x.shape}). "
                    "Pass the variables returned by `init` or restored from a checkpoint, "
                    "including the 'batch_stats' collection."
                )
        # Flax keeps the running statistics in float32 unless told otherwise.
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, stats_dtype)
        var = self.variable("batch_stats", "var", jnp.ones, feature_shape, stats_dtype)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        # As flax.linen.BatchNorm: the output dtype is inferred from input and params.
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, *params.values())
        return x, params, (mean, var), dtype

    def _kwargs(self, use_running_average: bool, mask: jax.Array | None, dtype: Any) -> dict:
        return layer_options(
            self,
            use_running_average=use_running_average,
            mask=mask,
            dtype=dtype,
            # As in Flax, the named axis need not exist while initializing.
            axis_name=None if self.is_initializing() else self.axis_name,
        )

    def _write(self, running, new_stats: dict[str, jax.Array], use_running_average: bool) -> bool:
        """Stores new running statistics; returns whether this call was a training step."""
        if use_running_average or self.is_initializing():
            return False
        mean, var = running
        mean.value, var.value = new_stats["mean"], new_stats["var"]
        return True


class BatchNorm(_Normalization):
    """Batch Normalization (Ioffe & Szegedy 2015), a drop-in for `flax.linen.BatchNorm`.

    Training normalizes with the batch's mean and biased variance over every axis
    but `axis` and updates the running statistics
    (`mean <- momentum * mean + (1 - momentum) * batch_mean`, likewise `var`);
    inference (`use_running_average=True`) uses the running statistics. The math
    and its numerics are `jaxrenorm.batch_norm`'s; unlike Flax's default, the
    default variance is accurate on offset data (x = 1e4 + N(0, 1): relative
    error 6e-6 where Flax's has 25).

    The fields are those of `flax.linen.BatchNorm`, with the same defaults, plus
    two. `force_float32_reductions=False` keeps the running statistics in
    `param_dtype`, as in Flax, but statistics are still computed in at least
    float32: reducing in bfloat16 is not faster on any backend we measured and
    loses most of the variance's digits.

    Attributes:
      virtual_batch_size: statistics over consecutive groups of that many
        examples along axis 0 (see `jaxrenorm.batch_norm`).
      bessel_correction: update the running variance with the unbiased batch
        variance (PyTorch's convention).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> bn = jaxrenorm.linen.BatchNorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"])
      ['mean', 'var']
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; see the class docstring. `mask` selects the elements for statistics."""
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x, params, running, dtype = self._variables(x)
        stats = {"mean": running[0].value, "var": running[1].value}
        y, new_stats, _ = _normalize(
            x, params, stats, renorm=None, **self._kwargs(use_running_average, mask, dtype)
        )
        self._write(running, new_stats, use_running_average)
        return y


class BatchRenorm(_Normalization):
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275) as a Flax linen module.

    The fields of `BatchNorm` plus the clipping bounds `r_max` and `d_max`, each a
    float or a schedule `step -> value` (any optax schedule). When either is a
    schedule, `batch_stats` also holds an int32 scalar `steps`, the number of
    training calls so far: the bounds are the schedules' values at `steps`, and
    `steps` is incremented once per training call (not during `init`, not with
    `use_running_average`). The defaults are the paper's schedules
    (`jaxrenorm.schedules.PAPER_R_MAX`, `PAPER_D_MAX`): plain BatchNorm for 5,000
    steps, then r_max to 3 at 40,000 and d_max to 5 at 25,000; for a shorter run
    use `jaxrenorm.schedules.scaled_paper_schedules`. Inference is exactly
    BatchNorm's. The math is `jaxrenorm.batch_renorm`'s.

    Attributes (beyond `BatchNorm`'s):
      r_max, d_max: the bounds on r and |d| (floats or schedules).
      grad_through_batch_moments: False treats the batch mean and variance as
        constants in the backward pass (see `jaxrenorm.batch_renorm`).
      diagnostics: if True, each training call sows `r_clipped`, `d_clipped`,
        `r_mean_abs_dev` and `d_mean_abs` into the `intermediates` collection
        (collect them with `jaxrenorm.collect_diagnostics`). Off by default, and
        free when off.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> brn = jaxrenorm.linen.BatchRenorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = brn.init(jax.random.key(1), x)
      >>> y, updates = brn.apply(variables, x, mutable=["batch_stats"])
      >>> int(updates["batch_stats"]["steps"])
      1
    """

    r_max: Bound = schedules.PAPER_R_MAX
    d_max: Bound = schedules.PAPER_D_MAX
    grad_through_batch_moments: bool = True
    diagnostics: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes `x`; see the class docstring. `mask` selects the elements for statistics."""
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x, params, running, dtype = self._variables(x)
        scheduled = callable(self.r_max) or callable(self.d_max)
        steps, step = None, jnp.zeros((), jnp.int32)
        # A checkpoint without `steps` (e.g. written by flax.linen.BatchNorm) counts
        # from 0: created when the statistics are mutable, read as 0 otherwise.
        if scheduled and (
            self.has_variable("batch_stats", "steps") or self.is_mutable_collection("batch_stats")
        ):
            steps = self.variable("batch_stats", "steps", jnp.zeros, (), jnp.int32)
            step = steps.value
        r_max, d_max = self.r_max, self.d_max
        r_max = r_max(step) if callable(r_max) else r_max
        d_max = d_max(step) if callable(d_max) else d_max
        stats = {"mean": running[0].value, "var": running[1].value}
        y, new_stats, terms = _normalize(
            x,
            params,
            stats,
            renorm=Renorm(r_max, d_max, self.grad_through_batch_moments),
            instance=self._gate(running[0].value.shape),
            **self._kwargs(use_running_average, mask, dtype),
        )
        if self._write(running, new_stats, use_running_average):
            if steps is not None:
                steps.value = steps.value + 1
            if self.diagnostics:
                for name, value in renorm_diagnostics(terms).items():
                    self.sow("intermediates", name, value)
        return y

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        """The instance-normalization gate rho; BatchRenorm has none."""
        return None


class InstanceRenorm(BatchRenorm):
    """Batch Renormalization mixed with instance normalization by a learned gate.

    y = scale * (rho * BRN(x) + (1 - rho) * IN(x)) + bias, with BRN the
    batch-renormalized branch of `BatchRenorm` (same running statistics, bounds,
    schedules and `steps`) and IN(x) each example normalized over its spatial
    axes; rho is a per-feature parameter used as clip(rho, 0, 1). Axis 0 is the
    batch and every axis that is neither batch nor feature is spatial, so the
    input needs rank >= 3 (e.g. NHWC, or NCHW with `axis=1`). At inference each
    example's output depends on that example only. rho = 1 is `BatchRenorm`,
    rho = 0 instance normalization followed by the affine map. The math is
    `jaxrenorm.instance_renorm`'s, where the derivation is.

    Attributes (beyond `BatchRenorm`'s):
      rho_init: initializer of `params["rho"]` (feature shape, `param_dtype`);
        0.5 by default, an even mix.

    Examples:
      >>> import jax, jaxrenorm
      >>> layer = jaxrenorm.linen.InstanceRenorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> variables["params"]["rho"].tolist()
      [0.5, 0.5, 0.5]
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    """

    rho_init: Initializer = initializers.constant(0.5)

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array:
        return self.param("rho", self.rho_init, feature_shape, self.param_dtype)
