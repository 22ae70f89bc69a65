"""Interoperability: PyTorch's BatchNorm layers, and sbx's BatchRenorm layer.

PyTorch's `BatchNorm1d/2d/3d` keeps `weight` (scale), `bias`, `running_mean`,
`running_var` (updated with the unbiased batch variance) and
`num_batches_tracked`, and its momentum weighs the *new* batch:
running = (1 - m) * running + m * batch, m = 0.1. Flax and jaxrenorm weigh the old
value: running = m * running + (1 - m) * batch, m = 0.99. To reproduce a PyTorch
layer: `momentum=momentum_from_torch(m)`, `epsilon=eps`, `bessel_correction=True`,
and `axis=1` for NCHW inputs. torch is never imported here.

Stable Baselines in JAX (sbx) ships its own linen Batch Renormalization layer for
its CrossQ agent; `sbx_batch_renorm` builds jaxrenorm's layer from that layer's
arguments. sbx is never imported here either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxrenorm import linen, schedules
from jaxrenorm._checks import (
    check_known_arguments,
    check_scalar,
    check_state_dict,
    check_state_dict_entries,
    check_torch_momentum,
)

__all__ = [
    "from_torch_batch_norm",
    "momentum_from_torch",
    "momentum_to_torch",
    "sbx_batch_renorm",
]


def momentum_from_torch(momentum: float) -> float:
    """PyTorch's momentum (weight of the new batch) to Flax's (weight of the old value).

    Args:
      momentum: a `torch.nn.BatchNorm*` momentum, in [0, 1] (PyTorch's default is
        0.1). PyTorch's None (a cumulative average) has no equivalent: use
        `jaxrenorm.recalibrate` for exact population statistics.

    Returns:
      `1 - momentum`, for the `momentum` of `jaxrenorm`'s and Flax's layers.

    Examples:
      >>> from jaxrenorm import interop
      >>> round(interop.momentum_from_torch(0.1), 6)
      0.9
    """
    check_torch_momentum(momentum)
    return 1.0 - momentum


def momentum_to_torch(momentum: float) -> float:
    """Flax's momentum to PyTorch's: the inverse of `momentum_from_torch`.

    Args:
      momentum: the `momentum` of a jaxrenorm or Flax layer (the weight of the
        old value), in [0, 1].

    Returns:
      `1 - momentum`, for `torch.nn.BatchNorm*(momentum=...)`.

    Examples:
      >>> from jaxrenorm import interop
      >>> round(interop.momentum_to_torch(0.99), 6)
      0.01
    """
    check_scalar(momentum, "momentum", 0.0, 1.0)
    return 1.0 - momentum


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    # Copy: `.numpy()` shares memory with the tensor and JAX may alias a NumPy buffer
    # on CPU, so PyTorch's in-place running-statistics updates would otherwise
    # rewrite the imported arrays.
    return np.array(value, copy=True)


def from_torch_batch_norm(
    state_dict: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a PyTorch `BatchNorm1d/2d/3d` state dict to `(params, batch_stats)`.

    Args:
      state_dict: `module.state_dict()` (tensors) or the same keys with NumPy
        arrays: `running_mean`, `running_var`, and `weight`/`bias` when the layer
        is affine (a missing one means no scale or no bias). `num_batches_tracked`
        is ignored.
      prefix: a key prefix, e.g. "layer1.bn1." for an entry of a whole model's
        state dict.

    Returns:
      `params` with "scale"/"bias" (float32) for the entries present, and
      `batch_stats` with "mean"/"var" (float32), ready for `jaxrenorm.batch_norm`
      or the linen modules' variables. PyTorch's running variance is the
      unbiased one; it is copied as is (inference uses it directly, as PyTorch
      does).

    Examples:
      >>> import numpy as np
      >>> from jaxrenorm import interop
      >>> sd = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
      ...       "running_var": np.ones(3), "num_batches_tracked": np.array(7)}
      >>> params, stats = interop.from_torch_batch_norm(sd)
      >>> sorted(params), sorted(stats), stats["var"].dtype
      (['bias', 'scale'], ['mean', 'var'], dtype('float32'))
    """
    check_state_dict(state_dict, prefix)
    names = {"running_mean": "mean", "running_var": "var", "weight": "scale", "bias": "bias"}
    entries = {k: _to_numpy(state_dict[prefix + k]) for k in names if prefix + k in state_dict}
    check_state_dict_entries(entries)
    arrays = {names[k]: jnp.asarray(v, jnp.float32) for k, v in entries.items()}
    params = {k: arrays[k] for k in ("scale", "bias") if k in arrays}
    return params, {"mean": arrays["mean"], "var": arrays["var"]}


