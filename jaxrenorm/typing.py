"""The types in jaxrenorm's signatures, for type checkers and for readers.

Each alias says what an argument accepts, as broadly as the library accepts it
at run time: a parameter typed `ArrayLike` takes a `jax.Array`, a NumPy array or
a Python number, and a layer's renorm bound takes a number or a schedule
(optax's, or one of `jaxrenorm.schedules`). Import them to annotate your own code:

    from jaxrenorm.typing import BatchStats, Params
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

import jax

__all__ = ["ArrayLike", "Axes", "BatchStats", "Bound", "DTypeLike", "Params", "Schedule"]

ArrayLike: TypeAlias = jax.typing.ArrayLike
"""An array, or what `jnp.asarray` turns into one: a NumPy array, a Python number."""

DTypeLike: TypeAlias = jax.typing.DTypeLike
"""A dtype as `jnp.dtype` takes it: `jnp.float32`, `"bfloat16"`, `np.dtype("float16")`."""

Axes: TypeAlias = int | Sequence[int]
"""The feature axis, or several (statistics are then kept per feature of all of them)."""

Params: TypeAlias = Mapping[str, ArrayLike | None] | None
"""`{"scale": ..., "bias": ...}` of the feature shape (InstanceRenorm adds `"rho"`).

A missing or None entry means no scale (or no bias); `params=None` means neither.
"""

BatchStats: TypeAlias = Mapping[str, jax.Array]
"""The running statistics `{"mean": ..., "var": ...}` of the feature shape.

As `init_batch_stats` makes them and the pure functions return them; a layer with
a scheduled bound adds its int32 training-step counter `"steps"`.
"""

Schedule: TypeAlias = Callable[[ArrayLike], jax.Array]
"""A value as a function of the training step, as `jaxrenorm.schedules` makes them.

Every `Schedule` is also an `optax.Schedule`, and every `optax.Schedule` is a `Bound`.
"""

Bound: TypeAlias = ArrayLike | Callable[[jax.Array], ArrayLike]
"""A layer's renorm bound (`r_max`, `d_max`): a number, or a schedule of the step.

A schedule (`optax.Schedule`, `Schedule`) is evaluated at the layer's `steps`
counter, the number of training calls so far.
"""
