"""BatchNorm, BatchRenorm and InstanceRenorm for Equinox, on the library's core.

The layers are `equinox.Module`s with Equinox's conventions: written for one
example, channels first (`(input_size, dim_1, ...)`), batched with
`jax.vmap(..., axis_name=...)` (or `pmap`, `shard_map`), the statistics coming
from one collective over the named axis; the running statistics live in an
`eqx.nn.State`, so a call is `y, state = layer(x, state)`;
`eqx.nn.inference_mode` switches them to evaluation and `eqx.nn.make_with_state`
builds them. The constructor is `eqx.nn.BatchNorm`'s, with the options of the
Flax layers after it:

    import equinox as eqx, jax, jaxrenorm

    bn, state = eqx.nn.make_with_state(jaxrenorm.equinox.BatchRenorm)(16, "batch")
    batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, state = batched(x, state)  # x: (batch, 16, ...)

Where the layers differ from `eqx.nn.BatchNorm` (0.13), on purpose:

- `mode="batch"` (the default here; Equinox's unspecified mode is a deprecated
  alias of "ema" that warns) keeps zero-debiased running averages, as Equinox's
  does, but starts them at 0 as a debiased average must: Equinox starts the hidden
  variance at 1 and divides it by 1 - momentum^t like the mean, which overestimates
  the variance for the first few hundred steps (tenfold after 3 calls with the
  default momentum). The state holds the debiased averages themselves, so
  inference, renormalization and `recalibrate` read them directly.
- `mode="ema"`: the running averages start at the first batch's statistics and
  then decay with `momentum`, as in Equinox, but training normalizes with the
  batch's statistics (or BatchRenorm's correction of them), as the papers and
  every other library do. Equinox's "ema" normalizes training batches with the
  running averages, the behaviour its maintainers replaced by "batch" (its
  deprecation warning links the discussion), since gradients then ignore most of
  what normalizes the batch.
- The variance is computed in one pass about a sample of the data (or two passes
  with `use_fast_variance=False`), merged exactly across the named axis, in at
  least float32: accurate on offset data, where E[x^2] - E[x]^2 is not.
- Half-precision inputs with float32 parameters work under
  `jax_numpy_dtype_promotion="strict"`, and the layers under
  `jax_numpy_rank_promotion="raise"`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxrenorm import schedules
from jaxrenorm._checks import check_mode, check_scalar
from jaxrenorm._docs import documents
from jaxrenorm._layers import (
    DIAGNOSTICS,
    bounds_at,
    debiased_momentum,
    layer_input,
    normalize_layer,
    renorm_diagnostics,
    running_stats_dtype,
    step_count,
)
from jaxrenorm._norm import RenormTerms
from jaxrenorm._recalibration import (
    Moments,
    pooled_inputs,
    population_statistics,
    recording_inputs,
)
from jaxrenorm._xla import standard_promotion
from jaxrenorm.typing import ArrayLike, Bound, DTypeLike

__all__ = ["BatchNorm", "BatchRenorm", "InstanceRenorm", "convert", "recalibrate"]

Mode = Literal["batch", "ema"]
M = TypeVar("M")


def _default_dtype() -> Any:
    """Equinox's default: float32, or float64 when JAX runs with `jax_enable_x64`."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


