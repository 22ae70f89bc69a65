"""Tolerances for two float32 computations that agree up to round-off.

A scan and the unrolled loop, a vmap and separate calls, eight devices and one,
our layer and Flax's: each pair computes the same numbers with sums in another
order, so they agree to round-off, not bitwise. How much round-off depends on
the code XLA:CPU generates for the processor (vector width, the order of a
reduction's partial sums, fused multiply-adds, the matmul kernel), so a
tolerance fitted to one CPU fails on the next.

The bound used here is the textbook one for a sum of n terms computed in two
orders: each result is within about n * eps * max|term| of the exact sum. A
comparison names the number of terms its longest sum adds (`terms`) and is
allowed `ulps * terms` float32 epsilons of the largest magnitude in what it
compares, as an absolute tolerance and the same number as a relative one. A
wrong number (a lost update, a wrong axis, a missed scale) is off by a
fraction of the values themselves, orders of magnitude above that.

Where the claim is "the same program on the same inputs", the comparison stays
bitwise (`np.testing.assert_array_equal`).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def largest(tree: Any) -> float:
    """The largest finite |value| in a tree of arrays (1.0 for an all-zero tree)."""
    leaves = [np.abs(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)]
    finite = [v[np.isfinite(v)] for v in leaves]
    return max((float(v.max()) for v in finite if v.size), default=0.0) or 1.0


def tolerance(expected: Any, terms: int, ulps: float = 4.0) -> dict[str, float]:
    """`rtol` and `atol` for `assert_allclose`: round-off of sums of `terms` values."""
    rtol = ulps * terms * EPS32
    return {"rtol": rtol, "atol": rtol * largest(expected)}


def assert_close(actual: Any, expected: Any, *, terms: int, ulps: float = 4.0) -> None:
    """`actual` equals `expected` (arrays or trees) up to the round-off of `terms`-term sums."""
    chex.assert_trees_all_close(actual, expected, **tolerance(expected, terms, ulps))
