"""Tools around the normalization layers: diagnostics, recalibration, folding, checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrenorm._checks import (
    check_batch_dependence_input,
    check_batch_dependence_output,
    check_batch_stats,
    check_divisor,
    check_feature_array,
    check_params,
    check_positive_int,
)
from jaxrenorm._layers import DIAGNOSTICS, debiased_momentum, micro_batch_momentum
from jaxrenorm._recalibration import PooledMoments, pool_moments, recalibrate_linen
from jaxrenorm._xla import standard_promotion
from jaxrenorm.typing import ArrayLike

__all__ = [
    "PooledMoments",
    "batch_dependence",
    "collect_diagnostics",
    "debiased_momentum",
    "device_groups",
    "fold_batch_norm",
    "micro_batch_momentum",
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


@standard_promotion
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
    return recalibrate_linen(model, variables, batches, progress, apply_kwargs)


@standard_promotion
def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
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


@standard_promotion
def batch_dependence(
    apply_fn: Callable[[jax.Array], Any], x: ArrayLike, *, key: jax.Array
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


@standard_promotion
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


def device_groups(num_devices: int, devices_per_group: int) -> list[list[int]]:
    """`axis_index_groups` that split `num_devices` devices into groups of consecutive ones.

    For statistics over a fixed number of examples whatever the number of devices:
    with b examples per device and a target of n examples per statistics group,
    `devices_per_group = n // b`; pass the result as the layers' (and
    `lax.pmean`'s) `axis_index_groups`. `devices_per_group = num_devices` is one
    group of all (the same as no groups), 1 is each device alone.

    Args:
      num_devices: the size of the mapped axis (e.g. `jax.local_device_count()`
        under `pmap`), >= 1.
      devices_per_group: the devices whose examples share statistics, >= 1, a
        divisor of `num_devices` (`lax.psum` needs groups of equal size).

    Returns:
      `[[0, ..., g - 1], [g, ..., 2g - 1], ...]` with g = `devices_per_group`.

    Raises:
      ValueError: if either is not a positive int, or `devices_per_group` does not
        divide `num_devices`.

    Examples:
      >>> import jaxrenorm
      >>> jaxrenorm.device_groups(8, 4)
      [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    check_positive_int(num_devices, "num_devices")
    check_positive_int(devices_per_group, "devices_per_group")
    check_divisor(devices_per_group, num_devices, "devices_per_group", "num_devices")
    devices = range(num_devices)
    return [
        list(devices[i : i + devices_per_group]) for i in range(0, num_devices, devices_per_group)
    ]