@documents("equinox")
class BatchNorm(eqx.nn.StatefulLayer):
    """Batch Normalization (Ioffe & Szegedy 2015) for Equinox, a drop-in for `eqx.nn.BatchNorm`.

    Normalizes one example `(input_size, dim_1, ...)` per call, inside a `vmap`
    (or `pmap`, `shard_map`) whose `axis_name` holds the batch: the statistics of
    each channel are taken over the spatial dimensions and the named axes, with one
    collective. The math is `jaxrenorm.batch_norm`'s. See the module docstring for
    where the layer differs from Equinox's.

    Args:
      input_size: the number of channels, the size of the example's first axis.
      axis_name: the named axis, or tuple of axis names, of the `vmap` (or `pmap`,
        `shard_map`) whose examples share the statistics, computed with one
        collective over those axes; as in eqx.nn.BatchNorm. Each device's moments
        are about a sample of its own data and are merged exactly.
      eps: a small value added to the variance before the square root, >= 0; as in
        eqx.nn.BatchNorm.
      channelwise_affine: learn a per-channel `weight` (gamma) and `bias` (beta); as
        in eqx.nn.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        eqx.nn.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      inference: True normalizes with the running statistics (evaluation), False
        with the batch's, returning the state with the running ones updated
        (training). `eqx.nn.inference_mode` sets it, and the call's `inference`
        takes precedence. As in eqx.nn.BatchNorm.
      dtype: the dtype of `weight`, `bias` and the running statistics: float32 by
        default (float64 with `jax_enable_x64`), as in eqx.nn.BatchNorm. The output
        dtype promotes the input's with the parameters'; the statistics are computed
        in at least float32.
      mode: "batch" (the default): zero-debiased running averages that start at 0,
        whose variance eqx.nn.BatchNorm starts at 1 instead, overestimating it for
        hundreds of steps; "ema": running averages that start at the first batch's
        statistics. Either way a training call normalizes with the batch's
        statistics (eqx.nn.BatchNorm's "ema" normalizes with the running averages).
      axis_index_groups: groups of indices along `axis_name` (a `pmap`'s), each
        normalized with its own statistics (e.g. `[[0, 1], [2, 3]]`); `vmap` has no
        groups.
      use_fast_variance: True (the default) computes the variance in one pass,
        shifted by a sample of the data so that it stays accurate on offset data;
        False computes the exact two-pass variance, at the cost of a second pass
        over the data (the collective stays one). eqx.nn.BatchNorm computes two
        passes.
      virtual_batch_size: statistics over consecutive groups of this many examples
        along the input's first axis, for a layer called on a batch rather than one
        example. A layer called on one example, the Equinox way, has no examples to
        group: nest two vmaps, the inner one over the examples of a group, or use
        `axis_index_groups` under `pmap`. None: no groups.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.

    Examples:
      >>> import equinox as eqx, jax, jaxrenorm
      >>> bn, state = eqx.nn.make_with_state(jaxrenorm.equinox.BatchNorm)(3, "batch")
      >>> x = jax.random.normal(jax.random.key(0), (8, 3, 5)) + 4
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> evaluate = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch",
      ...                     in_axes=(0, None), out_axes=(0, None))
      >>> y_eval, _ = evaluate(x, state)
      >>> mean, var = state.get(bn.state_index)  # the debiased running averages
      >>> bool(abs(mean.mean() - 4) < 0.2)
      True
    """

    weight: jax.Array | None
    bias: jax.Array | None
    # `(mean, var)` under Equinox's names (one of the two is None, as in
    # eqx.nn.BatchNorm; `state_index` is the other), and the training-call counter.
    ema_state_index: eqx.nn.StateIndex | None
    batch_state_index: eqx.nn.StateIndex | None
    steps_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Mode = eqx.field(static=True)
    axis_index_groups: Any = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)
    bessel_correction: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Mode = "batch",
        *,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        virtual_batch_size: int | None = None,
        bessel_correction: bool = False,
    ):
        check_scalar(momentum, "momentum", 0.0, 1.0)
        check_scalar(eps, "eps", 0.0)
        check_mode(mode)
        dtype = running_stats_dtype(dtype, _default_dtype())
        shape = (input_size,)
        self.weight = jnp.ones(shape, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(shape, dtype) if channelwise_affine else None
        statistics = eqx.nn.StateIndex((jnp.zeros(shape, dtype), jnp.ones(shape, dtype)))
        self.ema_state_index = statistics if mode == "ema" else None
        self.batch_state_index = statistics if mode == "batch" else None
        self.steps_index = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.virtual_batch_size = virtual_batch_size
        self.bessel_correction = bessel_correction

    @property
    def state_index(self) -> eqx.nn.StateIndex:
        """The state entry `(mean, var)`: the running statistics, whatever the mode.

        In "batch" mode they are the zero-debiased averages themselves (Equinox's
        entry holds the biased ones).
        """
        index = self.ema_state_index or self.batch_state_index
        assert index is not None
        return index

    # Read by name by the glue (`jaxrenorm._layers.normalize_layer`), like the
    # fields of the Flax layers: the input's channels are its first axis (the
    # second for InstanceRenorm, which adds a batch axis of one), the output dtype
    # promotes the input's with the parameters', and Equinox's `eps` is `epsilon`.
    @property
    def axis(self) -> int:
        return 0

    @property
    def dtype(self) -> None:
        return None

    @property
    def epsilon(self) -> float:
        return self.eps

    @standard_promotion
    def __call__(
        self,
        x: ArrayLike,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: ArrayLike | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes `x` and, in training, returns the state with new running statistics.

        Args:
          x: one example, `(input_size, dim_1, ..., dim_N)` (N >= 0), under a
            `vmap` (`pmap`, `shard_map`) with the layer's `axis_name`.
          state: the `eqx.nn.State` holding the running statistics.
          key: ignored, for the Equinox API.
          inference: overrides the layer's `inference` for this call.
          mask: a boolean array broadcastable to `x`, or a scalar for the whole
            example: the statistics use the True positions only (an example whose
            mask is False takes no part in them).

        Returns:
          `(y, state)`: the normalized example, and the state (with new running
          statistics after a training call).
        """
        del key
        inference = self.inference if inference is None else inference
        x = self._as_batch(jnp.asarray(x))
        x, layout = layer_input(self, x, mask)
        mean, var = state.get(self.state_index)
        steps = step_count(state.get(self.steps_index))
        params = {"scale": self.weight, "bias": self.bias}
        y, new_stats, terms = normalize_layer(
            self,
            x,
            layout,
            {k: v for k, v in params.items() if v is not None},
            {"mean": mean, "var": var},
            bounds=self._bounds_at(steps),
            use_running_average=inference,
            momentum=self._momentum_at(steps),
            mask=mask,
        )
        y = self._as_example(y)
        if inference:
            return y, state
        state = state.set(self.state_index, (new_stats["mean"], new_stats["var"]))
        state = state.set(self.steps_index, steps + 1)
        return y, self._after_training_call(terms, state)

    def _momentum_at(self, steps: jax.Array) -> Any:
        """The decay of this call's update, which makes the running values what `mode` says.

        "ema": 0 on the first call (the averages start at the first batch), then
        `momentum`. "batch": m (1 - m^t) / (1 - m^(t + 1)) at step t, which turns the
        zero-debiased average hidden_t / (1 - m^t) of the batches so far, hidden_t
        = m hidden_(t-1) + (1 - m) batch_t from 0, into the same recursion on the
        debiased values themselves (0 on the first call, then towards m).
        """
        m = self.momentum
        if self.mode == "batch":
            return debiased_momentum(m, steps)
        return jnp.where(steps == 0, 0.0, m)

    def _as_batch(self, x: jax.Array) -> jax.Array:
        return x

    def _as_example(self, y: jax.Array) -> jax.Array:
        return y

    # The hooks of the family contract (`jaxrenorm._layers`).

    def _bounds(self) -> tuple[Any, Any]:
        return None, None

    def _bounds_at(self, steps: jax.Array) -> tuple[Any, Any]:
        """This call's renorm bounds at training step `steps`; (None, None) is BatchNorm."""
        return None, None

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array | None:
        return None

    def _after_training_call(self, terms: RenormTerms | None, state: eqx.nn.State) -> eqx.nn.State:
        """The state with what a training call records besides the running statistics."""
        return state

    def _record_input(self, moments: Moments) -> None:
        records = _RECORDS.get()
        if records is not None:
            records.setdefault(self.state_index.marker, []).append(moments)


@documents("equinox")
class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) for Equinox.

    Training normalizes with the batch statistics corrected towards the running
    ones by r = clip(s_B / s, 1 / r_max, r_max) and d = clip((mu_B - mu) / s,
    -d_max, d_max) (`jaxrenorm.batch_renorm`), so that training and inference agree
    and small or non-i.i.d. batches train well. The bounds' schedules run on the
    layer's `steps` counter, kept in the state with the running statistics.

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
        `r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) in
        the state, as a dict under `layer.diagnostics_index` (zeros until the first
        training call). Off by default.

    Args: Inherited from BatchNorm:
      input_size: the number of channels, the size of the example's first axis.
      axis_name: the named axis, or tuple of axis names, of the `vmap` (or `pmap`,
        `shard_map`) whose examples share the statistics, computed with one
        collective over those axes; as in eqx.nn.BatchNorm. Each device's moments
        are about a sample of its own data and are merged exactly.
      eps: a small value added to the variance before the square root, >= 0; as in
        eqx.nn.BatchNorm.
      channelwise_affine: learn a per-channel `weight` (gamma) and `bias` (beta); as
        in eqx.nn.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        eqx.nn.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      inference: True normalizes with the running statistics (evaluation), False
        with the batch's, returning the state with the running ones updated
        (training). `eqx.nn.inference_mode` sets it, and the call's `inference`
        takes precedence. As in eqx.nn.BatchNorm.
      dtype: the dtype of `weight`, `bias` and the running statistics: float32 by
        default (float64 with `jax_enable_x64`), as in eqx.nn.BatchNorm. The output
        dtype promotes the input's with the parameters'; the statistics are computed
        in at least float32.
      mode: "batch" (the default): zero-debiased running averages that start at 0,
        whose variance eqx.nn.BatchNorm starts at 1 instead, overestimating it for
        hundreds of steps; "ema": running averages that start at the first batch's
        statistics. Either way a training call normalizes with the batch's
        statistics (eqx.nn.BatchNorm's "ema" normalizes with the running averages).
      axis_index_groups: groups of indices along `axis_name` (a `pmap`'s), each
        normalized with its own statistics (e.g. `[[0, 1], [2, 3]]`); `vmap` has no
        groups.
      use_fast_variance: True (the default) computes the variance in one pass,
        shifted by a sample of the data so that it stays accurate on offset data;
        False computes the exact two-pass variance, at the cost of a second pass
        over the data (the collective stays one). eqx.nn.BatchNorm computes two
        passes.
      virtual_batch_size: statistics over consecutive groups of this many examples
        along the input's first axis, for a layer called on a batch rather than one
        example. A layer called on one example, the Equinox way, has no examples to
        group: nest two vmaps, the inner one over the examples of a group, or use
        `axis_index_groups` under `pmap`. None: no groups.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.

    Examples:
      >>> import equinox as eqx, jax, jaxrenorm
      >>> make = eqx.nn.make_with_state(jaxrenorm.equinox.BatchRenorm)
      >>> brn, state = make(3, "batch", r_max=1.5, d_max=0.5)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> train = jax.vmap(brn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> int(state.get(brn.steps_index))
      1
    """

    r_max: Bound = eqx.field(static=True)
    d_max: Bound = eqx.field(static=True)
    grad_through_batch_moments: bool | str = eqx.field(static=True)
    diagnostics_index: eqx.nn.StateIndex | None

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Mode = "batch",
        *,
        r_max: Bound = schedules.PAPER_R_MAX,
        d_max: Bound = schedules.PAPER_D_MAX,
        grad_through_batch_moments: bool | str = True,
        diagnostics: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            input_size,
            axis_name,
            eps,
            channelwise_affine,
            momentum,
            inference,
            dtype,
            mode,
            **kwargs,
        )
        self.r_max = r_max
        self.d_max = d_max
        self.grad_through_batch_moments = grad_through_batch_moments
        zero = jnp.zeros((), jnp.float32)
        self.diagnostics_index = (
            eqx.nn.StateIndex(dict.fromkeys(DIAGNOSTICS, zero)) if diagnostics else None
        )

    def _bounds_at(self, steps: jax.Array) -> tuple[Any, Any]:
        return bounds_at(self.r_max, self.d_max, steps)

    def _after_training_call(self, terms: RenormTerms | None, state: eqx.nn.State) -> eqx.nn.State:
        if self.diagnostics_index is not None and terms is not None:
            state = state.set(self.diagnostics_index, renorm_diagnostics(terms))
        return state


@documents("equinox")
class InstanceRenorm(BatchRenorm):
    """BatchRenorm mixed with instance normalization through a learned gate, for Equinox.

    The output is rho * BatchRenorm(x) + (1 - rho) * (weight * IN(x) + bias) per
    channel, with rho clipped to [0, 1] and IN the normalization of each example
    over its own spatial dimensions (`jaxrenorm.instance_renorm`); the example
    needs at least one spatial dimension, `(input_size, dim_1, ...)`.

    Args:
      rho_init: the initial value of the gate `rho`, a per-channel parameter in the
        dtype of `weight`: 0.5 by default, an even mix of batch and instance
        statistics.

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
        `r_mean_abs_dev` and `d_mean_abs` (see `jaxrenorm.collect_diagnostics`) in
        the state, as a dict under `layer.diagnostics_index` (zeros until the first
        training call). Off by default.

    Args: Inherited from BatchNorm:
      input_size: the number of channels, the size of the example's first axis.
      axis_name: the named axis, or tuple of axis names, of the `vmap` (or `pmap`,
        `shard_map`) whose examples share the statistics, computed with one
        collective over those axes; as in eqx.nn.BatchNorm. Each device's moments
        are about a sample of its own data and are merged exactly.
      eps: a small value added to the variance before the square root, >= 0; as in
        eqx.nn.BatchNorm.
      channelwise_affine: learn a per-channel `weight` (gamma) and `bias` (beta); as
        in eqx.nn.BatchNorm.
      momentum: decay rate of the running statistics, in [0, 1]: running = momentum
        * running + (1 - momentum) * batch, the weight of the old value, as in
        eqx.nn.BatchNorm (PyTorch's momentum is one minus this: see
        `jaxrenorm.interop.momentum_from_torch`).
      inference: True normalizes with the running statistics (evaluation), False
        with the batch's, returning the state with the running ones updated
        (training). `eqx.nn.inference_mode` sets it, and the call's `inference`
        takes precedence. As in eqx.nn.BatchNorm.
      dtype: the dtype of `weight`, `bias` and the running statistics: float32 by
        default (float64 with `jax_enable_x64`), as in eqx.nn.BatchNorm. The output
        dtype promotes the input's with the parameters'; the statistics are computed
        in at least float32.
      mode: "batch" (the default): zero-debiased running averages that start at 0,
        whose variance eqx.nn.BatchNorm starts at 1 instead, overestimating it for
        hundreds of steps; "ema": running averages that start at the first batch's
        statistics. Either way a training call normalizes with the batch's
        statistics (eqx.nn.BatchNorm's "ema" normalizes with the running averages).
      axis_index_groups: groups of indices along `axis_name` (a `pmap`'s), each
        normalized with its own statistics (e.g. `[[0, 1], [2, 3]]`); `vmap` has no
        groups.
      use_fast_variance: True (the default) computes the variance in one pass,
        shifted by a sample of the data so that it stays accurate on offset data;
        False computes the exact two-pass variance, at the cost of a second pass
        over the data (the collective stays one). eqx.nn.BatchNorm computes two
        passes.
      virtual_batch_size: statistics over consecutive groups of this many examples
        along the input's first axis, for a layer called on a batch rather than one
        example. A layer called on one example, the Equinox way, has no examples to
        group: nest two vmaps, the inner one over the examples of a group, or use
        `axis_index_groups` under `pmap`. None: no groups.
      bessel_correction: update the running variance with the unbiased batch
        variance n / (n - 1) * var_B, n the number of valid values per feature (per
        group with virtual batches), as PyTorch does; the normalization itself
        always uses the biased var_B. False by default, Flax's convention.

    Examples:
      >>> import equinox as eqx, jax, jaxrenorm
      >>> irn, state = eqx.nn.make_with_state(jaxrenorm.equinox.InstanceRenorm)(3, "batch")
      >>> x = jax.random.normal(jax.random.key(0), (8, 3, 4, 4))
      >>> train = jax.vmap(irn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> y.shape, irn.rho.tolist()
      ((8, 3, 4, 4), [0.5, 0.5, 0.5])
    """

    rho: jax.Array

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Mode = "batch",
        *,
        rho_init: float = 0.5,
        **kwargs: Any,
    ):
        args = (input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, mode)
        super().__init__(*args, **kwargs)
        dtype = _default_dtype() if self.weight is None else self.weight.dtype
        self.rho = jnp.full((input_size,), rho_init, dtype)

    # The instance branch needs a batch axis: one example is a batch of one.
    @property
    def axis(self) -> int:
        return 1

    def _as_batch(self, x: jax.Array) -> jax.Array:
        return x[None]

    def _as_example(self, y: jax.Array) -> jax.Array:
        return y[0]

    def _gate(self, feature_shape: tuple[int, ...]) -> jax.Array:
        return self.rho


# --- recalibration ------------------------------------------------------------------

_RECORDS: contextvars.ContextVar[dict[Any, list[Moments]] | None] = contextvars.ContextVar(
    "jaxrenorm_equinox_records", default=None
)


@contextlib.contextmanager
def _recording() -> Iterator[dict[Any, list[Moments]]]:
    records: dict[Any, list[Moments]] = {}
    token = _RECORDS.set(records)
    try:
        with recording_inputs():
            yield records
    finally:
        _RECORDS.reset(token)


def _layers(model: Any) -> list[BatchNorm]:
    leaves = jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, BatchNorm))
    return [leaf for leaf in leaves if isinstance(leaf, BatchNorm)]


def recalibrate(
    model: Any,
    state: eqx.nn.State,
    batches: Iterable[Any],
    *,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    progress: bool = False,
    **call_kwargs: Any,
) -> eqx.nn.State:
    """Replaces every jaxrenorm layer's running statistics by exact population statistics.

    The Equinox counterpart of `jaxrenorm.recalibrate`: runs
    `model(example, state, **call_kwargs)` under `jax.vmap` over each batch (one
    compiled pass per batch shape, from the state as given) and records the input
    of every `jaxrenorm.equinox` layer; the new `mean` and `var` are the mean and
    pooled biased variance over all valid elements of all batches, merged in
    float64 (`jaxrenorm.pool_moments`). Nothing else changes: parameters, the
    `steps` counters and the rest of the state are as given. In training mode
    (the usual choice) every layer normalizes with its batch's statistics during
    the pass, so each sees its input as training produced it; use large batches.

    Args:
      model: an Equinox model called as `model(x, state, ...)` on one example.
      state: its `eqx.nn.State`.
      batches: an iterable of batched inputs (a leading batch axis); a tuple is
        passed as several positional arguments.
      axis_name: the name of the batch axis the layers share their statistics
        over; by default the `axis_name` of the model's first layer.
      progress: show a tqdm progress bar (tqdm must be installed).
      **call_kwargs: passed to the model's call (not batched).

    Returns:
      The state with the new running statistics.
    """
    state = _copy(state)  # the caller's state stays usable (Equinox retires a state once set)
    layers = {layer.state_index.marker: layer for layer in _layers(model)}
    if axis_name is None and layers:
        axis_name = next(iter(layers.values())).axis_name

    @eqx.filter_jit
    def batch_moments(model, state, batch):
        def one(*example):
            with _recording() as records:
                model(*example, state, **call_kwargs)
            return {id(marker): calls for marker, calls in records.items()}

        return jax.vmap(one, axis_name=axis_name)(*batch)

    ids = {id(marker): marker for marker in layers}

    def recorded(batch):
        arguments = batch if isinstance(batch, tuple) else (batch,)
        for key, calls in jax.device_get(batch_moments(model, state, arguments)).items():
            yield ids[key], [_over_examples(*call) for call in calls]

    pooled = pooled_inputs(batches if layers else (), recorded, progress)
    for marker, moments in pooled.items():
        layer = layers[marker]
        mean, var = state.get(layer.state_index)
        state = state.set(layer.state_index, population_statistics(moments, mean, var))
    return state


def _copy(state: eqx.nn.State) -> eqx.nn.State:
    """A copy of `state` whose `set` leaves the original usable."""
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


def _over_examples(count: Any, mean: Any, var: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, biased var) of a batch from those of its examples (axis 0), in float64."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    count = np.broadcast_to(np.asarray(count, np.float64), mean.shape)
    total = count.sum(0)
    safe = np.maximum(total, 1)
    pooled_mean = (count * mean).sum(0) / safe
    m2 = (count * (var + (mean - pooled_mean) ** 2)).sum(0)
    return total, pooled_mean, m2 / safe


# --- conversion --------------------------------------------------------------------


def convert(
    model: M,
    state: eqx.nn.State | None = None,
    to: type = BatchRenorm,
    **overrides: Any,
) -> tuple[M, eqx.nn.State]:
    """Every `eqx.nn.BatchNorm` (or jaxrenorm Equinox layer) of `model` as a `to` layer.

    The settings both kinds have are kept (`input_size`, `axis_name`, `eps`,
    `channelwise_affine`, `momentum`, `inference`, the dtype and `mode`; and the
    jaxrenorm options when converting between jaxrenorm layers), `overrides`
    replace any of them, and the variables are carried over: `weight`, `bias`, the
    running statistics, and the `steps` counter (Equinox's batch counter in
    "batch" mode). `to` may be `eqx.nn.BatchNorm` to go back.

    Equinox's "batch" mode keeps zero-debiased averages whose variance starts at 1
    (see the module docstring); the variance carried over is the debiased average
    of the batch variances, without that start (and the start is put back when
    converting to `eqx.nn.BatchNorm`). An "ema" layer that never trained carries
    the initial statistics (0 and 1).

    Args:
      model: an Equinox model.
      state: its `eqx.nn.State`; None: the model's initial state.
      to: the layer class: `BatchNorm`, `BatchRenorm`, `InstanceRenorm` of this
        module, or `eqx.nn.BatchNorm`.
      **overrides: constructor arguments of the new layers (e.g. `r_max`).

    Returns:
      `(model, state)`: the model with the new layers and its state, the other
      layers' state entries as given.
    """
    state = eqx.nn.State(model) if state is None else _copy(state)
    old_layers = [
        leaf
        for leaf in jax.tree.leaves(model, is_leaf=_is_norm)
        if isinstance(leaf, BatchNorm | eqx.nn.BatchNorm)
    ]
    values = [_read(layer, state) for layer in old_layers]
    new_layers = [_build(layer, to, overrides) for layer in old_layers]
    new_model = eqx.tree_at(
        lambda m: [leaf for leaf in jax.tree.leaves(m, is_leaf=_is_norm) if _is_norm(leaf)],
        model,
        new_layers,
    )
    new_state = eqx.nn.State(new_model)
    kept = {index.marker: index for index in _state_indices(model)}
    for index in _state_indices(new_model):
        if index.marker in kept:
            new_state = new_state.set(index, state.get(kept[index.marker]))
    for layer, value in zip(new_layers, values, strict=True):
        new_state = _write(layer, new_state, value)
    return new_model, new_state


def _state_indices(model: Any) -> list[eqx.nn.StateIndex]:
    """The `StateIndex`es of `model`: the entries of its state."""
    leaves = jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, eqx.nn.StateIndex))
    return [leaf for leaf in leaves if isinstance(leaf, eqx.nn.StateIndex)]


def _is_norm(node: Any) -> bool:
    return isinstance(node, BatchNorm | eqx.nn.BatchNorm)


def _settings(layer: Any) -> dict[str, Any]:
    """The constructor arguments of `layer` (Equinox's, and jaxrenorm's options)."""
    weight = layer.weight
    dtype = None if weight is None else weight.dtype
    settings = dict(
        input_size=layer.input_size,
        axis_name=layer.axis_name,
        eps=layer.eps,
        channelwise_affine=layer.channelwise_affine,
        momentum=layer.momentum,
        inference=layer.inference,
        dtype=dtype,
        mode=layer.mode,
    )
    if isinstance(layer, BatchNorm):
        for name in ("axis_index_groups", "use_fast_variance", "virtual_batch_size"):
            settings[name] = getattr(layer, name)
        settings["bessel_correction"] = layer.bessel_correction
    if isinstance(layer, BatchRenorm):
        settings.update(
            r_max=layer.r_max,
            d_max=layer.d_max,
            grad_through_batch_moments=layer.grad_through_batch_moments,
            diagnostics=layer.diagnostics_index is not None,
        )
    return settings


def _build(layer: Any, to: type, overrides: dict[str, Any]) -> Any:
    settings = _settings(layer) | overrides
    if to is eqx.nn.BatchNorm:
        names = ("input_size", "axis_name", "eps", "channelwise_affine", "momentum")
        names += ("inference", "dtype", "mode")
        return to(**{k: settings[k] for k in names})
    if not issubclass(to, BatchRenorm):
        renorm = ("r_max", "d_max", "grad_through_batch_moments", "diagnostics")
        settings = {k: v for k, v in settings.items() if k not in renorm}
    new = to(**settings)
    if isinstance(layer, InstanceRenorm) and isinstance(new, InstanceRenorm):
        new = eqx.tree_at(lambda n: n.rho, new, layer.rho)
    return eqx.tree_at(
        lambda n: (n.weight, n.bias), new, (layer.weight, layer.bias), is_leaf=lambda x: x is None
    )


def _read(layer: Any, state: eqx.nn.State) -> dict[str, jax.Array]:
    """{"mean", "var", "steps"}: the running statistics as this library keeps them."""
    if isinstance(layer, BatchNorm):
        mean, var = state.get(layer.state_index)
        return {"mean": mean, "var": var, "steps": state.get(layer.steps_index)}
    m = layer.momentum
    if layer.mode == "ema":
        first = state.get(layer.ema_first_time_index)
        mean, var = state.get(layer.ema_state_index)
        mean = jnp.where(first, jnp.zeros_like(mean), mean)
        var = jnp.where(first, jnp.ones_like(var), var)
        return {"mean": mean, "var": var, "steps": jnp.where(first, 0, 1).astype(jnp.int32)}
    t = state.get(layer.batch_counter)
    hidden_mean, hidden_var = state.get(layer.batch_state_index)
    decayed = jnp.asarray(m, hidden_mean.dtype) ** t  # what remains of the start, m^t
    scale = jnp.where(t == 0, 1, 1 - decayed)
    mean = jnp.where(t == 0, 0, hidden_mean / scale)
    var = jnp.where(t == 0, 1, (hidden_var - decayed) / scale)
    return {"mean": mean, "var": var, "steps": jnp.asarray(t, jnp.int32)}


def _write(layer: Any, state: eqx.nn.State, value: dict[str, jax.Array]) -> eqx.nn.State:
    if isinstance(layer, BatchNorm):
        mean, var = state.get(layer.state_index)
        new = (jnp.asarray(value["mean"], mean.dtype), jnp.asarray(value["var"], var.dtype))
        state = state.set(layer.state_index, new)
        return state.set(layer.steps_index, jnp.asarray(value["steps"], jnp.int32))
    dtype = layer.weight.dtype if layer.weight is not None else _default_dtype()
    mean, var = (jnp.asarray(value[k], dtype) for k in ("mean", "var"))
    t = value["steps"]
    if layer.mode == "ema":
        state = state.set(layer.ema_first_time_index, t == 0)
        return state.set(layer.ema_state_index, (mean, var))
    decayed = jnp.asarray(layer.momentum, dtype) ** t
    hidden = (mean * (1 - decayed), var * (1 - decayed) + decayed)
    # Equinox's counter is a weakly typed int (`jnp.array(0)`), which a Python int keeps.
    state = state.set(layer.batch_counter, jnp.asarray(int(t)))
    return state.set(layer.batch_state_index, hidden)
