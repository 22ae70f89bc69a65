"""PyTorch interoperability: BatchNorm state dicts and momentum conventions.

PyTorch's `BatchNorm{1,2,3}d` keeps `weight` (scale), `bias`, `running_mean`,
`running_var` (updated with the unbiased batch variance) and
`num_batches_tracked`, and its momentum weighs the *new* batch:
running = (1 - m) * running + m * batch, m = 0.1. Flax and jaxrenorm weigh the old
value: running = m * running + (1 - m) * batch, m = 0.99. To reproduce a PyTorch
layer: `momentum=momentum_from_torch(m)`, `epsilon=eps`, `bessel_correction=True`,
and `axis=1` for NCHW inputs. torch is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxrenorm._checks import (
    check_scalar,
    check_state_dict,
    check_state_dict_entries,
    check_torch_momentum,
)

__all__ = ["from_torch_batch_norm", "momentum_from_torch", "momentum_to_torch"]


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
