"""What the training forward pass does for XLA's sake only: memory, kernels, compile time.

The math (`jaxrenorm._norm`) would be just as correct without anything here;
each piece makes the compiled program leaner, and says why in one line. The
figures are in docs/benchmarks.md: "The backward pass" for what is saved, and
"Compile time" for the rest.

- `checkpointed`: the training forward pass under `jax.checkpoint` with a policy
  that saves only per-feature values (`saved` marks them), so the backward pass
  recomputes full-size intermediates from x inside its fused loops.
- `rsqrt`: 1 / sqrt(v) differentiated by multiplying, not dividing.
- `inverse_bound`: 1 / r_max divided per feature, not once and broadcast.
- `materialized`: per-feature values computed once, not fused into every kernel.
- `traced_once`: a schedule of the renorm bounds jitted, so that it is traced
  once per step, not once per layer.

Caches (the only two in the package; both live as long as the process):

- `_checkpointed_cached` (here): key (forward function, plan, inside a trace or
  not); at most 256 entries, least recently used first out. One entry per static
  setting of a layer, so the layers of a network that share one are traced,
  differentiated and lowered once. A plan that cannot be hashed (e.g.
  `axis_index_groups` given as lists) bypasses the cache.
- `_jitted` (used by `traced_once`): key (the schedule object); at most 64
  entries. Each schedule of a renorm bound is traced once per step rather than
  once per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.core import Tracer

# --- the promotion rules the library's own code runs under -----------------------

P = ParamSpec("P")
R = TypeVar("R")


def standard_promotion(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` traced with JAX's standard dtype and rank promotion, whatever the caller's.

    Users (Equinox's own tests among them) set `jax_numpy_dtype_promotion="strict"`
    and `jax_numpy_rank_promotion="raise"` to catch implicit promotions in their
    code. The library's promotions are deliberate (a float16 input normalized with
    float32 statistics and parameters, per-feature values broadcast against the
    input) and stay inside it: every public entry point is traced under the standard
    rules, and what it returns has the dtypes the documentation states.
    """

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)

    return wrapped


# --- what the backward pass keeps -------------------------------------------------

_SAVED = "jaxrenorm_per_feature"
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "psum"})
_save_named = jax.checkpoint_policies.save_only_these_names(_SAVED)


def save_per_feature(prim: Any, *args: Any, **params: Any) -> bool:
    """The `jax.checkpoint` policy: save the results of reductions and `saved` values.

    All of them are per-feature (or per-example) values; everything full-size is
    recomputed from x. The layer is memory-bound, so recomputing an elementwise
    expression inside the backward's fused loops is free, and storing it is not
    (docs/benchmarks.md, "The backward pass": 0 MiB of temporaries instead of 16).
    """
    return prim.name in _REDUCTIONS or _save_named(prim, *args, **params)


@overload
def saved(v: jax.Array) -> jax.Array: ...
@overload
def saved(v: None) -> None: ...
@overload
def saved(v: jax.Array | None) -> jax.Array | None: ...
def saved(v: jax.Array | None) -> jax.Array | None:
    """`v`, marked to be saved for the backward pass (None stays None).

    For per-feature (or per-example) values whose recomputation would repeat
    operations in the backward pass, the renorm terms in particular.
    """
    return None if v is None else checkpoint_name(v, _SAVED)


def checkpointed(
    forward: Callable[..., Any], plan: Any, x: jax.Array, policy: Callable[..., bool] | None
) -> Callable[..., Any]:
    """`forward` with its static `plan` bound, under `jax.checkpoint`, one object per plan.

    JAX caches the traced, differentiated and transposed function by its
    identity, so layers that share a plan and shapes (most layers of a network)
    are traced and differentiated once, not once each (about 35 ms per layer).
    Inside a trace it is also a `jax.jit` function, which JAX lowers once per
    shape and XLA inlines, so that its autodiff is cached too; eager calls run
    operation by operation. `policy` is the checkpoint policy, `save_per_feature`
    when None (`benchmarks/formulations.py` passes one that saves everything).
    """
    policy = save_per_feature if policy is None else policy
    jitted = isinstance(x, Tracer)
    try:
        return _checkpointed_cached(forward, plan, jitted, policy)
    except TypeError:  # an unhashable setting (e.g. axis_index_groups as lists)
        return _checkpointed_cached.__wrapped__(forward, plan, jitted, policy)


@functools.lru_cache(maxsize=256)
def _checkpointed_cached(
    forward: Callable[..., Any], plan: Any, jitted: bool, policy: Callable[..., bool]
) -> Callable[..., Any]:
    wrapped = jax.checkpoint(functools.partial(forward, plan), policy=policy, prevent_cse=True)
    return jax.jit(wrapped) if jitted else wrapped


# --- fewer kernels --------------------------------------------------------------


@jax.custom_jvp
def rsqrt(v: jax.Array) -> jax.Array:
    """1 / sqrt(v), whose derivative -0.5 / sqrt(v)^3 is computed by multiplying.

    JAX differentiates `lax.rsqrt` as -0.5 * rsqrt(v) / v, and XLA:CPU gives that
    division a kernel of its own in every layer (it does not copy a division into
    the loops that broadcast its result): one kernel less per layer to compile.
    """
    return lax.rsqrt(v)


@rsqrt.defjvp
def _rsqrt_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (v,), (dv,) = primals, tangents
    y = lax.rsqrt(v)
    return y, dv * (-0.5 * y * y * y)


def inverse_bound(r_max: Any, r: jax.Array) -> jax.Array:
    """1 / r_max, divided per feature of r (r > 0 unless NaN, where the bound is moot).

    XLA:CPU gives the division of a scalar that is then broadcast a kernel of its
    own, one more per layer; divided per feature, it fuses with its consumer.
    """
    return 1.0 / jnp.where(r > 0, r_max, 1.0)


def materialized(*values: jax.Array) -> tuple[jax.Array, ...]:
    """The values (of one shape), computed together into a buffer of their own.

    XLA:CPU fuses cheap per-feature expressions into every full-size loop that
    reads them, so the renorm terms (with the schedules behind their bounds) were
    compiled into each forward and backward kernel of the layer, several times
    over: large kernels, slow to compile. A reduction is never fused into its
    consumers, and max(v, -inf) is v exactly (NaN included). For values without
    a gradient (the renorm terms are constants for differentiation).
    """
    stacked = jnp.stack(values)
    floor = jnp.full_like(stacked, -jnp.inf)
    return tuple(jnp.max(jnp.stack([stacked, floor]), axis=0))


# --- schedules of the renorm bounds -------------------------------------------------


def traced_once(schedule: Callable[[jax.Array], Any], step: jax.Array) -> Any:
    """schedule(step); inside a trace, traced once per schedule rather than once per layer."""
    if not isinstance(step, Tracer):
        return schedule(step)
    try:
        jitted = _jitted(schedule)
    except TypeError:  # an unhashable callable
        return schedule(step)
    return jitted(step)


@functools.lru_cache(maxsize=64)
def _jitted(schedule: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    return jax.jit(schedule)
