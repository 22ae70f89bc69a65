"""The harness of the tests that compare the pure functions with tests/reference.py.

`run` compiles one program per case (dispatching op by op is much slower): the
output, the new running statistics, and the gradients of sum(g * y) with respect
to the input and to every params entry. NumPy inputs become float32; JAX arrays
keep their dtype (e.g. a bfloat16 input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tests import reference


class Run(NamedTuple):
    y: jax.Array
    new: dict[str, jax.Array]  # the new batch statistics
    dx: jax.Array
    dparams: dict[str, jax.Array]  # one gradient per params entry


def data(shape: tuple[int, ...], axis: Any, seed: int = 0, offset: float = 0.0):
    """(x, scale, bias, mean, var, g): a random case in float64, per-feature values varied."""
    rng = np.random.default_rng(seed)
    fa, _ = reference.split_axes(len(shape), axis)
    fshape = tuple(shape[a] for a in fa)
    x = rng.normal(size=shape) * 2.0 + offset
    scale = rng.uniform(0.5, 1.5, size=fshape)
    bias = rng.normal(size=fshape)
    mean = rng.normal(size=fshape)
    var = rng.uniform(0.5, 2.0, size=fshape)
    g = rng.normal(size=shape)
    return x, scale, bias, mean, var, g


def _float32(tree: Any) -> Any:
    return jax.tree.map(
        lambda v: v if isinstance(v, jax.Array) else jnp.asarray(v, jnp.float32), tree
    )


def run(fn: Callable, x: Any, params: Any, stats: Any, g: Any, **kw: Any) -> Run:
    """`fn(x, params, stats, **kw)` with the gradients of sum(g * y), in one compiled program."""

    @jax.jit
    def compiled(x, params, stats, g):
        def f(x, params):
            return fn(x, params, stats, **kw)

        y, f_vjp, new = jax.vjp(f, x, params, has_aux=True)
        dx, dparams = f_vjp(g.astype(y.dtype))
        return Run(y, new, dx, dparams)

    return compiled(*_float32((x, params, stats, g)))


def run_affine(fn: Callable, x, scale, bias, mean, var, g, **kw: Any) -> Run:
    """`run` with params {"scale", "bias"} and statistics {"mean", "var"}."""
    return run(fn, x, {"scale": scale, "bias": bias}, {"mean": mean, "var": var}, g, **kw)


def assert_matches(
    got: Run, ref: reference.Result, tol: float = 2e-5, grad_tol: float = 1e-4, rows: Any = ...
) -> None:
    """`got` against the reference: y, new statistics, dx and every params gradient.

    `rows` selects the part of y and dx to compare (e.g. the valid rows of a mask).
    """

    def close(a, b, t, name):
        np.testing.assert_allclose(a, b, rtol=t, atol=t, err_msg=name)

    close(np.asarray(got.y)[rows], ref.y[rows], tol, "y")
    close(got.new["mean"], ref.new_mean, tol, "mean")
    close(got.new["var"], ref.new_var, tol, "var")
    close(np.asarray(got.dx)[rows], ref.dx[rows], grad_tol, "dx")
    for name, grad in got.dparams.items():
        close(grad, getattr(ref, f"d{name}"), grad_tol, f"d{name}")