# --- Stable Baselines in JAX (sbx) ------------------------------------------------

# sbx.common.jax_layers.BatchRenorm's fields besides `use_running_average`,
# `momentum` and `warmup_steps`, and the two every Flax module takes.
_SBX_FIELDS = (
    "axis",
    "epsilon",
    "dtype",
    "param_dtype",
    "use_bias",
    "use_scale",
    "bias_init",
    "scale_init",
    "axis_name",
    "axis_index_groups",
    "parent",
    "name",
)


def sbx_batch_renorm(
    use_running_average: bool | None = None,
    *,
    momentum: float = 0.99,
    warmup_steps: int = 100_000,
    **fields: Any,
) -> linen.BatchRenorm:
    """`jaxrenorm.linen.BatchRenorm` configured as sbx's `BatchRenorm` layer intends.

    Stable Baselines in JAX (sbx, used by its CrossQ agent) ships its own linen
    layer, `sbx.common.jax_layers.BatchRenorm`. This takes that layer's
    constructor arguments with its defaults and returns jaxrenorm's layer doing
    the same thing with the paper's math: plain BatchNorm while the layer's
    `steps` counter (its number of training calls) is below `warmup_steps`,
    then Batch Renormalization with r_max = 3 and d_max = 5, a hard switch
    (both bounds are step schedules), and `epsilon` 1e-3 unless given. Use it
    wherever sbx's class is built, e.g. `functools.partial(sbx_batch_renorm,
    use_running_average=not train, momentum=..., warmup_steps=...)`; the
    parameters and statistics have the same names and shapes.

    What differs from sbx's layer, where it departs from the paper: sbx
    normalizes with the batch standard deviation without epsilon inside the
    renorm correction, so its training output is not its inference output even
    unclipped, and a feature that is constant over the batch gives NaN input
    gradients. Here y = scale * ((x - mu_B) / s_B * r + d) + bias with
    s_B = sqrt(var_B + epsilon), as in `jaxrenorm.batch_renorm`.

    Checkpoints: an sbx layer's `batch_stats` (`mean`, `var`, `steps`, and the
    constants `r_max` and `d_max`, which this layer leaves alone) load as they
    are, for evaluation and for continued training, with the `steps` count
    carried over. The other way, sbx's layer expects `r_max` and `d_max` in
    each layer's `batch_stats`: add `"r_max": 3, "d_max": 5` to a jaxrenorm
    layer's statistics before loading them into sbx.

    Args:
      use_running_average: as in `jaxrenorm.linen.BatchRenorm` (and sbx).
      momentum: decay rate of the running statistics, as in sbx and Flax.
      warmup_steps: the number of training calls that use plain BatchNorm
        before Batch Renormalization starts (sbx's default 100,000), >= 0.
      **fields: any other argument of sbx's layer (`axis`, `epsilon`,
        `dtype`, `param_dtype`, `use_bias`, `use_scale`, `bias_init`,
        `scale_init`, `axis_name`, `axis_index_groups`) or Flax's `name` and
        `parent`; anything else is a `TypeError` naming it.

    Returns:
      A `jaxrenorm.linen.BatchRenorm`.

    Examples:
      >>> import jax, jaxrenorm
      >>> layer = jaxrenorm.interop.sbx_batch_renorm(use_running_average=False, warmup_steps=2)
      >>> x = jax.random.normal(jax.random.key(0), (16, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> layer.epsilon, float(layer.r_max(1)), float(layer.r_max(2))
      (0.001, 1.0, 3.0)
    """
    check_known_arguments(
        fields,
        _SBX_FIELDS,
        "sbx_batch_renorm",
        "sbx's BatchRenorm",
        "it takes `use_running_average`, `momentum`, `warmup_steps` and "
        + ", ".join(f"`{name}`" for name in _SBX_FIELDS),
    )
    fields.setdefault("epsilon", 1e-3)
    return linen.BatchRenorm(
        use_running_average=use_running_average,
        momentum=momentum,
        r_max=schedules.r_max_schedule(3.0, begin=warmup_steps, end=warmup_steps),
        d_max=schedules.d_max_schedule(5.0, begin=warmup_steps, end=warmup_steps),
        **fields,
    )
