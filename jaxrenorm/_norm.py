"""Batch Normalization, Batch Renormalization and InstanceRenorm as pure functions.

The three public functions and the modules share one pipeline, `_normalize`, of
named stages with records between them:

1. `_validate`: every check, once; the input's `Layout` and the feature-shaped
   values (`PerFeature`: running mean and variance, scale, bias, gate).
2. `_broadcast`: those values reshaped to broadcast against the input and
   promoted to the dtype they are computed in.
3. Either `_inference` (the running statistics), or `_train`: the training
   forward pass `_train_forward` (its docstring maps each equation of the papers
   to the function that computes it): `_batch_moments`, `_coefficients` (a, c and
   the renorm terms r, d), and the output y = (x - shift) * a + c
   (`_affine_output`, or `_mix_instance`).
4. `_update_running`: the new running statistics.

Static settings reach the training forward pass as one frozen record (`Plan`,
derived from `Options` by `_plan`); traced values (the input, the per-feature
values, the mask and the renorm bounds) are its arguments.

Why this shape (the figures are in docs/benchmarks.md): one multiply-add with
per-feature coefficients keeps every full-size operation in a single elementwise
pass, and centering by the moments' own reference point k (not by mean = k + m1,
which rounds away the low bits on offset data) keeps the output accurate to a few
ulp. The backward pass is JAX's autodiff of this; what the compiled program needs
besides the math (the `jax.checkpoint` policy and what it saves, the cache of
checkpointed functions, kernels avoided) is in `jaxrenorm._xla`, where each piece
says why. A `custom_vjp` with the analytic backward would make the same passes
but break forward mode (jvp, jacfwd, hessian).

`tests/reference.py` computes every one of these functions independently, in
float64 NumPy, one formula per line; the tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrenorm._checks import (
    Axes,
    Layout,
    check_axis_bound,
    check_batch_stats,
    check_feature_shape,
    check_floating_dtype,
    check_groups_over_shards,
    check_instance_layout,
    check_layout,
    check_mask,
    check_moment_gradient,
    check_more_than_one_value,
    check_params,
    check_renorm,
    check_scalar,
    check_virtual_batch,
)
from jaxrenorm._docs import documents
from jaxrenorm._stats import (
    Moments,
    compute_moments,
    device_group_sizes,
    explicit_sharding,
    first_valid,
    merge_moments,
    sharded_like,
    stats_dtype,
)
from jaxrenorm._xla import (
    checkpointed,
    inverse_bound,
    materialized,
    rsqrt,
    saved,
    standard_promotion,
)
from jaxrenorm.typing import ArrayLike, BatchStats, DTypeLike, Params


class Options(NamedTuple):
    """Every keyword of `batch_norm`, `batch_renorm` and `instance_renorm`, as one record.

    The defaults are the public functions'. `r_max` None is plain BatchNorm (no
    renormalization); `instance` mixes in instance normalization through the gate
    `params["rho"]`; `initializing` marks a linen `init` call, whose batch may hold a
    single example.
    """

    use_running_average: bool
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: Any = None
    axis_index_groups: Any = None
    mask: jax.Array | None = None
    use_fast_variance: bool = True
    dtype: Any = None
    virtual_batch_size: int | None = None
    bessel_correction: bool = False
    r_max: Any = None
    d_max: Any = None
    grad_through_batch_moments: bool | str = True
    instance: bool = False
    initializing: bool = False  # a linen `init`: any batch, even of one, is fine
    # The `jax.checkpoint` policy of the training forward pass; None is the shipped
    # one (`jaxrenorm._xla.save_per_feature`). Not public: benchmarks/formulations.py
    # sets it, through a layer field of this name, to measure plain autodiff.
    remat_policy: Any = None

    @classmethod
    def of(cls, keywords: Mapping[str, Any], **extra: Any) -> Options:
        """The options among `keywords` (a public function's `locals()`), and `extra`."""
        return cls(**{k: v for k, v in keywords.items() if k in cls._fields}, **extra)


def init_batch_stats(
    feature_shape: int | Sequence[int], dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
    """Initial running statistics: mean 0 and variance 1 per feature (Flax's convention).

    Args:
      feature_shape: the number of features, or the shape of the feature axes.
      dtype: dtype of the statistics (float32 unless you have a reason).

    Returns:
      `{"mean": zeros(feature_shape), "var": ones(feature_shape)}`.

    Examples:
      >>> import jaxrenorm
      >>> jax_stats = jaxrenorm.init_batch_stats(3)
      >>> jax_stats["mean"].tolist(), jax_stats["var"].tolist()
      ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    """
    shape = check_feature_shape(feature_shape)
    check_floating_dtype(dtype)
    return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}


@documents("pure")
def batch_norm(
    x: ArrayLike,
    params: Params,
    batch_stats: BatchStats,
    *,
    use_running_average: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
    use_fast_variance: bool = True,
    dtype: DTypeLike | None = None,
    virtual_batch_size: int | None = None,
    bessel_correction: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch Normalization (Ioffe & Szegedy 2015), per feature.

    Training (`use_running_average=False`) normalizes with the mean mu_B and the
    biased variance var_B of the batch over every axis but `axis` (and over the
    devices of `axis_name`), then updates the running statistics:

        y = scale * (x - mu_B) / sqrt(var_B + epsilon) + bias
        mean <- momentum * mean + (1 - momentum) * mu_B
        var  <- momentum * var  + (1 - momentum) * var_B

    Inference (`use_running_average=True`) uses the running `mean` and `var` in
    place of mu_B and var_B and returns `batch_stats` unchanged.

    The running update follows Flax and never carries a gradient. If a feature's
    batch statistics are not finite (NaN or Inf in a valid input), or it has no
    valid element, that feature keeps its previous running statistics, the way
    `optax.apply_if_finite` skips a bad update: the output is still NaN, so the
    loss shows the problem, but one bad batch cannot destroy the model's
    statistics. A training call whose statistics would each come from one value
    per feature (one example without spatial axes on one device, or
    `virtual_batch_size=1` on a dense input) is a ValueError: the statistics of
    one value are the value itself, so every output would be the bias.

    Args:
      x: the input, real or complex floating point: a batch axis and the features,
        with any other axes (spatial, sequence) in between.
      params: the learned per-feature parameters: `{"scale": gamma, "bias": beta}`,
        each of the feature shape; a missing key (or None) means no scale or no
        bias.
      batch_stats: the running statistics, `{"mean": ..., "var": ...}` of the
        feature shape (see `init_batch_stats`).
      use_running_average: True normalizes with the running statistics (inference)
        and returns `batch_stats` unchanged; False normalizes with the batch's
        statistics (training) and returns updated running statistics.
      axis: the feature axis, or a tuple of feature axes: the statistics are
        computed over every other axis. Default -1, the last; as in
        flax.linen.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
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
      mask: a boolean array broadcastable to `x`: the statistics use the True
        positions only, weighted by their number on each device. False positions may
        hold NaN or Inf: they reach neither the statistics nor any gradient, and
        their outputs are finite. Left padding is as accurate as right padding: the
        one-pass variance shifts by each group's first valid element. A feature with
        no valid element keeps its running statistics and is normalized with them.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      dtype: the output dtype (default: the input's). The statistics are computed in
        at least float32 whatever the dtype.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.

    Returns:
      `(y, new_batch_stats)`; `new_batch_stats` has the same keys as `batch_stats`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3 + 1
      >>> params = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
      >>> stats = jaxrenorm.init_batch_stats(4)
      >>> y, stats = jaxrenorm.batch_norm(x, params, stats, use_running_average=False)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
      True
    """
    # Every keyword of the signature is a field of `Options`.
    return _normalize(x, params, batch_stats, Options.of(locals()), "batch_norm")[:2]


@documents("pure")
def batch_renorm(
    x: ArrayLike,
    params: Params,
    batch_stats: BatchStats,
    *,
    use_running_average: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
    use_fast_variance: bool = True,
    dtype: DTypeLike | None = None,
    virtual_batch_size: int | None = None,
    bessel_correction: bool = False,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    grad_through_batch_moments: bool | str = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch Renormalization (Ioffe 2017, arXiv 1702.03275, Algorithm 1), per feature.

    Training corrects the batch statistics towards the running ones with two
    per-feature constants r and d, so that the output is what inference will
    compute, up to clipping. With s_B = sqrt(var_B + epsilon) from the batch and
    s = sqrt(var + epsilon) from the running statistics *before* this batch's
    update:

        r = stop_gradient(clip(s_B / s, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mean) / s, -d_max, d_max))
        y = scale * ((x - mu_B) / s_B * r + d) + bias

    The gradient flows through mu_B and s_B as in BatchNorm; r and d are
    constants for it. Unclipped, y equals the inference output
    scale * (x - mean) / s + bias exactly. The running statistics are updated
    as in `batch_norm` (this library tracks the variance, as Flax does, where the
    paper tracks the standard deviation; s = sqrt(var + epsilon) differs from the
    paper's running s only by the Jensen gap of the square root). Inference is
    identical to `batch_norm`, and with `r_max=1`, `d_max=0` so is training. With
    virtual batches r and d are computed per group.

    Args:
      x: the input, real or complex floating point: a batch axis and the features,
        with any other axes (spatial, sequence) in between.
      params: the learned per-feature parameters: `{"scale": gamma, "bias": beta}`,
        each of the feature shape; a missing key (or None) means no scale or no
        bias.
      batch_stats: the running statistics, `{"mean": ..., "var": ...}` of the
        feature shape (see `init_batch_stats`).
      use_running_average: True normalizes with the running statistics (inference)
        and returns `batch_stats` unchanged; False normalizes with the batch's
        statistics (training) and returns updated running statistics.
      axis: the feature axis, or a tuple of feature axes: the statistics are
        computed over every other axis. Default -1, the last; as in
        flax.linen.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
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
      mask: a boolean array broadcastable to `x`: the statistics use the True
        positions only, weighted by their number on each device. False positions may
        hold NaN or Inf: they reach neither the statistics nor any gradient, and
        their outputs are finite. Left padding is as accurate as right padding: the
        one-pass variance shifts by each group's first valid element. A feature with
        no valid element keeps its running statistics and is normalized with them.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      dtype: the output dtype (default: the input's). The statistics are computed in
        at least float32 whatever the dtype.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.
      r_max: the bound on r, >= 1: r is clipped to [1 / r_max, r_max]. A Python
        float or a traced scalar, e.g. a schedule evaluated at the step inside `jit`
        (see `jaxrenorm.schedules`). `r_max=1` with `d_max=0` is BatchNorm.
      d_max: the bound on |d|, >= 0: d is clipped to [-d_max, d_max]. A Python float
        or a traced scalar.
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

    Returns:
      `(y, new_batch_stats)`, as `batch_norm`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> x = jax.random.normal(jax.random.key(0), (4, 3))
      >>> stats = jaxrenorm.init_batch_stats(3)
      >>> y, stats = jaxrenorm.batch_renorm(x, {}, stats, use_running_average=False,
      ...                                   r_max=1.5, d_max=0.5)
      >>> y.shape
      (4, 3)
    """
    return _normalize(x, params, batch_stats, Options.of(locals()), "batch_renorm")[:2]


@documents(
    "pure",
    x="the input, of rank >= 3: the batch, one or more spatial axes, and the features "
    "(e.g. NHWC, or NCHW with `axis=1`).",
    params='`{"rho": gate, "scale": gamma, "bias": beta}`, each of the feature shape; '
    '`"rho"` is required, a missing `"scale"` or `"bias"` (or None) means none.',
    axis="the feature axis or axes, which must not include axis 0 (the batch); every "
    "other axis is spatial. Default -1, the last.",
    mask="a boolean array broadcastable to `x`: the batch and the instance statistics "
    "use the True positions only. False positions may hold NaN or Inf.",
)
def instance_renorm(
    x: ArrayLike,
    params: Params,
    batch_stats: BatchStats,
    *,
    use_running_average: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    mask: ArrayLike | None = None,
    use_fast_variance: bool = True,
    dtype: DTypeLike | None = None,
    virtual_batch_size: int | None = None,
    bessel_correction: bool = False,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    grad_through_batch_moments: bool | str = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch Renormalization mixed with instance normalization by a learned gate rho.

    Axis 0 is the batch, `axis` the features and every other axis spatial. With
    BRN(x) = (x - mu_B) / s_B * r + d the batch-renormalized input (the running
    statistics at inference, as in `batch_renorm`) and
    IN(x) = (x - mu_i) / sqrt(var_i + epsilon) each example i normalized per
    feature over its spatial axes:

        y = scale * (rho * BRN(x) + (1 - rho) * IN(x)) + bias

    with rho per feature, used as clip(rho, 0, 1). The two branches are affine
    maps of each other: BN(x) = r_i * IN(x) + d_i with r_i = s_i / s_B and
    d_i = (mu_i - mu_B) / s_B, so rho interpolates between per-example and
    per-batch statistics, as in batch-instance normalization (Nam & Kim 2018),
    with a batch branch that is renormalized, so that training matches
    inference. rho = 1 is `batch_renorm`; rho = 0 is instance normalization
    with the affine map. The running statistics are those of `batch_renorm`,
    from one pass over the data (the batch moments are merged from the
    per-example ones). At inference the batch branch uses the running
    statistics, so each example's output depends on that example only.

    The gradient of rho is 0 where a descent step would push it further out of
    [0, 1] and passes otherwise, so rho never sticks at a bound (a custom VJP:
    forward-mode differentiation with respect to rho is therefore not
    available; `jax.jvp` with respect to x, scale and bias works). Weight decay
    on rho pulls it towards instance normalization: exclude it as you would a
    bias.

    Args:
      x: the input, of rank >= 3: the batch, one or more spatial axes, and the
        features (e.g. NHWC, or NCHW with `axis=1`).
      params: `{"rho": gate, "scale": gamma, "bias": beta}`, each of the feature
        shape; `"rho"` is required, a missing `"scale"` or `"bias"` (or None) means
        none.
      batch_stats: the running statistics, `{"mean": ..., "var": ...}` of the
        feature shape (see `init_batch_stats`).
      use_running_average: True normalizes with the running statistics (inference)
        and returns `batch_stats` unchanged; False normalizes with the batch's
        statistics (training) and returns updated running statistics.
      axis: the feature axis or axes, which must not include axis 0 (the batch);
        every other axis is spatial. Default -1, the last.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        flax.linen.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      epsilon: a small value added to the variance before the square root, >= 0; as
        in flax.linen.BatchNorm.
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
      mask: a boolean array broadcastable to `x`: the batch and the instance
        statistics use the True positions only. False positions may hold NaN or Inf.
      use_fast_variance: True (the default, as in flax.linen.BatchNorm) computes the
        variance in one pass, shifted by a sample of the data so that it stays
        accurate on offset data, where Flax's one-pass E[x^2] - E[x]^2 is not (x =
        1e4 + N(0, 1) in float32: relative error 1e-7 against 23). False computes
        the exact two-pass variance, at the cost of a second pass over the data (the
        collective with `axis_name` stays one).
      dtype: the output dtype (default: the input's). The statistics are computed in
        at least float32 whatever the dtype.
      virtual_batch_size: statistics over consecutive groups ("virtual" or "ghost"
        batches) of this many examples along axis 0, which it must divide; the
        running statistics move towards the mean over groups of the group means and
        variances. Groups are local to each device (no collective). None: the whole
        batch.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.
      r_max: the bound on r, >= 1: r is clipped to [1 / r_max, r_max]. A Python
        float or a traced scalar, e.g. a schedule evaluated at the step inside `jit`
        (see `jaxrenorm.schedules`). `r_max=1` with `d_max=0` is BatchNorm.
      d_max: the bound on |d|, >= 0: d is clipped to [-d_max, d_max]. A Python float
        or a traced scalar.
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

    Returns:
      `(y, new_batch_stats)`, as `batch_renorm`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
      >>> params = {"rho": jnp.full(3, 0.5), "scale": jnp.ones(3), "bias": jnp.zeros(3)}
      >>> stats = jaxrenorm.init_batch_stats(3)
      >>> y, stats = jaxrenorm.instance_renorm(x, params, stats, use_running_average=False)
      >>> y.shape
      (4, 5, 5, 3)
    """
    options = Options.of(locals(), instance=True)
    return _normalize(x, params, batch_stats, options, "instance_renorm")[:2]


class PerFeature(NamedTuple):
    """The per-feature values of a call: feature-shaped as validated, then broadcast.

    `_broadcast` reshapes them to broadcast against the input (size 1 on the
    reduced axes) and promotes them; a missing scale, bias or gate is None.
    """

    mean: jax.Array  # the running mean
    var: jax.Array  # the running variance
    scale: jax.Array | None
    bias: jax.Array | None
    gate: jax.Array | None  # InstanceRenorm's rho, used as clip(rho, 0, 1)


class Plan(NamedTuple):
    """Static settings of the forward pass, fixed before it is traced (`_plan`).

    The fields up to `dtype` are derived from the input's layout and the options;
    the others are the `Options` fields of the same name, copied.
    """

    reduction_axes: tuple[int, ...]
    example_axes: tuple[int, ...]  # the instance branch's per-example axis; () without it
    axis_name: Any  # None with virtual groups, which are local to each device
    grad_through_batch_moments: bool | str  # True, False or "adaptive"; True without renorm
    dtype: jnp.dtype  # statistics and output are computed in it: the input's, >= float32
    axis_index_groups: Any
    use_fast_variance: bool
    epsilon: float
    remat_policy: Any

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """The axes of each example's own statistics (the instance branch)."""
        return tuple(a for a in self.reduction_axes if a not in self.example_axes)


class RenormTerms(NamedTuple):
    """The correction of one training call, per (group and) feature, for diagnostics."""

    r: jax.Array  # clipped, as used
    d: jax.Array
    r_unclipped: jax.Array
    d_unclipped: jax.Array


@standard_promotion
def _normalize(
    x: ArrayLike,
    params: Params,
    batch_stats: BatchStats,
    options: Options,
    caller: str,
    layout: Layout | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], RenormTerms | None]:
    """The pipeline behind the public functions and the modules (see the module docstring).

    `caller` names the public function or module in error messages; `layout` is
    the input's when the caller has already checked it (the linen modules, which
    need the feature shape to create their variables). Returns the output, the new
    batch statistics and, for a renorm training call, the r and d terms.
    """
    x, layout, options, values = _validate(x, params, batch_stats, options, caller, layout)
    plan = _plan(layout, options, x.dtype)
    per_feature = _broadcast(values, layout, plan.dtype)
    out_dtype = x.dtype if options.dtype is None else jnp.dtype(options.dtype)
    if options.use_running_average:
        y = _inference(plan, x, per_feature, options.mask)
        return y.astype(out_dtype), dict(batch_stats), None
    group = _virtual_group(options, layout)
    bounds = None if options.r_max is None else (options.r_max, options.d_max)
    y, moments, terms = _train(plan, x, per_feature, options.mask, bounds, group)
    new_stats = _update_running(batch_stats, values, moments, options, grouped=group is not None)
    return y.astype(out_dtype), new_stats, terms


# --- stage 1: validate; stage 2: broadcast -------------------------------------


def _validate(
    x: ArrayLike,
    params: Params,
    batch_stats: BatchStats,
    options: Options,
    caller: str,
    layout: Layout | None,
) -> tuple[jax.Array, Layout, Options, PerFeature]:
    """Every check of a call, once (`jaxrenorm._checks`).

    Returns the input as an array, its layout, the options with the mask as a
    boolean array, and the feature-shaped values.
    """
    if layout is None:
        array, layout = check_layout(x, options.axis, options.axis_name is not None)
    else:  # checked by the caller (`layer_input`), which passes the array it returned
        array = cast(jax.Array, x)
    features, context = layout.feature_shape, layout.context
    scale, bias, gate = check_params(params, features, context, gate=options.instance)
    mean, var = check_batch_stats(batch_stats, features, context)
    check_scalar(options.momentum, "momentum", 0.0, 1.0)
    check_scalar(options.epsilon, "epsilon", 0.0)
    if options.mask is not None:
        options = options._replace(mask=check_mask(options.mask, layout.shape))
    if options.dtype is not None:
        check_floating_dtype(options.dtype)
    if options.instance:
        check_instance_layout(layout)
    if options.r_max is not None:
        check_renorm(options.r_max, options.d_max, array.dtype, caller)
        check_moment_gradient(options.grad_through_batch_moments)
    # Inference ignores virtual batches, so an eval batch of any size is fine.
    if not options.use_running_average:
        if options.virtual_batch_size is not None:
            check_virtual_batch(options.virtual_batch_size, layout)
        if options.axis_name is not None and options.virtual_batch_size is None:
            check_axis_bound(options.axis_name, caller)
        if not options.initializing:
            check_more_than_one_value(*_values_per_group(layout, options), caller)
    return array, layout, options, PerFeature(mean, var, scale, bias, gate)


def _values_per_group(layout: Layout, options: Options) -> tuple[int, tuple[int, ...], str]:
    """(values per feature in one training statistics group, the shape, how they count).

    Static: the shapes, the virtual group size and the number of devices that share
    the statistics (a mask's count is data and is not checked). A symbolic
    dimension (`jax.export`) makes the count symbolic, and a symbolic count is
    never 1 for the check: the size it stands for is not known until the call.
    """
    v = options.virtual_batch_size
    if v is not None:  # local groups of v examples
        values = math.prod(layout.shape[a] for a in layout.reduction_axes if a != 0) * v
        return values, layout.shape, f"virtual groups of {v} example, no other axis reduced"
    values = math.prod(layout.shape[a] for a in layout.reduction_axes)
    if values == 1 and options.axis_name is not None:
        # The smallest group of devices decides: its statistics have the fewest values.
        devices = min(device_group_sizes(options.axis_name, options.axis_index_groups))
        where = f"one example on the {devices} device along {options.axis_name!r}"
        return values * devices, layout.shape, where
    return values, layout.shape, "a batch of one example, no other axis reduced"


def _plan(layout: Layout, options: Options, dtype: jnp.dtype) -> Plan:
    """The static settings of a call over the whole batch (see `_train` for groups)."""
    derived = dict(
        reduction_axes=layout.reduction_axes,
        example_axes=(0,) if options.instance else (),
        # Virtual groups are local to each device, even a group that is the whole batch.
        axis_name=None if options.virtual_batch_size is not None else options.axis_name,
        grad_through_batch_moments=_moment_gradient(options),
        dtype=stats_dtype(dtype),
    )
    copied = {name: getattr(options, name) for name in Plan._fields if name not in derived}
    return Plan(**derived, **copied)


def _moment_gradient(options: Options) -> bool | str:
    """How the batch moments are differentiated: True (BatchNorm), False or "adaptive"."""
    setting = options.grad_through_batch_moments
    if options.r_max is None:
        return True
    return setting if isinstance(setting, str) else bool(setting)


def _broadcast(values: PerFeature, layout: Layout, dtype: jnp.dtype) -> PerFeature:
    """Feature-shaped values reshaped to broadcast against the input, and promoted.

    Feature axes are sorted, so a reshape puts each value on its axis. The mean and
    the bias are promoted to at least `dtype` (complex for a complex input), the
    variance, scale and gate to at least its real counterpart.
    """
    real = jnp.finfo(dtype).dtype
    target = tuple(1 if i in layout.reduction_axes else s for i, s in enumerate(layout.shape))

    def cast(v: jax.Array, to: jnp.dtype) -> jax.Array:
        return jnp.reshape(v, target).astype(jnp.promote_types(to, v.dtype))

    def cast_present(v: jax.Array | None, to: jnp.dtype) -> jax.Array | None:
        return None if v is None else cast(v, to)

    return PerFeature(
        mean=cast(values.mean, dtype),
        var=cast(values.var, real),
        scale=cast_present(values.scale, real),
        bias=cast_present(values.bias, dtype),
        gate=cast_present(values.gate, real),
    )


# --- stage 3: inference, or the training forward pass ---------------------------


def _inference(
    plan: Plan, x: jax.Array, per_feature: PerFeature, mask: jax.Array | None
) -> jax.Array:
    """y = (x - mean) * scale / s + bias with the running statistics, s = sqrt(var + eps).

    The instance branch mixes in each example's own moments, so no example's
    output depends on another example.
    """
    a = rsqrt(per_feature.var + plan.epsilon)
    a = a if per_feature.scale is None else a * per_feature.scale
    x = x.astype(plan.dtype)
    if per_feature.gate is None:
        return _plus((x - per_feature.mean) * a, per_feature.bias)
    parts = compute_moments(
        x, plan.spatial_axes, mask=mask, use_fast_variance=plan.use_fast_variance
    )
    return _mix_instance(x, mask, per_feature.mean, a, per_feature.bias, parts, per_feature, plan)


def _virtual_group(options: Options, layout: Layout) -> int | None:
    """The size of the virtual groups a training call splits the batch into, or None."""
    v = options.virtual_batch_size
    return None if v is None or v == layout.shape[0] else v


def _train(
    plan: Plan,
    x: jax.Array,
    per_feature: PerFeature,
    mask: jax.Array | None,
    bounds: tuple[Any, Any] | None,
    group: int | None,
) -> tuple[jax.Array, Moments, RenormTerms | None]:
    """The training forward pass over the batch, or over each virtual group of `group`.

    Returns the output, the batch moments (per group: a leading group axis) and
    the renorm terms (None without `bounds`, the traced or concrete (r_max, d_max)).
    """
    if group is not None:
        # (N, ...) -> (N / v, v, ...): axis 0 indexes groups, which keep their own
        # statistics, and every other axis shifts by one.
        mask = None if mask is None else _group_mask(mask, x.shape, group)
        x = _split_groups(x, group)
        per_feature = PerFeature._make(None if v is None else v[None] for v in per_feature)
        plan = plan._replace(
            reduction_axes=(1, *(a + 1 for a in plan.reduction_axes if a != 0)),
            example_axes=(1,) if plan.example_axes else (),
        )
    # Differentiated under `jax.checkpoint`, saving only per-feature values (`jaxrenorm._xla`).
    forward = checkpointed(_train_forward, plan, x, plan.remat_policy)
    y, moments, terms = forward(x, per_feature, mask, bounds)
    return (y if group is None else _merge_groups(y)), moments, terms


def _train_forward(
    plan: Plan,
    x: jax.Array,
    per_feature: PerFeature,
    mask: jax.Array | None,
    bounds: tuple[Any, Any] | None,
) -> tuple[jax.Array, Moments, RenormTerms | None]:
    """The training forward pass: batch moments -> coefficients -> output.

    Algorithm 1 of Ioffe 2017 (arXiv 1702.03275), per feature over the batch (or
    each virtual group), and where each line is computed:

        mu_B = mean(x)                                  `_batch_moments` (as shift + m1)
        s_B = sqrt(epsilon + mean((x - mu_B)^2))        `_batch_moments`, `_coefficients`
        r = stop_gradient(clip(s_B / s, 1/r_max, r_max))     `_renorm_terms`
        d = stop_gradient(clip((mu_B - mu) / s, -d_max, d_max))  `_renorm_terms`
        x_hat = (x - mu_B) / s_B * r + d                `_coefficients` (a, c), then
        y = gamma * x_hat + beta                        `_affine_output`: (x - shift) * a + c
        mu += alpha * (mu_B - mu), likewise the variance     `_update_running` (after this)

    BatchNorm is the same with r = 1, d = 0. InstanceRenorm adds per example i,
    over its spatial axes, mu_i and s_i (`_batch_moments`, which merges them into
    mu_B and s_B in one pass) and mixes y = rho * y_B + (1 - rho) * (gamma *
    (x - mu_i) / s_i + beta) with rho = clip(rho, 0, 1) (`_mix_instance`,
    `_unit_gate`). `grad_through_batch_moments` stops (False) or weights
    ("adaptive", `_moment_gradient_weight`) the gradient through mu_B and s_B.
    `tests/reference.py` computes each line in float64 NumPy (`normalize`,
    `instance_renorm`). Wrapped by `jaxrenorm._xla.checkpointed` in `_train`.
    """
    # Widen once: every use of x then shares one conversion, so the gradient of a
    # half-precision input is summed in float32 and rounded once (converting per
    # use rounded each contribution to bfloat16 and let opposite ones cancel).
    x = x.astype(plan.dtype)
    moments, parts = _batch_moments(plan, x, per_feature.mean, mask)
    if plan.grad_through_batch_moments is False:
        moments = moments._replace(
            offset=lax.stop_gradient(moments.offset), var=lax.stop_gradient(moments.var)
        )
    elif plan.grad_through_batch_moments == "adaptive" and 0 not in plan.reduction_axes:
        # Virtual groups (on axis 0): scale the moments' gradient by how alike they are.
        weight = _moment_gradient_weight(moments, plan.epsilon)
        moments = moments._replace(
            offset=_scaled_gradient(moments.offset, weight),
            var=_scaled_gradient(moments.var, weight),
        )
    a, c, terms = _coefficients(plan, moments, per_feature, bounds)
    if per_feature.gate is None:
        y = _affine_output(x, mask, moments.shift, a, c)
    else:
        assert parts is not None  # a gate comes with example axes, and their moments
        y = _mix_instance(x, mask, moments.shift, a, c, parts, per_feature, plan)
    return y, moments, terms


def _batch_moments(
    plan: Plan, x: jax.Array, running_mean: jax.Array, mask: jax.Array | None
) -> tuple[Moments, Moments | None]:
    """The batch's moments, and the per-example ones they merge for the instance branch.

    The shift of the one-pass variance is a sample of each group: its first valid
    element (the running mean where a group has none). With `axis_name` each
    device's moments are about its own sample, merged exactly across devices
    (`jaxrenorm._stats.across_devices`), so the devices' running statistics need
    not be equal.
    """
    running_mean = lax.stop_gradient(running_mean)
    collective = dict(
        axis_name=plan.axis_name,
        axis_index_groups=plan.axis_index_groups,
        use_fast_variance=plan.use_fast_variance,
    )

    def first_valid_of(v, axes, valid):  # None: the first element, valid without a mask
        return None if valid is None else first_valid(v, axes, valid, running_mean)

    if not plan.example_axes:
        shift = first_valid_of(x, plan.reduction_axes, mask)
        moments = compute_moments(x, plan.reduction_axes, mask=mask, shift=shift, **collective)
        return Moments._make(saved(v) for v in moments), None
    # One pass over the data: per-example moments (each with its own shift, so an
    # example's small spread survives its offset), merged into the batch's.
    parts = compute_moments(
        x,
        plan.spatial_axes,
        mask=mask,
        use_fast_variance=plan.use_fast_variance,
        shift=first_valid_of(x, plan.spatial_axes, mask),
    )
    parts = Moments._make(saved(v) for v in parts)
    # An example may have no valid element: the first example that has one.
    common = first_valid_of(
        parts.shift, plan.example_axes, None if mask is None else parts.count > 0
    )
    moments = merge_moments(
        parts, plan.example_axes, shift=common, static_count=mask is None, **collective
    )
    return Moments._make(saved(v) for v in moments), parts


def _moment_gradient_weight(moments: Moments, epsilon: float) -> jax.Array:
    """Per feature, exp(-max(F - 1, 0)) with F the groups' one-way ANOVA F statistic.

    F = n s_b^2 / (s_w^2 + epsilon) over the G groups (axis 0) with a valid
    element, n their mean count, s_b^2 the unbiased variance of the group means and
    s_w^2 the mean of the unbiased group variances: about 1 when the groups are
    samples of one distribution (their means then scatter with variance var / n),
    large when each group holds its own kind of data (one class per group). With
    fewer than two such groups the weight is 1. A constant for differentiation.
    """
    moments = Moments(*(lax.stop_gradient(v) for v in moments))
    valid = moments.count > 0
    groups = jnp.sum(valid, axis=0, keepdims=True)

    def group_mean(v: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(valid, v, 0), axis=0, keepdims=True) / jnp.maximum(groups, 1)

    mean, n = moments.mean, group_mean(moments.count)
    between = group_mean(jnp.square(mean - group_mean(mean))) * groups / jnp.maximum(groups - 1, 1)
    within = group_mean(moments.var) * n / jnp.maximum(n - 1, 1)
    ratio = n * between / (within + epsilon)
    return jnp.where(groups > 1, jnp.exp(-jnp.maximum(ratio - 1, 0)), 1.0)


@jax.custom_jvp
def _scaled_gradient(v: jax.Array, weight: jax.Array) -> jax.Array:
    """v, whose derivative is scaled by `weight` (0: a constant, 1: unchanged)."""
    return v


@_scaled_gradient.defjvp
def _scaled_gradient_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (v, weight), (dv, _) = primals, tangents
    return v, dv * weight


def _coefficients(
    plan: Plan, moments: Moments, per_feature: PerFeature, bounds: tuple[Any, Any] | None
) -> tuple[jax.Array, jax.Array, RenormTerms | None]:
    """(a, c, terms) of y = (x - shift) * a + c, per feature.

    With s_B = sqrt(var_B + epsilon), m1 = mu_B - shift (the moments' own offset)
    and, for Batch Renormalization (`bounds`), the terms r and d of `_renorm_terms`
    (BatchNorm: r = 1, d = 0):

        a = scale * r / s_B
        c = bias + scale * d - m1 * a

    so that y = scale * ((x - mu_B) / s_B * r + d) + bias. Written with c rather
    than (x - mu_B) so that the backward pass needs only the per-feature sums of g
    and of g * (x - shift): the cotangent of c is sum(g), shared with the bias's.
    Every coefficient is `saved` for the backward pass, r / s_B and d before the
    scale too (the scale's gradient needs them).
    """
    scale, bias = per_feature.scale, per_feature.bias
    inv_std = rsqrt(moments.var + plan.epsilon)  # 1 / s_B
    terms = None if bounds is None else _renorm_terms(plan, moments, per_feature, bounds, inv_std)
    r_over_s, d = (inv_std, None) if terms is None else (inv_std * terms.r, terms.d)
    r_over_s, d = saved(r_over_s), saved(d)
    a, scaled_d = _times(r_over_s, scale), _times(d, scale)
    a, b = saved(a), saved(_plus(scaled_d, bias))  # b = bias + scale * d
    c = saved(_plus(b, -moments.offset * a))
    return a, c, terms


def _renorm_terms(
    plan: Plan,
    moments: Moments,
    per_feature: PerFeature,
    bounds: tuple[Any, Any],
    inv_std: jax.Array,
) -> RenormTerms:
    """Batch Renormalization's r and d against the running statistics, clipped.

    With s = sqrt(var + epsilon) from the running statistics before this call's
    update:

        r = stop_gradient(clip(s_B / s, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mean) / s, -d_max, d_max))

    `inv_std` is 1 / s_B, so s_B = (var_B + epsilon) * inv_std needs no second
    square root; mu_B - mean = (shift - mean) + m1 keeps the low bits of m1.
    """
    r_max, d_max = bounds
    inv_run_std = rsqrt(per_feature.var + plan.epsilon)  # 1 / s
    r = lax.stop_gradient((moments.var + plan.epsilon) * inv_std * inv_run_std)
    d = lax.stop_gradient(((moments.shift - per_feature.mean) + moments.offset) * inv_run_std)
    clipped_r = jnp.clip(r, inverse_bound(r_max, r), r_max)
    clipped_r, clipped_d = materialized(clipped_r, jnp.clip(d, -d_max, d_max))
    return RenormTerms(r=clipped_r, d=clipped_d, r_unclipped=r, d_unclipped=d)


def _affine_output(
    x: jax.Array, mask: jax.Array | None, shift: jax.Array, a: jax.Array, c: jax.Array
) -> jax.Array:
    """y = (x - shift) * a + c: one multiply-add per element."""
    if mask is not None:
        # A masked position that is not finite would put 0 * NaN into the gradient
        # of a and c even when the loss ignores it; normalize the shift there.
        x = jnp.where(mask | jnp.isfinite(x), x, shift)
    return (x - shift) * a + c


def _mix_instance(
    x: jax.Array,
    mask: jax.Array | None,
    shift: jax.Array,
    a: jax.Array,
    c: jax.Array | None,
    parts: Moments,
    per_feature: PerFeature,
    plan: Plan,
) -> jax.Array:
    """gate * y_B + (1 - gate) * (scale * IN(x) + bias), as one multiply-add per element.

    The batch branch is y_B = (x - shift) * a + c (scale and bias included); the
    instance branch normalizes each example with its own moments `parts`. Both are
    affine in x, so the mix is (x - k_i) * A_i + C_i with per-example, per-feature
    coefficients, centred on each example's own shift k_i for accuracy.

    An example with no valid element has no moments of its own (a variance of 0
    would scale its masked positions by 1 / sqrt(epsilon)): its outputs are the
    batch branch's, at the scale of the others.
    """
    gate, scale, bias = _unit_gate(per_feature.gate), per_feature.scale, per_feature.bias
    a_in = rsqrt(parts.var + plan.epsilon)
    a_in = a_in if scale is None else a_in * scale
    c_batch = _plus((parts.shift - shift) * a, c)
    c_in = _plus(-parts.offset * a_in, bias)
    a_mix, c_mix = gate * a + (1 - gate) * a_in, gate * c_batch + (1 - gate) * c_in
    if mask is not None:  # only a mask can leave an example empty
        empty = parts.count == 0
        a_mix, c_mix = jnp.where(empty, a, a_mix), jnp.where(empty, c_batch, c_mix)
    a_mix, c_mix = saved(a_mix), saved(c_mix)
    if mask is not None:
        # As in `_affine_output`: no 0 * NaN from masked positions reaches gradients.
        x = jnp.where(mask | jnp.isfinite(x), x, parts.shift)
    return (x - parts.shift) * a_mix + c_mix


@jax.custom_vjp
def _unit_gate(rho: jax.Array) -> jax.Array:
    """clip(rho, 0, 1), whose gradient is never stuck at the bounds.

    Plain clipping has zero gradient outside [0, 1], so a gate that one optimizer
    step pushes to 1.001 would stay there for good. Here the gradient passes
    wherever a descent step moves rho towards [0, 1] (or within it) and is 0 where
    it would push rho further out: projected gradient descent (Nam & Kim 2018 clip
    rho after each update) without touching the optimizer.
    """
    return jnp.clip(rho, 0, 1)


def _unit_gate_fwd(rho: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.clip(rho, 0, 1), rho


def _unit_gate_bwd(rho: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # A descent step moves rho by -g: inward when rho > 1 and g > 0, or rho < 0 and g < 0.
    inward = ((rho >= 0) & (rho <= 1)) | ((rho > 1) & (g > 0)) | ((rho < 0) & (g < 0))
    return (jnp.where(inward, g, jnp.zeros_like(g)),)


_unit_gate.defvjp(_unit_gate_fwd, _unit_gate_bwd)


@overload
def _plus(u: jax.Array, v: jax.Array | None) -> jax.Array: ...
@overload
def _plus(u: jax.Array | None, v: jax.Array) -> jax.Array: ...
@overload
def _plus(u: jax.Array | None, v: jax.Array | None) -> jax.Array | None: ...
def _plus(u: jax.Array | None, v: jax.Array | None) -> jax.Array | None:
    """u + v where None stands for an absent (zero) term."""
    return u if v is None else (v if u is None else u + v)


@overload
def _times(u: jax.Array, v: jax.Array | None) -> jax.Array: ...
@overload
def _times(u: jax.Array | None, v: jax.Array | None) -> jax.Array | None: ...
def _times(u: jax.Array | None, v: jax.Array | None) -> jax.Array | None:
    """u * v where None stands for an absent term: a missing scale (1) or d (0)."""
    return u if v is None else (None if u is None else u * v)


# --- virtual groups -------------------------------------------------------------


def _group_mask(mask: jax.Array, x_shape: tuple[int, ...], v: int) -> jax.Array:
    """A mask broadcastable to x, reshaped like x into (N / v, v, ...)."""
    mask = mask[(None,) * (len(x_shape) - mask.ndim)]
    return mask[:, None] if mask.shape[0] == 1 else _split_groups(mask, v)


def _split_groups(a: jax.Array, v: int) -> jax.Array:
    """(N, ...) -> (N / v, v, ...), keeping an explicit sharding of axis 0 on the groups."""
    shape = (a.shape[0] // v, v, *a.shape[1:])
    mesh, spec = explicit_sharding(a)
    if mesh is None or spec[0] is None:
        return a.reshape(shape)
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    check_groups_over_shards(
        v, a.shape[0], int(np.prod([mesh.shape[name] for name in names])), spec[0]
    )
    out = NamedSharding(mesh, P(spec[0], None, *spec[1:]))
    return lax.reshape(a, shape, out_sharding=out)


def _merge_groups(a: jax.Array) -> jax.Array:
    """(G, v, ...) -> (G * v, ...), the inverse of `_split_groups`."""
    shape = (a.shape[0] * a.shape[1], *a.shape[2:])
    mesh, spec = explicit_sharding(a)
    if mesh is None:
        return a.reshape(shape)
    return lax.reshape(a, shape, out_sharding=NamedSharding(mesh, P(spec[0], *spec[2:])))


# --- stage 4: the running update ------------------------------------------------


def _update_running(
    batch_stats: BatchStats, running: PerFeature, moments: Moments, options: Options, grouped: bool
) -> dict[str, jax.Array]:
    """Exponential moving averages of the batch moments, skipping non-finite features.

    `running` holds the feature-shaped running mean and variance. With virtual
    batches (`grouped`, groups on axis 0 of `moments`), the batch estimate is the
    mean over groups with a valid element of the group means and group variances.
    With `bessel_correction`, each variance is first scaled by n / (n - 1) for its
    own valid count n (left as is where n = 1).
    """
    shape, momentum = running.mean.shape, options.momentum
    mean, var = lax.stop_gradient(moments.mean), lax.stop_gradient(moments.var)
    count = moments.count
    if options.bessel_correction:
        var = var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1), 1)
    has_data = count > 0
    if grouped:
        weight = has_data.astype(var.dtype)
        groups = jnp.maximum(weight.sum(0), 1)
        mean = (jnp.where(has_data, mean, 0) * weight).sum(0) / groups
        var = (jnp.where(has_data, var, 0) * weight).sum(0) / groups
        has_data = has_data.any(0)
    batch_mean, batch_var = mean.reshape(shape), var.reshape(shape)
    ok = jnp.isfinite(batch_mean) & jnp.isfinite(batch_var) & has_data.reshape(shape)
    new_mean = momentum * running.mean + (1 - momentum) * batch_mean
    new_var = momentum * running.var + (1 - momentum) * batch_var
    # Keep the stored dtype (float32), unless that would drop a complex mean's
    # imaginary part.
    mean_dtype = new_mean.dtype if jnp.iscomplexobj(new_mean) else running.mean.dtype
    old_mean, old_var = sharded_like(running.mean, new_mean), sharded_like(running.var, new_var)
    return {
        **batch_stats,
        "mean": jnp.where(ok, new_mean, old_mean).astype(mean_dtype),
        "var": jnp.where(ok, new_var, old_var).astype(running.var.dtype),
    }
