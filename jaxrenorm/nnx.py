"""Flax NNX modules, and the tools that convert and recalibrate NNX models.

`BatchNorm` is a drop-in for `flax.nnx.BatchNorm`: the same constructor, the
same variables (`nnx.Param` `scale` and `bias`, `nnx.BatchStat` `mean` and
`var`) and every way Flax switches to evaluation (`use_running_average` at the
call, `.train()` / `.eval()`, `nnx.view`). `BatchRenorm` adds Batch
Renormalization's clipping bounds and `InstanceRenorm` a learned gate between
batch and instance statistics. `convert` turns the `flax.nnx.BatchNorm` layers of
an existing model into these; `recalibrate` recomputes their running statistics
over a data set. The math of each layer is the pure function of the same name
(`jaxrenorm.batch_norm`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes

from jaxrenorm import schedules
from jaxrenorm._conversion import convert_layers
from jaxrenorm._docs import documents
from jaxrenorm._layers import (
    DIAGNOSTICS,
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
from jaxrenorm._recalibration import InputMoments, Moments, recalibrate_nnx
from jaxrenorm._xla import standard_promotion
from jaxrenorm.typing import ArrayLike, Bound, DTypeLike

__all__ = ["BatchNorm", "BatchRenorm", "InstanceRenorm", "convert", "recalibrate"]


@documents("nnx")
class BatchNorm(nnx.Module):
    """Batch Normalization (Ioffe & Szegedy 2015), a drop-in for `flax.nnx.BatchNorm`.

    The same constructor (every argument, with Flax's defaults), variables
    (`nnx.Param` `scale` and `bias`, `nnx.BatchStat` `mean` and `var`) and modes as
    `flax.nnx.BatchNorm`: `use_running_average` from the call, else from the
    module, which `.train()`, `.eval()` and `nnx.view(model,
    use_running_average=...)` set. The math is `jaxrenorm.batch_norm`'s; its
    default variance is accurate on offset data, where Flax's is not.

    Args:
      num_features: the size of the feature axis (the shape of the parameters and
        statistics).
      use_running_average: True normalizes with the running statistics (inference),
        False (the default) with the batch's, updating the running ones (training).
        The argument of the call takes precedence; `.train()`, `.eval()` and
        `nnx.view(model, use_running_average=...)` set this one. As in
        flax.nnx.BatchNorm.
      axis: the feature axis: the statistics are computed over every other axis.
        Default -1, the last; as in flax.nnx.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.nnx.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.nnx.BatchNorm.
      dtype: the output dtype; None promotes the input with the variables through
        `promote_dtype`, as in flax.nnx.BatchNorm. The statistics are computed in at
        least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default; as in flax.nnx.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.nnx.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.nnx.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.nnx.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.nnx.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.nnx.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in flax.nnx.BatchNorm.
      use_fast_variance: True (the default, as in flax.nnx.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      promote_dtype: called as `promote_dtype((x, mean, var, scale, bias),
        dtype=dtype)`, it returns them promoted to one dtype: the layer normalizes
        the promoted input with the promoted scale and bias and outputs their dtype;
        as in flax.nnx.BatchNorm. The statistics are still computed, and the running
        statistics kept, in at least float32.
      rngs: the `nnx.Rngs` whose `params` stream the initializers draw from.
      bias_metadata: metadata of the `bias` `nnx.Param`, e.g. its sharding
        annotation, which `nnx.get_partition_spec` and sharding rules read; as in
        flax.nnx.BatchNorm.
      scale_metadata: metadata of the `scale` `nnx.Param`, like `bias_metadata`; as
        in flax.nnx.BatchNorm.
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
      >>> from flax import nnx
      >>> bn = jaxrenorm.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 4
      >>> y = bn(x)  # training: batch statistics, running statistics updated
      >>> y = nnx.view(bn, use_running_average=True)(x)  # inference
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
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        # Flax's defaults, written as Flax writes them so that signatures read the same.
        bias_init: Callable = initializers.zeros_init(),  # noqa: B008
        scale_init: Callable = initializers.ones_init(),  # noqa: B008
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        bessel_correction: bool = False,
        batch_stats_dtype: DTypeLike | None = None,
        debias_running_average: bool = False,
    ):
        shape = (num_features,)
        stats_dtype = running_stats_dtype(batch_stats_dtype)
        self.mean = nnx.BatchStat(jnp.zeros(shape, stats_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, stats_dtype))
        self.scale = nnx.data(None)
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        self.bias = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
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
        self.promote_dtype = promote_dtype
        self.virtual_batch_size = virtual_batch_size
        self.bessel_correction = bessel_correction
        self.batch_stats_dtype = batch_stats_dtype
        self.debias_running_average = debias_running_average
        # The training-call counter, with the running statistics (BatchRenorm adds
        # it for scheduled bounds too).
        self.steps = (
            nnx.BatchStat(jnp.zeros((), jnp.int32)) if debias_running_average else nnx.data(None)
        )

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
          use_running_average: overrides the module's setting for this call.
          mask: a boolean array broadcastable to `x`: the batch statistics use
            the True positions only (see `jaxrenorm.batch_norm`).

        Returns:
          The normalized input.
        """
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg="Pass `use_running_average` to the constructor or the call, or use "
            "`.train()` / `.eval()` or `nnx.view(model, use_running_average=...)`.",
        )
        x, layout = layer_input(self, x, mask)
        mean, var = self.mean[...], self.var[...]
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        y, new_stats, terms = normalize_layer(
            self,
            x,
            layout,
            params,
            {"mean": mean, "var": var},
            use_running_average=use_running_average,
            momentum=self._momentum(),
            mask=mask,
        )
        if not use_running_average:
            self.mean[...] = new_stats["mean"]
            self.var[...] = new_stats["var"]
            self._after_training_call(terms)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for `nnx.view(model, use_running_average=...)`, as Flax's does."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    # The hooks of the family contract (`jaxrenorm._layers.Layer`), as in
    # `jaxrenorm.linen`; BatchRenorm and InstanceRenorm override them.

    def _bounds(self) -> tuple[Any, Any]:
        """This call's renorm bounds (r_max, d_max); (None, None) is plain BatchNorm."""
        return None, None

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        """The instance-normalization gate rho, or None."""
        return None

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        """Records what a training call leaves besides the running statistics."""
        if self.steps is not None:
            # set_value, not [...] =, which would keep a float counter's dtype.
            self.steps.set_value(step_count(self.steps[...]) + 1)

    def _step(self) -> jax.Array | None:
        """The number of training calls so far, or None without a counter."""
        return None if self.steps is None else step_count(self.steps[...])

    def _momentum(self) -> Any:
        """This call's momentum: `momentum`, or its debiased form at the counter."""
        step = self._step()
        if self.debias_running_average and step is not None:
            return debiased_momentum(self.momentum, step)
        return self.momentum

    def _record_input(self, moments: Moments) -> None:
        """Keeps the input's moments for `recalibrate` (see `jaxrenorm._recalibration`)."""
        self.sow(InputMoments, "input_moments", moments)


@documents("nnx")
class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275) as a Flax NNX module.

    `BatchNorm`'s constructor, variables and modes, plus the clipping bounds. With
    a schedule for either bound the module holds an int32 `nnx.BatchStat` `steps`,
    the number of training calls so far (not counting inference calls): the
    bounds are the schedules' values at it. Inference is exactly BatchNorm's. The
    math is `jaxrenorm.batch_renorm`'s.

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
      diagnostics: if True, each training call stores `r_clipped`, `d_clipped`,
        `r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) as a
        dict in `self.diagnostics_values`, an `nnx.Intermediate` (zeros until the
        first training call). Off by default.

    Args: Inherited from BatchNorm:
      num_features: the size of the feature axis (the shape of the parameters and
        statistics).
      use_running_average: True normalizes with the running statistics (inference),
        False (the default) with the batch's, updating the running ones (training).
        The argument of the call takes precedence; `.train()`, `.eval()` and
        `nnx.view(model, use_running_average=...)` set this one. As in
        flax.nnx.BatchNorm.
      axis: the feature axis: the statistics are computed over every other axis.
        Default -1, the last; as in flax.nnx.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.nnx.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.nnx.BatchNorm.
      dtype: the output dtype; None promotes the input with the variables through
        `promote_dtype`, as in flax.nnx.BatchNorm. The statistics are computed in at
        least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default; as in flax.nnx.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.nnx.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.nnx.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.nnx.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.nnx.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.nnx.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in flax.nnx.BatchNorm.
      use_fast_variance: True (the default, as in flax.nnx.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      promote_dtype: called as `promote_dtype((x, mean, var, scale, bias),
        dtype=dtype)`, it returns them promoted to one dtype: the layer normalizes
        the promoted input with the promoted scale and bias and outputs their dtype;
        as in flax.nnx.BatchNorm. The statistics are still computed, and the running
        statistics kept, in at least float32.
      rngs: the `nnx.Rngs` whose `params` stream the initializers draw from.
      bias_metadata: metadata of the `bias` `nnx.Param`, e.g. its sharding
        annotation, which `nnx.get_partition_spec` and sharding rules read; as in
        flax.nnx.BatchNorm.
      scale_metadata: metadata of the `scale` `nnx.Param`, like `bias_metadata`; as
        in flax.nnx.BatchNorm.
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
        grad_through_batch_moments: bool | str = True,
        diagnostics: bool = False,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(num_features, rngs=rngs, **kwargs)
        self.r_max = r_max
        self.d_max = d_max
        self.grad_through_batch_moments = grad_through_batch_moments
        self.diagnostics = diagnostics
        # The counter comes with the running statistics, which the base constructor
        # has just created, as linen's `_running_statistics` creates it with them.
        if self.steps is None and is_scheduled(r_max, d_max):
            self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        if diagnostics:
            # Created now rather than by the first training call, so that the module's
            # structure does not change then (which would retrace an `nnx.jit` step).
            zero = jnp.zeros((), jnp.float32)
            self.diagnostics_values = nnx.Intermediate(dict.fromkeys(DIAGNOSTICS, zero))

    def _bounds(self) -> tuple[Any, Any]:
        return bounds_at(self.r_max, self.d_max, self._step())

    def _after_training_call(self, terms: RenormTerms | None) -> None:
        super()._after_training_call(terms)
        if self.diagnostics and terms is not None:  # a renorm training call has terms
            self.diagnostics_values = nnx.Intermediate(renorm_diagnostics(terms))


@documents("nnx")
class InstanceRenorm(BatchRenorm):
    """Batch Renormalization mixed with instance normalization, as a Flax NNX module.

    y = scale * (rho * BRN(x) + (1 - rho) * IN(x)) + bias with the gate rho, an
    `nnx.Param` of shape `(num_features,)` used as clip(rho, 0, 1). Inputs need a
    batch axis, at least one spatial axis and the features (rank >= 3). See
    `jaxrenorm.linen.InstanceRenorm` and, for the math, `jaxrenorm.instance_renorm`.

    Args:
      rho_init: the initializer of the gate `rho` (feature shape, `param_dtype`):
        0.5 everywhere by default, an even mix of batch and instance statistics.
      rho_metadata: metadata of the `rho` `nnx.Param`, like `bias_metadata`.

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
      diagnostics: if True, each training call stores `r_clipped`, `d_clipped`,
        `r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) as a
        dict in `self.diagnostics_values`, an `nnx.Intermediate` (zeros until the
        first training call). Off by default.

    Args: Inherited from BatchNorm:
      num_features: the size of the feature axis (the shape of the parameters and
        statistics).
      use_running_average: True normalizes with the running statistics (inference),
        False (the default) with the batch's, updating the running ones (training).
        The argument of the call takes precedence; `.train()`, `.eval()` and
        `nnx.view(model, use_running_average=...)` set this one. As in
        flax.nnx.BatchNorm.
      axis: the feature axis: the statistics are computed over every other axis.
        Default -1, the last; as in flax.nnx.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.nnx.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.nnx.BatchNorm.
      dtype: the output dtype; None promotes the input with the variables through
        `promote_dtype`, as in flax.nnx.BatchNorm. The statistics are computed in at
        least float32.
      param_dtype: the dtype of the parameters (`scale`, `bias`, InstanceRenorm's
        `rho`), float32 by default; as in flax.nnx.BatchNorm.
      use_bias: learn a per-feature `bias` (beta) added after normalizing; as in
        flax.nnx.BatchNorm.
      use_scale: learn a per-feature `scale` (gamma) that multiplies the normalized
        input; as in flax.nnx.BatchNorm.
      bias_init: the initializer of `bias` (zeros by default); as in
        flax.nnx.BatchNorm.
      scale_init: the initializer of `scale` (ones by default); as in
        flax.nnx.BatchNorm.
      axis_name: the named axis, or tuple of axis names, of a `pmap`, `shard_map` or
        `vmap` whose devices share the statistics of the global batch, computed with
        one collective per layer, a gather of a few values per feature and device
        (and one more in the backward pass); as in flax.nnx.BatchNorm. Not needed
        under `jit` with a sharded batch, where XLA inserts the collectives. Each
        device's moments are about a sample of its own data and are merged exactly,
        so the result is as accurate as on one device whatever the running
        statistics of the devices hold (they may differ, as in a `vmap`ped
        ensemble).
      axis_index_groups: groups of device indices along `axis_name`, each normalized
        with its own statistics (e.g. `[[0, 1], [2, 3]]`); as in flax.nnx.BatchNorm.
      use_fast_variance: True (the default, as in flax.nnx.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      promote_dtype: called as `promote_dtype((x, mean, var, scale, bias),
        dtype=dtype)`, it returns them promoted to one dtype: the layer normalizes
        the promoted input with the promoted scale and bias and outputs their dtype;
        as in flax.nnx.BatchNorm. The statistics are still computed, and the running
        statistics kept, in at least float32.
      rngs: the `nnx.Rngs` whose `params` stream the initializers draw from.
      bias_metadata: metadata of the `bias` `nnx.Param`, e.g. its sharding
        annotation, which `nnx.get_partition_spec` and sharding rules read; as in
        flax.nnx.BatchNorm.
      scale_metadata: metadata of the `scale` `nnx.Param`, like `bias_metadata`; as
        in flax.nnx.BatchNorm.
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
        rho_init: Callable = initializers.constant(0.5),  # noqa: B008
        rho_metadata: Mapping[str, Any] = MappingProxyType({}),
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        super().__init__(num_features, rngs=rngs, **kwargs)
        rho = rho_init(rngs.params(), (num_features,), self.param_dtype)
        self.rho = nnx.Param(rho, **rho_metadata)

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array:
        return self.rho[...]


# --- converting existing models -------------------------------------------------


def convert(model: Any, to: type = BatchRenorm, **overrides: Any) -> Any:
    """Replaces every batch normalization layer of an NNX model, keeping its variables.

    Every `flax.nnx.BatchNorm` and every jaxrenorm NNX layer inside `model`
    (attributes, nested modules, `nnx.List` and `nnx.Dict` entries) is replaced,
    in place, by a layer of class `to`, built with the old layer's settings (the
    constructor arguments it keeps: `axis`, `momentum`, `epsilon`, `dtype`,
    `use_running_average`, ...) and then `overrides`. The new layer takes over the
    old one's variables, the same `nnx.Variable` objects with their metadata: `scale`,
    `bias`, `mean` and `var`, and `steps` and `rho` where both layers have them;
    those only the new layer has (BatchRenorm's `steps`, InstanceRenorm's `rho`)
    start from their initial values. A layer referenced from several places
    becomes one new layer referenced from all of them. The analogue of PyTorch's
    `SyncBatchNorm.convert_sync_batchnorm`.

    Converted to `jaxrenorm.nnx.BatchNorm`, a trained Flax model computes the same
    outputs and training steps (up to Flax's less accurate default variance); to
    `BatchRenorm` its inference is unchanged, and with the default bounds (the
    paper's schedule) its first 5,000 training steps are BatchNorm's.

    Args:
      model: an NNX module, or a batch normalization layer itself.
      to: the class of the new layers: `jaxrenorm.nnx.BatchRenorm` (default),
        `BatchNorm` or `InstanceRenorm`, or `flax.nnx.BatchNorm` to go back
        (settings Flax's layer does not take are dropped).
      **overrides: constructor arguments of the new layers, e.g. `r_max=1.5,
        d_max=0.5` or `virtual_batch_size=8`; `rngs` seeds the variables the new
        layers create (default `nnx.Rngs(0)`).

    Returns:
      `model`, converted in place; the new layer if `model` itself is one.

    Examples:
      >>> import jax, jaxrenorm
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)))
      >>> model = jaxrenorm.nnx.convert(model, jaxrenorm.nnx.BatchRenorm, r_max=1.5, d_max=0.5)
      >>> type(model.layers[1]).__name__, model.layers[1].momentum
      ('BatchRenorm', 0.9)
    """
    return convert_layers(model, to, overrides, _LAYERS)


# What `convert` replaces: Flax's layer and every layer of this family.
_LAYERS = (nnx.BatchNorm, BatchNorm)


# --- recalibration -----------------------------------------------------------------


def recalibrate(
    model: Any, batches: Iterable[Any], *, progress: bool = False, **call_kwargs: Any
) -> Any:
    """Replaces every jaxrenorm layer's running statistics by exact population statistics.

    The NNX counterpart of `jaxrenorm.recalibrate`, with the same semantics: runs
    `model(batch, **call_kwargs)` on each batch (one jitted pass per batch, each
    from the model's state as given) and records the input of every jaxrenorm NNX
    layer; the new `mean` and `var` are the mean and pooled biased variance over
    all valid elements of all batches, merged in float64 by
    `jaxrenorm.pool_moments`, and are written into the layers' `nnx.BatchStat`s.
    Nothing else changes: parameters, `steps` counters, other state and the
    model's mode are as before. Features that no batch had a valid element of
    keep their statistics.

    The model's mode decides which statistics the layers use during the pass: in
    training mode (`model.train()`, the usual choice, "precise BatchNorm") every
    layer normalizes with its batch's statistics, so each sees its input as
    training produced it; use large batches. Use it after training with small or
    non-i.i.d. batches, after weight averaging, or on a new domain.
    BatchRenorm trains against its running statistics (with its bounds relaxed,
    its training output is the inference output), so recalibrating a
    BatchRenorm model changes what it computes: do it only when those statistics
    no longer describe its inputs (averaged weights, a new domain).

    Args:
      model: an NNX module with jaxrenorm NNX normalization layers (convert a
        Flax model's with `jaxrenorm.nnx.convert`).
      batches: an iterable of inputs; a tuple is passed as positional arguments.
        Sharded batches work.
      progress: show a tqdm progress bar (tqdm must be installed).
      **call_kwargs: passed to the model's call; a `mask` reaching a layer is
        honoured.

    Returns:
      `model`, with new running statistics.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> from flax import nnx
      >>> bn = jaxrenorm.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 3 + 5
      >>> bn = jaxrenorm.nnx.recalibrate(bn, [x[:40], x[40:]])
      >>> bool(jnp.allclose(bn.var[...], x.var(0), rtol=1e-5))
      True
    """
    return recalibrate_nnx(model, BatchNorm, batches, progress, call_kwargs)
