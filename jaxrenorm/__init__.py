"""jaxrenorm: Batch Normalization and Batch Renormalization for JAX and Flax.

Pure functions over `(params, batch_stats)`:

    y, batch_stats = jaxrenorm.batch_renorm(x, params, batch_stats, use_running_average=False)

and Flax linen modules (`jaxrenorm.linen.BatchNorm`, a drop-in for
`flax.linen.BatchNorm`, `jaxrenorm.linen.BatchRenorm` and
`jaxrenorm.linen.InstanceRenorm`) with their Flax NNX counterparts in
`jaxrenorm.nnx`.
"""

from jaxrenorm import interop, linen, nnx, schedules
from jaxrenorm._norm import batch_norm, batch_renorm, init_batch_stats, instance_renorm
from jaxrenorm._stats import moments
from jaxrenorm.tools import (
    batch_dependence,
    collect_diagnostics,
    fold_batch_norm,
    pool_moments,
    recalibrate,
)

__version__ = "0.1.0"

__all__ = [
    "batch_dependence",
    "batch_norm",
    "batch_renorm",
    "collect_diagnostics",
    "fold_batch_norm",
    "init_batch_stats",
    "instance_renorm",
    "interop",
    "linen",
    "moments",
    "nnx",
    "pool_moments",
    "recalibrate",
    "schedules",
]
