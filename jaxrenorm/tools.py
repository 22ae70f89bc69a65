"""Tools around the normalization layers: diagnostics for logging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["collect_diagnostics"]


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

    Example:
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
            elif key in _NAMES and isinstance(value, tuple | list):
                out[sep.join((*path, key))] = jnp.mean(jnp.stack([jnp.asarray(v) for v in value]))

    visit(intermediates, ())
    return out


_NAMES = frozenset({"r_clipped", "d_clipped", "r_mean_abs_dev", "d_mean_abs"})
