"""Recalibration, one mechanism for every module family.

`recalibrate` (linen) and `jaxrenorm.nnx.recalibrate` trace the model on each
batch inside `recording_inputs()`. While it is active, every layer's call hands
the (count, mean, var) of its input to the layer's `_record_input` hook (the
glue, `jaxrenorm._layers.layer_input`, does this for both families): a linen
layer sows it into the collection `COLLECTION`, an NNX layer into an
`InputMoments` intermediate. The runner of each family below collects what was
recorded per layer path, `pooled_inputs` pools it over the batches in float64
(`pool_moments`), and the population statistics are written back: into a copy
of the linen variables, into the NNX layers' `nnx.BatchStat`s.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import unfreeze

from jaxrenorm._checks import Layout, check_mask, check_recorded
from jaxrenorm._stats import compute_moments
from jaxrenorm.typing import ArrayLike

#: (count, mean, var) of a layer's input per feature, what a layer records per call.
Moments = tuple[jax.Array, jax.Array, jax.Array]

#: The linen collection the layers sow their input's moments into while recording.
COLLECTION = "jaxrenorm_recalibration"


class InputMoments(nnx.Intermediate):
    """(count, mean, var) of a layer's input per call, sown while `recalibrate` runs."""


class PooledMoments(NamedTuple):
    """The moments of data seen in parts, pooled in float64 (returned by `pool_moments`).

    Attributes:
      count: valid elements per feature.
      mean: their mean (0 where `count` is 0).
      m2: the sum of squared deviations from `mean`.
    """

    count: np.ndarray  # pyright: ignore[reportIncompatibleMethodOverride] (a field, not tuple.count)
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


# --- recording: what the layers do while `recalibrate` traces them --------------

# Read at trace time, so a model traced inside `recording_inputs()` records and the
# same model traced anywhere else compiles to the program it always had.
_RECORDING = contextvars.ContextVar("jaxrenorm_recording_inputs", default=False)


@contextlib.contextmanager
def recording_inputs() -> Iterator[None]:
    """While tracing inside it, the layers hand their inputs' moments to `_record_input`."""
    token = _RECORDING.set(True)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def is_recording_inputs() -> bool:
    return _RECORDING.get()


def input_moments(x: jax.Array, layout: Layout, mask: ArrayLike | None) -> Moments:
    """(count, mean, var) of a layer's input per feature: what recalibration records."""
    if mask is not None:
        mask = check_mask(mask, x.shape)
    m = compute_moments(x, layout.reduction_axes, mask=mask)
    count, mean, var = (jnp.squeeze(v, layout.reduction_axes) for v in (m.count, m.mean, m.var))
    return count, mean, var


# --- pooling over the batches, the same for every family ------------------------


def pooled_inputs(
    batches: Iterable[Any],
    batch_moments: Callable[[Any], Iterable[tuple[Hashable, Sequence[tuple[Any, Any, Any]]]]],
    progress: bool,
) -> dict[Any, PooledMoments]:
    """{layer: pooled moments of its input}, over `batches`.

    `batch_moments(batch)` runs the model on one batch and returns, per layer (its
    path, or what else the family identifies it by), the (count, mean, var) of the
    layer's input at each of its calls.
    """
    pooled: dict[Any, PooledMoments] = {}
    if progress:
        from tqdm.auto import tqdm  # optional: only for the progress bar

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


def _arguments(batch: Any) -> tuple:
    """A batch as the model's positional arguments: a tuple is several."""
    return batch if isinstance(batch, tuple) else (batch,)


# --- the runner of each family ----------------------------------------------------


def recalibrate_linen(
    model: Any,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    progress: bool,
    apply_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """`jaxrenorm.recalibrate`: the variables with the pooled statistics."""

    @jax.jit
    def batch_moments(variables, batch):
        with recording_inputs():
            mutable = ["batch_stats", COLLECTION]
            _, state = model.apply(variables, *_arguments(batch), mutable=mutable, **apply_kwargs)
        return state.get(COLLECTION, {})

    def recorded(batch):
        return _sown(jax.device_get(batch_moments(variables, batch)))

    pooled = pooled_inputs(batches, recorded, progress)
    new = unfreeze(jax.tree.map(lambda a: a, dict(variables)))
    for path, moments in pooled.items():
        node = new["batch_stats"]
        for key in path:
            node = node[key]
        node["mean"], node["var"] = population_statistics(moments, node["mean"], node["var"])
    return new


def _sown(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
    """(module path, sown tuple of (count, mean, var) per call) for every recorded layer."""
    for key, value in tree.items():
        if key == "moments" and isinstance(value, tuple):
            yield path, value
        elif isinstance(value, Mapping):
            yield from _sown(value, (*path, key))


def recalibrate_nnx(
    model: Any,
    layer_type: type,
    batches: Iterable[Any],
    progress: bool,
    call_kwargs: Mapping[str, Any],
) -> Any:
    """`jaxrenorm.nnx.recalibrate`: `model`, its `layer_type` layers given the pooled statistics."""
    layers = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, layer_type)}
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_moments(state, batch):
        work = nnx.merge(graphdef, state)  # a copy: its training-mode updates are dropped
        with recording_inputs():
            _, moments = nnx.capture(work, InputMoments)(*_arguments(batch), **call_kwargs)
        return moments

    def recorded(batch):
        for path, calls in nnx.to_flat_state(jax.device_get(batch_moments(state, batch))):
            yield path[:-1], calls.get_value()

    # Without a layer, no batch is run (nor an iterator consumed) before the error.
    pooled = pooled_inputs(batches if layers else (), recorded, progress)
    for path, moments in pooled.items():
        layer = layers[path]
        layer.mean[...], layer.var[...] = population_statistics(
            moments, layer.mean[...], layer.var[...]
        )
    return model
