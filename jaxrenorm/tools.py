"""Tools around the normalization layers: diagnostics, recalibration, folding, checks."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from jaxrenorm._checks import (
    Layout,
    check_batch_dependence_input,
    check_batch_dependence_output,
    check_batch_stats,
    check_feature_array,
    check_layout,
    check_mask,
    check_params,
    check_recorded,
)
from jaxrenorm._layers import DIAGNOSTICS
from jaxrenorm._stats import compute_moments

__all__ = [
    "PooledMoments",
    "batch_dependence",
    "collect_diagnostics",
    "fold_batch_norm",
    "pool_moments",
    "recalibrate",
    "sync_batch_stats",
]


def collect_diagnostics(intermediates: Mapping[str, Any], sep: str = "/") -> dict[str, jax.Array]:
    """Flattens the summaries sown by `BatchRenorm(diagnostics=True)` into scalars.

    Each key is the layer's path and the summary's name joined by `sep`, e.g.
    `"Block_0/BatchRenorm_0/r_clipped"`; each value is the mean over the calls of
    that layer in the `apply` (a layer called twice sows twice). Other sown values
    are left out. Works under `jit`; call `jax.device_get` on the result to log it.

    Args:
      intermediates: the `intermediates` collection returned by
        `model.apply(..., mutable=["intermediates", ...])` (or the whole
        variables dict, which holds it under "intermediates").
      sep: separator between path components.

    Returns:
      A flat dict of scalar arrays.

    Examples:
      >>> import jax, jaxrenorm
      >>> brn = jaxrenorm.linen.BatchRenorm(r_max=1.0, d_max=0.0, diagnostics=True)
      >>> x = jax.random.normal(jax.random.key(0), (16, 3)) + 2
      >>> v = brn.init(jax.random.key(1), x, use_running_average=False)
      >>> _, upd = brn.apply(v, x, use_running_average=False,
      ...                    mutable=["batch_stats", "intermediates"])
      >>> d = jaxrenorm.collect_diagnostics(upd)
      >>> sorted(d), float(d["r_clipped"])
      (['d_clipped', 'd_mean_abs', 'r_clipped', 'r_mean_abs_dev'], 1.0)
    """
    if "intermediates" in intermediates:
        intermediates = intermediates["intermediates"]
    out: dict[str, jax.Array] = {}

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, (*path, key))
            elif key in DIAGNOSTICS and isinstance(value, tuple | list):
                out[sep.join((*path, key))] = jnp.mean(jnp.stack([jnp.asarray(v) for v in value]))

    visit(intermediates, ())
    return out


# --- recalibration -------------------------------------------------------------


class PooledMoments(NamedTuple):
    """The moments of data seen in parts, pooled in float64 (returned by `pool_moments`).

    Attributes:
      count: valid elements per feature.
      mean: their mean (0 where `count` is 0).
      m2: the sum of squared deviations from `mean`.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """The biased variance over all the data (0 where `count` is 0)."""
        return self.m2 / np.maximum(self.count, 1)


def pool_moments(pooled: PooledMoments | None, mean: Any, var: Any, count: Any) -> PooledMoments:
    """Adds the mean and biased variance of one more part of the data to `pooled`.

    The population statistics of data too large for one batch, from each batch's
    moments: exact, in float64 on the host (Chan, Golub & LeVeque 1983), weighted
    by each part's count of valid elements, never the mean of per-batch
    variances. With n, mu and M2 = n * var for the data pooled so far (a) and
    the new part (b):

        n     = n_a + n_b
        delta = mu_b - mu_a
        mu    = mu_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

    `recalibrate` (linen and NNX) pools each layer's input this way; with the
    pure functions, pool `jaxrenorm.moments` of a layer's input over the batches
    and use the result as its running statistics.

    Args:
      pooled: the result of the previous call, or None for the first part.
      mean: the part's mean per feature (e.g. from `jaxrenorm.moments`).
      var: its biased variance per feature.
      count: its number of valid elements, per feature or one number (the
        product of the reduced axes' sizes without a mask).

    Returns:
      The pooled `PooledMoments`; `.mean` and `.var` are the statistics so far.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> x = jax.random.normal(jax.random.key(0), (100, 3)) * 2 + 5
      >>> pooled = None
      >>> for part in (x[:30], x[30:]):
      ...     mean, var = jaxrenorm.moments(part, axes=0)
      ...     pooled = jaxrenorm.pool_moments(pooled, mean, var, count=part.shape[0])
      >>> bool(jnp.allclose(pooled.var, x.var(0), rtol=1e-5))
      True
    """
    n = np.asarray(count, np.float64)
    mean = np.where(n > 0, np.asarray(mean, np.float64), 0.0)
    n = np.broadcast_to(n, mean.shape)
    m2 = np.asarray(var, np.float64) * n
    if pooled is None:
        return PooledMoments(n, mean, m2)
    total = pooled.count + n
    safe = np.maximum(total, 1)
    delta = mean - pooled.mean
    return PooledMoments(
        total,
        pooled.mean + delta * n / safe,
        pooled.m2 + m2 + delta**2 * pooled.count * n / safe,
    )


