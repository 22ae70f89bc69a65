"""Flax linen modules.

`BatchNorm` is a drop-in for `flax.linen.BatchNorm`: the same fields, defaults,
call signature and variables (`params/scale`, `params/bias`, `batch_stats/mean`,
`batch_stats/var`), so a checkpoint written by one loads into the other.
`BatchRenorm` adds Batch Renormalization's clipping bounds (with a `steps`
counter in `batch_stats` when they are schedules) and `InstanceRenorm` a learned
gate `params/rho` between batch and instance statistics. The math of each layer
is the pure function of the same name (`jaxrenorm.batch_norm`, ...).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.module import merge_param

from jaxrenorm import schedules
from jaxrenorm._checks import Layout, check_path_patterns, check_statistics_present
from jaxrenorm._conversion import automatic_norm_names, convert_tree
from jaxrenorm._docs import documents
from jaxrenorm._layers import (
    bounds_at,
    debiased_momentum,
    is_scheduled,
    layer_input,
    normalize_layer,
    renorm_diagnostics,
    running_stats_dtype,
    step_count,
)
from jaxrenorm._norm import RenormTerms
from jaxrenorm._recalibration import COLLECTION, Moments
from jaxrenorm._xla import standard_promotion
from jaxrenorm.typing import ArrayLike, Axes, Bound, DTypeLike

__all__ = ["BatchNorm", "BatchRenorm", "InstanceRenorm", "convert_variables", "frozen_statistics"]

Initializer = Callable[..., jax.Array]


@documents("linen")
class BatchNorm(nn.Module):
    """Batch Normalization (Ioffe & Szegedy 2015), a drop-in for `flax.linen.BatchNorm`.

    Training normalizes with the batch's mean and biased variance over every axis
    but `axis` and updates the running statistics
    (`mean <- momentum * mean + (1 - momentum) * batch_mean`, likewise `var`);
    inference (`use_running_average=True`) uses the running statistics. The math
    and its numerics are `jaxrenorm.batch_norm`'s; unlike Flax's default, the
    default variance is accurate on offset data (x = 1e4 + N(0, 1): relative
    error 1e-7 where Flax's has 23).

    The fields are those of `flax.linen.BatchNorm`, with the same defaults, plus
    `virtual_batch_size`, `bessel_correction` and `batch_stats_dtype`; the
    variables are `params/scale`, `params/bias`, `batch_stats/mean` and
    `batch_stats/var`.

    Args:
      use_running_average: True normalizes with the running statistics (inference),
        False with the batch's, updating the running ones (training). The argument
        of the call, if given, takes precedence; one of the two must be set. As in
        flax.linen.BatchNorm.
      axis: the feature axis, or a tuple of feature axes: the statistics are
        computed over every other axis. Default -1, the last; as in
        flax.linen.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
      dtype: the output dtype; None promotes the input's dtype with the parameters',
        as in flax.linen.BatchNorm. The statistics are computed in at least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default, and of the running statistics when
        `force_float32_reductions=False`; as in flax.linen.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.linen.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.linen.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.linen.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.linen.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.linen.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in
        flax.linen.BatchNorm.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      force_float32_reductions: True (the default) keeps the running statistics in
        float32; False keeps them in `param_dtype`, as in flax.linen.BatchNorm. The
        statistics of each batch are computed in at least float32 either way:
        reducing in bfloat16 is not faster on any backend measured and loses most of
        the variance's digits.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.
      batch_stats_dtype: the dtype of the running statistics `mean` and `var`. None
        (the default) keeps them in float32 (linen: in `param_dtype` with
        `force_float32_reductions=False`), whatever the input. `jnp.float64`, with
        `jax_enable_x64`, keeps them in float64: inference on float64 inputs is then
        as accurate as the float64 computation (on offset data float32 statistics
        cost about 1e-4 relative). The pure functions keep the dtype of the
        `batch_stats` they are given (`init_batch_stats(n, jnp.float64)`).
      debias_running_average: keep zero-debiased running averages: each training
        call updates with the momentum `debiased_momentum(momentum, steps)` (0 on
        the first call; see `jaxrenorm.debiased_momentum`) and increments an int32
        `steps` counter kept with the running statistics, so that after t calls they
        are the average of the t batches' statistics weighted by (1 - m) m^(t - i),
        normalized to sum to one: they describe the batches however short the run,
        not their initial values. False (the default) is Flax's plain exponential
        average, from 0 and 1.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> bn = jaxrenorm.linen.BatchNorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"])
      ['mean', 'var']
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
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
    batch_stats_dtype: DTypeLike | None = None
    debias_running_average: bool = False

    @nn.compact
    @standard_promotion
    def __call__(
        self,
        x: ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: ArrayLike | None = None,
    ) -> jax.Array:
        """Normalizes `x` and, in training mode, updates the running statistics.

        Args:
          x: the input: a batch axis and the features (`axis`), with any other
            axes in between.
          use_running_average: overrides the field of the same name for this call.
          mask: a boolean array broadcastable to `x`: the batch statistics use
            the True positions only (see `jaxrenorm.batch_norm`).

        Returns:
          The normalized input, in `dtype` (by default the promotion of the
          input's and the parameters' dtypes).
        """
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x, layout = layer_input(self, x, mask)
        mean, var = self._running_statistics(layout)
        features, params = layout.feature_shape, {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, features, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, features, self.param_dtype)
        y, new_stats, terms = normalize_layer(
            self,
            x,
            layout,
            params,
            {"mean": mean.value, "var": var.value},
            use_running_average=use_running_average,
            momentum=self._momentum(),
            mask=mask,
            # As in Flax, the named axis need not exist while initializing, and a
            # batch of one example is fine then.
            axis_name=None if self.is_initializing() else self.axis_name,
            initializing=self.is_initializing(),
        )
        if not (use_running_average or self.is_initializing()):
            mean.value, var.value = new_stats["mean"], new_stats["var"]
            self._after_training_call(terms)
        return y

    def _running_statistics(self, layout: Layout):
        """The `mean` and `var` variables, which `apply` must be given."""
        if not self.is_initializing():
            missing = [n for n in ("mean", "var") if not self.has_variable("batch_stats", n)]
            layer = "(the top-level module)" if self.name is None else repr(self.name)
            others = self._other_layers_statistics(layout) if missing else []
            check_statistics_present(
                f"{type(self).__name__} {layer}", missing, layout.shape, others
            )
        # Flax keeps the running statistics in float32 unless told otherwise.
        default = jnp.float32 if self.force_float32_reductions else self.param_dtype
        dtype = running_stats_dtype(self.batch_stats_dtype, default)
        mean = self.variable("batch_stats", "mean", jnp.zeros, layout.feature_shape, dtype)
        var = self.variable("batch_stats", "var", jnp.ones, layout.feature_shape, dtype)
        # The counter comes with the running statistics, as in NNX's constructor. A
        # checkpoint without `steps` (e.g. written by flax.linen.BatchNorm) counts
        # from 0: the counter is created when the statistics are mutable, read as 0
        # otherwise (by `_step`).
        if self._counts_steps() and self.is_mutable_collection("batch_stats"):
            self.variable("batch_stats", "steps", jnp.zeros, (), jnp.int32)
        return mean, var

    def _counts_steps(self) -> bool:
        """Whether the layer keeps a `steps` counter of its training calls."""
        return self.debias_running_average

    def _step(self) -> jax.Array:
        """The number of training calls so far (0 without a counter)."""
        if self._counts_steps() and self.has_variable("batch_stats", "steps"):
            return step_count(self.get_variable("batch_stats", "steps"))
        return jnp.zeros((), jnp.int32)

    def _momentum(self) -> Any:
        """This call's momentum: `momentum`, or its debiased form at the counter."""
        if self.debias_running_average:
            return debiased_momentum(self.momentum, self._step())
        return self.momentum

    def _other_layers_statistics(self, layout: Layout) -> list[str]:
        """Normalization layers of another class, named automatically, with statistics
        of this layer's shape in the same scope: what a checkpoint of a model built
        with another kind of layer (e.g. flax.linen.BatchNorm) holds."""
        if not isinstance(self.parent, nn.Module):
            return []
        scope = self.parent.variables.get("batch_stats", {})
        return [
            name
            for name in automatic_norm_names(list(scope))
            if not name.startswith(f"{type(self).__name__}_")
            and jnp.shape(scope[name].get("mean")) == layout.feature_shape
        ]

    # The hooks of the family contract (`jaxrenorm._layers.Layer`), as in
    # `jaxrenorm.nnx`; BatchRenorm and InstanceRenorm override them.

    def _bounds(self) -> tuple[Any, Any]:
        """This call's renorm bounds (r_max, d_max); (None, None) is plain BatchNorm."""
        return None, None

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        """The instance-normalization gate rho, or None."""
        return None

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        """Records what a training call leaves besides the running statistics."""
        if self._counts_steps():
            self.put_variable("batch_stats", "steps", self._step() + 1)

    def _record_input(self, moments: Moments) -> None:
        """Keeps the input's moments for `recalibrate` (see `jaxrenorm._recalibration`)."""
        self.sow(COLLECTION, "moments", moments)


@documents("linen")
class BatchRenorm(BatchNorm):
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

    Args:
      r_max: the bound on r, >= 1 (r is clipped to [1 / r_max, r_max]): a float or a
        schedule `step -> value` (any optax schedule) evaluated at the layer's
        `steps` counter, the number of training calls so far. Default: the paper's
        schedule `jaxrenorm.schedules.PAPER_R_MAX`, 1 (plain BatchNorm) until step
        5,000, then linear to 3 at step 40,000; for a shorter run use
        `jaxrenorm.schedules.scaled_paper_schedules`.
      d_max: the bound on |d|, >= 0 (d is clipped to [-d_max, d_max]): a float or a
        schedule `step -> value` (any optax schedule) evaluated at the layer's
        `steps` counter, the number of training calls so far. Default: the paper's
        schedule `jaxrenorm.schedules.PAPER_D_MAX`, 0 until step 5,000, then linear
        to 5 at step 25,000.
      grad_through_batch_moments: how the gradient flows through the batch's (or
        each virtual group's) mean and variance; the forward pass is the same. True:
        the paper's gradient. False: the group moments are constants in the backward
        pass, for groups known not to represent the data (e.g. each holds one
        class), after a BatchNorm warm-up. "adaptive": per feature, the gradient
        through the group moments weighted by exp(-max(F - 1, 0)), F = n s_b^2 /
        (s_w^2 + epsilon) the one-way ANOVA F statistic of the call's virtual groups
        (s_b^2 the unbiased variance of the group means, s_w^2 the mean unbiased
        variance within the groups of n values): the paper's gradient where the
        groups agree, almost none where they differ. It needs `virtual_batch_size`
        smaller than the batch; with one group it is the paper's gradient. The math:
        [Concepts, Batch Renormalization](../concepts.md#batch-renormalization).
      diagnostics: if True, each training call sows `r_clipped`, `d_clipped`,
        `r_mean_abs_dev` and `d_mean_abs` into the `intermediates` collection;
        `jaxrenorm.collect_diagnostics` gathers them. Off by default, and free when
        off.

    Args: Inherited from BatchNorm:
      use_running_average: True normalizes with the running statistics (inference),
        False with the batch's, updating the running ones (training). The argument
        of the call, if given, takes precedence; one of the two must be set. As in
        flax.linen.BatchNorm.
      axis: the feature axis, or a tuple of feature axes: the statistics are
        computed over every other axis. Default -1, the last; as in
        flax.linen.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
      dtype: the output dtype; None promotes the input's dtype with the parameters',
        as in flax.linen.BatchNorm. The statistics are computed in at least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default, and of the running statistics when
        `force_float32_reductions=False`; as in flax.linen.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.linen.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.linen.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.linen.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.linen.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.linen.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in
        flax.linen.BatchNorm.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      force_float32_reductions: True (the default) keeps the running statistics in
        float32; False keeps them in `param_dtype`, as in flax.linen.BatchNorm. The
        statistics of each batch are computed in at least float32 either way:
        reducing in bfloat16 is not faster on any backend measured and loses most of
        the variance's digits.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.
      batch_stats_dtype: the dtype of the running statistics `mean` and `var`. None
        (the default) keeps them in float32 (linen: in `param_dtype` with
        `force_float32_reductions=False`), whatever the input. `jnp.float64`, with
        `jax_enable_x64`, keeps them in float64: inference on float64 inputs is then
        as accurate as the float64 computation (on offset data float32 statistics
        cost about 1e-4 relative). The pure functions keep the dtype of the
        `batch_stats` they are given (`init_batch_stats(n, jnp.float64)`).
      debias_running_average: keep zero-debiased running averages: each training
        call updates with the momentum `debiased_momentum(momentum, steps)` (0 on
        the first call; see `jaxrenorm.debiased_momentum`) and increments an int32
        `steps` counter kept with the running statistics, so that after t calls they
        are the average of the t batches' statistics weighted by (1 - m) m^(t - i),
        normalized to sum to one: they describe the batches however short the run,
        not their initial values. False (the default) is Flax's plain exponential
        average, from 0 and 1.

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
    grad_through_batch_moments: bool | str = True
    diagnostics: bool = False

    def _bounds(self) -> tuple[Any, Any]:
        return bounds_at(self.r_max, self.d_max, self._step())

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        super()._after_training_call(terms)
        if self.diagnostics and terms is not None:  # a renorm training call has terms
            for name, value in renorm_diagnostics(terms).items():
                self.sow("intermediates", name, value)

    def _counts_steps(self) -> bool:
        return self.debias_running_average or is_scheduled(self.r_max, self.d_max)


@documents("linen")
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

    Args:
      rho_init: the initializer of the gate `rho` (feature shape, `param_dtype`):
        0.5 everywhere by default, an even mix of batch and instance statistics.

    Args: Inherited from BatchRenorm:
      r_max: the bound on r, >= 1 (r is clipped to [1 / r_max, r_max]): a float or a
        schedule `step -> value` (any optax schedule) evaluated at the layer's
        `steps` counter, the number of training calls so far. Default: the paper's
        schedule `jaxrenorm.schedules.PAPER_R_MAX`, 1 (plain BatchNorm) until step
        5,000, then linear to 3 at step 40,000; for a shorter run use
        `jaxrenorm.schedules.scaled_paper_schedules`.
      d_max: the bound on |d|, >= 0 (d is clipped to [-d_max, d_max]): a float or a
        schedule `step -> value` (any optax schedule) evaluated at the layer's
        `steps` counter, the number of training calls so far. Default: the paper's
        schedule `jaxrenorm.schedules.PAPER_D_MAX`, 0 until step 5,000, then linear
        to 5 at step 25,000.
      grad_through_batch_moments: how the gradient flows through the batch's (or
        each virtual group's) mean and variance; the forward pass is the same. True:
        the paper's gradient. False: the group moments are constants in the backward
        pass, for groups known not to represent the data (e.g. each holds one
        class), after a BatchNorm warm-up. "adaptive": per feature, the gradient
        through the group moments weighted by exp(-max(F - 1, 0)), F = n s_b^2 /
        (s_w^2 + epsilon) the one-way ANOVA F statistic of the call's virtual groups
        (s_b^2 the unbiased variance of the group means, s_w^2 the mean unbiased
        variance within the groups of n values): the paper's gradient where the
        groups agree, almost none where they differ. It needs `virtual_batch_size`
        smaller than the batch; with one group it is the paper's gradient. The math:
        [Concepts, Batch Renormalization](../concepts.md#batch-renormalization).
      diagnostics: if True, each training call sows `r_clipped`, `d_clipped`,
        `r_mean_abs_dev` and `d_mean_abs` into the `intermediates` collection;
        `jaxrenorm.collect_diagnostics` gathers them. Off by default, and free when
        off.

    Args: Inherited from BatchNorm:
      use_running_average: True normalizes with the running statistics (inference),
        False with the batch's, updating the running ones (training). The argument
        of the call, if given, takes precedence; one of the two must be set. As in
        flax.linen.BatchNorm.
      axis: the feature axis, or a tuple of feature axes: the statistics are
        computed over every other axis. Default -1, the last; as in
        flax.linen.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
      dtype: the output dtype; None promotes the input's dtype with the parameters',
        as in flax.linen.BatchNorm. The statistics are computed in at least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default, and of the running statistics when
        `force_float32_reductions=False`; as in flax.linen.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.linen.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.linen.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.linen.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.linen.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.linen.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in
        flax.linen.BatchNorm.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      force_float32_reductions: True (the default) keeps the running statistics in
        float32; False keeps them in `param_dtype`, as in flax.linen.BatchNorm. The
        statistics of each batch are computed in at least float32 either way:
        reducing in bfloat16 is not faster on any backend measured and loses most of
        the variance's digits.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.
      batch_stats_dtype: the dtype of the running statistics `mean` and `var`. None
        (the default) keeps them in float32 (linen: in `param_dtype` with
        `force_float32_reductions=False`), whatever the input. `jnp.float64`, with
        `jax_enable_x64`, keeps them in float64: inference on float64 inputs is then
        as accurate as the float64 computation (on offset data float32 statistics
        cost about 1e-4 relative). The pure functions keep the dtype of the
        `batch_stats` they are given (`init_batch_stats(n, jnp.float64)`).
      debias_running_average: keep zero-debiased running averages: each training
        call updates with the momentum `debiased_momentum(momentum, steps)` (0 on
        the first call; see `jaxrenorm.debiased_momentum`) and increments an int32
        `steps` counter kept with the running statistics, so that after t calls they
        are the average of the t batches' statistics weighted by (1 - m) m^(t - i),
        normalized to sum to one: they describe the batches however short the run,
        not their initial values. False (the default) is Flax's plain exponential
        average, from 0 and 1.

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


def convert_variables(variables: Any, target: Any) -> Any:
    """A checkpoint of one model's normalization layers, fitted to another model's.

    Flax names a layer created without a name after its class and its order in
    the scope: a model built with `flax.linen.BatchNorm` stores `BatchNorm_0`,
    `BatchNorm_1`, ..., and the same model built with `BatchRenorm` expects
    `BatchRenorm_0`, `BatchRenorm_1`, .... This pairs the normalization layers
    without a name (`BatchNorm_i`, `BatchRenorm_i`, `InstanceRenorm_i`) by their
    order of creation within each scope, and every other variable by its path;
    a layer's variables that only the target's kind has are added (`steps` = 0,
    `rho` as `target` holds it, i.e. its initial value), those only the source's
    kind has are dropped (`steps`, `rho`: a gate dropped is instance
    normalization given up). Works both ways between `flax.linen.BatchNorm`,
    `BatchNorm`, `BatchRenorm` and `InstanceRenorm`, and on any pytree that holds
    such scopes (a `TrainState`'s parameters, `batch_stats` and optimizer state,
    as an orbax restore without a target returns them). A `steps` counter stored
    as a float (averaged by `lax.pmean`) comes back as int32.

    Within a scope that holds layers of one class, the order is the index of the
    names; within one that mixes classes, it is the order of the dict, which is
    the order of creation in what `init` returns and in Flax's checkpoints.

    Args:
      variables: the source, e.g. a restored checkpoint (`{"params": ...,
        "batch_stats": ...}` or a whole training state).
      target: the same structure for the model that will use them, e.g.
        `model.init(...)`; only its structure, shapes and the initial values of
        added variables are used.

    Returns:
      `variables`' values in `target`'s structure.

    Raises:
      ValueError: listing every path it cannot map (a variable on one side only,
        different shapes, a different number of unnamed normalization layers in a
        scope).

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxrenorm
      >>> class Net(nn.Module):
      ...     norm: type
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return self.norm(use_running_average=True)(nn.Dense(3)(x))
      >>> x = jnp.ones((4, 2))
      >>> flax_vars = Net(nn.BatchNorm).init(jax.random.key(0), x)
      >>> brn_vars = Net(jaxrenorm.linen.BatchRenorm).init(jax.random.key(0), x)
      >>> converted = jaxrenorm.linen.convert_variables(flax_vars, brn_vars)
      >>> sorted(converted["batch_stats"]["BatchRenorm_0"])
      ['mean', 'steps', 'var']
    """
    return convert_tree(variables, target)


@contextlib.contextmanager
def frozen_statistics(*paths: str) -> Iterator[None]:
    """Serves `use_running_average=True` to the normalization layers under `paths`.

    For fine-tuning with some layers' statistics frozen, without editing the
    model: inside the context, every `flax.linen.BatchNorm` and every layer of
    this module whose path (the names of its scopes joined by "/", e.g.
    `"backbone/BatchNorm_0"`) or the path of a module that contains it matches
    one of `paths` in full (a regular expression) normalizes with its running
    statistics and leaves them (and BatchRenorm's `steps`) as they are, whatever
    its `use_running_average` field or call argument says. Other layers train as
    usual. Without `paths`, every layer is frozen. Built on
    `flax.linen.intercept_methods`.

    The context acts while a model is *traced*: enter it inside the function
    that `jax.jit` compiles (or use it as that function's decorator), since a
    jitted function already compiled is not traced again when it is called inside
    the context.

    Args:
      *paths: regular expressions, each matched in full against the paths of the
        layers and of the modules above them, e.g. `"backbone"` or
        `"blocks_[0-2]"`.

    Raises:
      TypeError: if a path is not a string.
      ValueError: if a path is not a valid regular expression.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxrenorm
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = jaxrenorm.linen.BatchRenorm(use_running_average=False, name="backbone")(x)
      ...         return jaxrenorm.linen.BatchRenorm(use_running_average=False, name="head")(x)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = Net().init(jax.random.key(0), x)
      >>> with jaxrenorm.linen.frozen_statistics("backbone"):
      ...     _, updates = Net().apply(variables, x, mutable=["batch_stats"])
      >>> [int(updates["batch_stats"][name]["steps"]) for name in ("backbone", "head")]
      [0, 1]
    """
    check_path_patterns(paths, "frozen_statistics")
    # A layer's path, or one of its modules' paths, matches when the pattern matches
    # a prefix of whole names.
    frozen = re.compile("|".join(f"(?:{p})(?:/.*)?" for p in paths) or ".*")

    def freeze(next_fun, args, kwargs, context):
        layer = context.module
        if (
            context.method_name != "__call__"
            or not isinstance(layer, BatchNorm | nn.BatchNorm)
            or not frozen.fullmatch("/".join(layer.path))
        ):
            return next_fun(*args, **kwargs)
        # The layers merge the field with the call's argument and refuse both set:
        # the field says True for this call, the argument is dropped.
        args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k != "use_running_average"}
        field = layer.use_running_average
        object.__setattr__(layer, "use_running_average", True)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(layer, "use_running_average", field)

    with nn.intercept_methods(freeze):
        yield
