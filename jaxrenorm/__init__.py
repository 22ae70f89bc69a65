"""Batch Normalization and Batch Renormalization for JAX and Flax.

The pure functions (`batch_norm`, `batch_renorm`, `instance_renorm`) take the
input, the parameters and the running statistics and return the output with the
new running statistics, so they fit any training loop, under `jit`, `grad`,
`vmap`, `pmap` and `shard_map`:

    y, batch_stats = jaxrenorm.batch_renorm(x, params, batch_stats, use_running_average=False)

The Flax modules are in `jaxrenorm.linen` and `jaxrenorm.nnx`, the Equinox layers
in `jaxrenorm.equinox` (with the `equinox` extra), the r_max / d_max
ramps in `jaxrenorm.schedules`, PyTorch conversion in `jaxrenorm.interop`, the
types of the signatures in `jaxrenorm.typing`. The
tools of `jaxrenorm.tools` (`recalibrate`, `pool_moments`, `fold_batch_norm`,
`batch_dependence`, `collect_diagnostics`, `sync_batch_stats`, `debiased_momentum`,
`micro_batch_momentum`, `device_groups`) are exported here too.
"""

import importlib
from typing import TYPE_CHECKING, Any

from jaxrenorm import interop, linen, nnx, schedules, tools, typing
from jaxrenorm._norm import batch_norm, batch_renorm, init_batch_stats, instance_renorm
from jaxrenorm._stats import moments
from jaxrenorm.tools import (
    batch_dependence,
    collect_diagnostics,
    debiased_momentum,
    device_groups,
    fold_batch_norm,
    micro_batch_momentum,
    pool_moments,
    recalibrate,
    sync_batch_stats,
)

__version__ = "0.1.0"  # the one version number; pyproject.toml reads it

if TYPE_CHECKING:
    from jaxrenorm import equinox as equinox


def __getattr__(name: str) -> Any:
    """`jaxrenorm.equinox`, imported on first use: Equinox is an optional dependency."""
    if name == "equinox":
        return importlib.import_module("jaxrenorm.equinox")
    raise AttributeError(f"module 'jaxrenorm' has no attribute {name!r}")


__all__ = [
    "batch_dependence",
    "batch_norm",
    "batch_renorm",
    "collect_diagnostics",
    "debiased_momentum",
    "device_groups",
    "fold_batch_norm",
    "init_batch_stats",
    "instance_renorm",
    "interop",
    "linen",
    "micro_batch_momentum",
    "moments",
    "nnx",
    "pool_moments",
    "recalibrate",
    "schedules",
    "sync_batch_stats",
    "tools",
    "typing",
]