def input_moments(
    x: jax.Array, layout: Layout, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(count, mean, var) of a layer's input per feature: what recalibration records."""
    if mask is not None:
        mask = check_mask(mask, x.shape)
    m = compute_moments(x, layout.reduction_axes, mask=mask)
    return tuple(jnp.squeeze(v, layout.reduction_axes) for v in (m.count, m.mean, m.var))


_RECORDING = contextvars.ContextVar("jaxrenorm_recording_inputs", default=False)


@contextlib.contextmanager
def recording_inputs() -> Iterator[None]:
    """While tracing inside it, the NNX layers record their inputs' moments."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def is_recording_inputs() -> bool:
    return _RECORDING.get()


def pooled_inputs(
    batches: Iterable[Any],
    batch_moments: Callable[[Any], Iterable[tuple[tuple, Sequence[tuple]]]],
    progress: bool,
) -> dict[tuple, PooledMoments]:
    """{layer path: pooled moments of its input}, over `batches`.

    `batch_moments(batch)` runs the model on one batch and returns, per layer
    path, the (count, mean, var) of the layer's input at each of its calls.
    """
    pooled: dict[tuple, PooledMoments] = {}
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="recalibrate")
    for batch in batches:
        for path, calls in batch_moments(batch):
            for count, mean, var in calls:
                pooled[path] = pool_moments(pooled.get(path), mean, var, count)
    check_recorded(bool(pooled))
    return pooled


def population_statistics(
    pooled: PooledMoments, mean: jax.Array, var: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The pooled mean and variance in the running statistics' dtypes.

    Features that no batch had a valid element of keep `mean` and `var`.
    """
    has_data = pooled.count > 0
    new_mean = np.where(has_data, pooled.mean, np.asarray(mean))
    new_var = np.where(has_data, pooled.var, np.asarray(var))
    return jnp.asarray(new_mean, mean.dtype), jnp.asarray(new_var, var.dtype)


_RECAL = "jaxrenorm_recalibration"


def recalibrate(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    progress: bool = False,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Replaces every jaxrenorm layer's running statistics by exact population statistics.

    Runs `model.apply(variables, batch, **apply_kwargs)` on each batch and records
    the input of every `jaxrenorm.linen` normalization layer. The new `mean` is the
    mean over all valid examples of all batches and the new `var` the pooled biased
    variance over all of them, merged in float64 by `pool_moments` (count-weighted,
    so batches of different sizes and masks count by their valid elements; never
    the average of per-batch variances). For Flax NNX models use
    `jaxrenorm.nnx.recalibrate`.

    Which statistics upstream layers use during the pass is set by
    `apply_kwargs`. With the model's training mode (e.g. `train=True`, the
    usual choice, "precise BatchNorm") every layer normalizes with the current
    batch's statistics, so each layer sees its input as training produced it;
    use large batches so those statistics are close to the population's. With
    inference mode (`train=False`) upstream layers use their *old* running
    statistics, which this call then replaces: cheaper to reason about when only
    the last layers changed, inconsistent otherwise. Nothing else changes: the
    params, the `steps` counters and every other collection are returned as
    given, in the same tree structure.

    Use it after training with small or non-i.i.d. batches, after weight
    averaging (SWA or an EMA of the weights: averaged weights have no running
    statistics of their own), or on a new domain (test-time adaptation:
    recompute the statistics on the test distribution).
    BatchRenorm trains against its running statistics (with its bounds relaxed,
    its training output is the inference output), so recalibrating a
    BatchRenorm model changes what it computes: do it only when those statistics
    no longer describe its inputs (averaged weights, a new domain).

    Args:
      model: a Flax linen module whose normalization layers are jaxrenorm's.
      variables: its variables (with `params` and `batch_stats`).
      batches: an iterable of inputs; a tuple is passed as positional arguments.
        Each batch is processed by one jitted call; memory does not grow with
        the number of batches. Sharded batches (jit with NamedSharding) work.
      progress: show a tqdm progress bar (tqdm must be installed).
      **apply_kwargs: passed to `model.apply` (e.g. `train=True`); a `mask`
        keyword reaching a layer is honoured.

    Returns:
      The variables with new `batch_stats` means and variances.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> bn = jaxrenorm.linen.BatchNorm()
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 3 + 5
      >>> v = bn.init(jax.random.key(1), x, use_running_average=True)
      >>> v = jaxrenorm.recalibrate(bn, v, [x[:40], x[40:]], use_running_average=False)
      >>> bool(jnp.allclose(v["batch_stats"]["var"], x.var(0), rtol=1e-5))
      True
    """
    from jaxrenorm.linen import BatchNorm

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, BatchNorm) and context.method_name == "__call__":
            x, layout = check_layout(args[0], module.axis)
            module.sow(_RECAL, "moments", input_moments(x, layout, kwargs.get("mask")))
        return next_fun(*args, **kwargs)

    @jax.jit
    def batch_moments(variables, batch):
        args = batch if isinstance(batch, tuple) else (batch,)
        with nn.intercept_methods(interceptor):
            _, state = model.apply(
                variables, *args, mutable=["batch_stats", _RECAL], **apply_kwargs
            )
        return state.get(_RECAL, {})

    pooled = pooled_inputs(
        batches, lambda batch: _leaves(jax.device_get(batch_moments(variables, batch))), progress
    )
    new = unfreeze(jax.tree.map(lambda a: a, dict(variables)))
    for path, moments in pooled.items():
        node = new["batch_stats"]
        for key in path:
            node = node[key]
        node["mean"], node["var"] = population_statistics(moments, node["mean"], node["var"])
    return new


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
    """(module path, sown tuple of (count, mean, var) per call) for every recorded layer."""
    for key, value in tree.items():
        if key == "moments" and isinstance(value, tuple):
            yield path, value
        elif isinstance(value, Mapping):
            yield from _leaves(value, (*path, key))


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: Mapping[str, Any] | None,
    batch_stats: Mapping[str, Any],
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode normalization into the preceding Dense or Conv layer.

    With z = x @ kernel + bias and y = scale * (z - mean) / sqrt(var + epsilon) + b:

        a       = scale / sqrt(var + epsilon)
        kernel' = kernel * a
        bias'   = (bias - mean) * a + b

    so that y = x @ kernel' + bias', with one layer less at inference.

    Args:
      kernel: Dense `(in, out)` or Conv `HWIO` (any `...IO`) kernel; its last axis
        is the feature axis of the normalization.
      bias: the layer's bias `(out,)`, or None (a layer with `use_bias=False`).
      params: the normalization's params (optional "scale", "bias").
      batch_stats: its running statistics ("mean", "var").
      epsilon: the normalization's epsilon.

    Returns:
      `(kernel, bias)` for the same layer with `use_bias=True`.

    To fold a whole linen model, build the same model without its normalization
    layers and `use_bias=True` on the layers before them, then copy each folded
    pair: `params["Conv_0"] = dict(zip(("kernel", "bias"), fold_batch_norm(
    p["Conv_0"]["kernel"], p["Conv_0"].get("bias"), p["BatchNorm_0"],
    stats["BatchNorm_0"])))`, and so on for every Conv/Dense + norm pair.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> k = jax.random.normal(jax.random.key(0), (4, 3))
      >>> stats = {"mean": jnp.array([1., 2., 3.]), "var": jnp.array([4., 1., .25])}
      >>> params = {"scale": jnp.array([1., 2., 3.]), "bias": jnp.zeros(3)}
      >>> k2, b2 = jaxrenorm.fold_batch_norm(k, None, params, stats)
      >>> x = jnp.ones((2, 4))
      >>> y, _ = jaxrenorm.batch_norm(x @ k, params, stats, use_running_average=True)
      >>> bool(jnp.allclose(x @ k2 + b2, y, rtol=1e-5, atol=1e-5))
      True
    """
    kernel = jnp.asarray(kernel)
    features = kernel.shape[-1:]
    context = f"the kernel (shape {kernel.shape}, features on its last axis)"
    scale, norm_bias, _ = check_params(params, features, context)
    mean, var = check_batch_stats(batch_stats, features, context)
    if bias is not None:
        bias = check_feature_array(bias, "bias", features, context)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    a = jax.lax.rsqrt(var.astype(dtype) + epsilon)
    if scale is not None:
        a = a * scale
    z_bias = jnp.zeros(features, dtype) if bias is None else jnp.asarray(bias, dtype)
    new_bias = (z_bias - mean) * a
    if norm_bias is not None:
        new_bias = new_bias + norm_bias
    return (kernel * a).astype(kernel.dtype), new_bias.astype(dtype)


def batch_dependence(
    apply_fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, key: jax.Array
) -> float:
    """How much any example's output depends on the rest of its batch.

    Computes `apply_fn(x)` and again with each example's batch-mates replaced:
    (1) the batch shuffled, (2) the second half of the batch replaced by other
    data (the first half shuffled and perturbed with noise of the data's scale),
    (3) for a few examples, a batch made of copies of that example alone. Returns
    the largest change in any output element, relative to the standard deviation
    of the outputs. A model in inference mode gives ~1e-6 (rounding only); in
    training mode, or with a normalization layer left in training mode at
    evaluation (the classic "predictions are bad when the images in a batch look
    alike" bug), it is of order 1. Put `assert batch_dependence(...) < 1e-4` in
    your tests.

    Args:
      apply_fn: maps a batch (leading axis) to outputs of the same batch size,
        e.g. `lambda x: model.apply(variables, x, train=False)`.
      x: a batch of at least 4 examples, ideally diverse.
      key: a `jax.random` key for the shuffles and noise.

    Returns:
      The largest relative change, a Python float.

    Examples:
      >>> import jax, jaxrenorm
      >>> bn = jaxrenorm.linen.BatchNorm()
      >>> x = jax.random.normal(jax.random.key(0), (16, 3))
      >>> v = bn.init(jax.random.key(1), x, use_running_average=True)
      >>> key = jax.random.key(2)
      >>> jaxrenorm.batch_dependence(
      ...     lambda x: bn.apply(v, x, use_running_average=True), x, key=key) < 1e-5
      True
      >>> jaxrenorm.batch_dependence(lambda x: bn.apply(v, x, use_running_average=False,
      ...     mutable=["batch_stats"])[0], x, key=key) > 0.1
      True
    """
    x = jnp.asarray(x)
    check_batch_dependence_input(x.shape)
    n = x.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    base = jnp.asarray(apply_fn(x))
    check_batch_dependence_output(x.shape, base.shape)
    scale = float(jnp.std(base)) or 1.0
    worst = 0.0

    perm = jax.random.permutation(k1, n)
    shuffled = jnp.asarray(apply_fn(x[perm]))
    worst = max(worst, float(jnp.max(jnp.abs(shuffled - base[perm]))))

    half = n // 2
    others = x[jax.random.permutation(k2, half)]
    others = others + jax.random.normal(k3, others.shape, x.dtype) * jnp.std(x)
    mixed = jnp.asarray(apply_fn(jnp.concatenate([x[:half], others, x[2 * half :]])))
    worst = max(worst, float(jnp.max(jnp.abs(mixed[:half] - base[:half]))))

    for i in range(min(n, 4)):
        alone = jnp.asarray(apply_fn(jnp.repeat(x[i : i + 1], n, axis=0)))
        worst = max(worst, float(jnp.max(jnp.abs(alone[0] - base[i]))))
    return worst / scale


def sync_batch_stats(batch_stats: Any, axis_name: Any, *, axis_index_groups: Any = None) -> Any:
    """The running statistics averaged over the devices of `axis_name`; counters left exact.

    For data-parallel loops that average `batch_stats` after each step, as Flax's
    examples do with `lax.pmean(batch_stats, "batch")`: `lax.pmean` divides, so
    it turns BatchRenorm's int32 `steps` counter into a float (exact only up to
    2**24, and a change of dtype that compiles the step a second time). This
    averages the floating-point leaves and returns the integer and boolean ones
    as they are (every device counts the same steps). Call it inside `pmap` or
    `shard_map`, where `axis_name` is bound.

    With `axis_name` set on the layers, the batch statistics are already computed
    over all devices, so the running statistics are identical everywhere and need
    no averaging at all; this is for layers without it (each device normalizing
    by its own batch) whose running statistics should agree.

    Args:
      batch_stats: the `batch_stats` collection (any pytree of arrays).
      axis_name: the mapped axis (or tuple of axes) to average over.
      axis_index_groups: as in `lax.pmean`.

    Returns:
      A tree like `batch_stats`, floating-point leaves averaged.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxrenorm
      >>> stats = {"mean": jnp.arange(2.0)[:, None], "steps": jnp.array([3, 3])}
      >>> synced = jax.vmap(lambda s: jaxrenorm.sync_batch_stats(s, "i"), axis_name="i")(stats)
      >>> synced["mean"].ravel().tolist(), synced["steps"].dtype.name
      ([0.5, 0.5], 'int32')
    """

    def sync(leaf: Any) -> Any:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            return leaf
        return jax.lax.pmean(leaf, axis_name, axis_index_groups=axis_index_groups)

    return jax.tree_util.tree_map(sync, batch_stats)
