"""The core's design choices, measured: variance formulations and the backward pass.

Two tables, each run in one process with interleaved rounds (`bench.py`'s method):

1. The training forward pass of one normalization layer (statistics over every
   axis but the last, then the normalized output) in six formulations of the
   batch variance: time relative to flax.linen.BatchNorm (E[x^2] - E[x]^2), and
   the variance's largest relative error on x = 1e4 + N(0, 1) in float32.
2. Forward + backward of jaxrenorm's BatchNorm as shipped (the training pass under
   `jax.checkpoint`, saving only per-feature values) against plain autodiff of the
   same forward pass (a policy that saves everything) and against flax.linen:
   time and the compiled program's temporary memory.

Run: `python benchmarks/formulations.py` (a few minutes on 2 CPU cores) or
`--quick` (one small shape, few rounds: only proves it runs). Prints Markdown tables;
docs/benchmarks.md shows their figures.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench import build, command_line, interleaved_medians
from jax import lax

import jaxrenorm

SHAPES = {"conv (64, 32, 32, 64)": (64, 32, 32, 64), "dense (4096, 256)": (4096, 256)}
QUICK_SHAPES = {"conv (8, 8, 8, 16)": (8, 8, 8, 16)}
EPS = 1e-5


def _axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _normalized(x, mean, var):
    return (x - mean) * lax.rsqrt(var + EPS)


def two_pass(x):
    mean = x.mean(_axes(x), keepdims=True)
    var = jnp.square(x - mean).mean(_axes(x), keepdims=True)
    return _normalized(x, mean, var), var


def _first(x):
    return x[(slice(0, 1),) * (x.ndim - 1)]


def mean_and_shifted_square(x):
    """mean(x), and the variance from mean((x - k)^2): the mean is rounded twice."""
    k = lax.stop_gradient(_first(x))
    mean = x.mean(_axes(x), keepdims=True)
    var = jnp.square(x - k).mean(_axes(x), keepdims=True) - jnp.square(mean - k)
    return _normalized(x, mean, var), var


def shared_shift(x):
    """One `x - k` shared by both reductions (XLA:CPU writes it out in full)."""
    k = lax.stop_gradient(_first(x))
    d = x - k
    m1 = d.mean(_axes(x), keepdims=True)
    var = jnp.square(d).mean(_axes(x), keepdims=True) - jnp.square(m1)
    return (d - m1) * lax.rsqrt(var + EPS), var


def variadic(x):
    """Both sums in one two-operand `lax.reduce`."""
    k = lax.stop_gradient(_first(x))
    d = x - k
    zero = jnp.zeros((), x.dtype)
    s1, s2 = lax.reduce(
        (d, jnp.square(d)),
        (zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        _axes(x),
    )
    n = np.prod(x.shape[:-1])
    m1, var = s1 / n, s2 / n - jnp.square(s1 / n)
    return (d - m1) * lax.rsqrt(var + EPS), var


def jaxrenorm_default(x):
    stats = jaxrenorm.init_batch_stats(x.shape[-1])
    y, _ = jaxrenorm.batch_norm(x, None, stats, use_running_average=False, momentum=0.0)
    return y, jaxrenorm.moments(x, _axes(x))[1]


def flax_default(x):
    bn = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    variables = {"batch_stats": jaxrenorm.init_batch_stats(x.shape[-1])}
    y, _ = bn.apply(variables, x, mutable=["batch_stats"])
    mean = x.mean(_axes(x))
    return y, jnp.square(x).mean(_axes(x)) - jnp.square(mean)  # what Flax computes


FORMULATIONS: dict[str, Callable] = {
    "E[x²] - E[x]² (flax.linen.BatchNorm's default)": flax_default,
    "exact two-pass": two_pass,
    "mean(x) with mean((x - k)²)": mean_and_shifted_square,
    "shifted, one shared x - k": shared_shift,
    "shifted, both sums in one variadic lax.reduce": variadic,
    "shifted, one copy of k per reduction (jaxrenorm)": jaxrenorm_default,
}


def variance_error(fn: Callable) -> float:
    x = 1e4 + jax.random.normal(jax.random.key(0), (256, 16, 16, 8))
    want = np.asarray(x, np.float64).reshape(-1, 8).var(0)
    got = np.asarray(jax.jit(fn)(x)[1], np.float64).reshape(-1)
    return float(np.max(np.abs(got - want) / want))


def forward_table(shapes, rounds: int) -> str:
    rows = ["| formulation | " + " | ".join(shapes) + " | variance error |"]
    rows.append("|---|" + "---|" * (len(shapes) + 1))
    ratios = {name: [] for name in FORMULATIONS}
    for shape in shapes.values():
        x = jax.random.normal(jax.random.key(1), shape) * 2 + 1
        compiled = {name: jax.jit(lambda x, f=f: f(x)[0]) for name, f in FORMULATIONS.items()}
        med = interleaved_medians({n: lambda c=c, x=x: c(x) for n, c in compiled.items()}, rounds)
        base = med[next(iter(FORMULATIONS))]
        for name in FORMULATIONS:
            ratios[name].append(f"{med[name] / base:.2f}x")
    for name, fn in FORMULATIONS.items():
        rows.append(f"| {name} | " + " | ".join(ratios[name]) + f" | {variance_error(fn):.1e} |")
    return "\n".join(rows)


class _SavingEverything(jaxrenorm.linen.BatchNorm):
    """Plain autodiff of the same forward pass: the checkpoint keeps every intermediate.

    `remat_policy` is the layers' private option (`jaxrenorm._norm.Options`) for the
    `jax.checkpoint` policy of the training forward pass.
    """

    remat_policy: Callable = jax.checkpoint_policies.everything_saveable


def backward_table(shapes, rounds: int) -> str:
    """`bench.py`'s forward+backward pass (with the running update) of three layers."""
    rows = ["| forward + backward | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    cells: dict[str, list[str]] = {}
    for shape in shapes.values():
        kx, kg = jax.random.split(jax.random.key(2))
        x, g = jax.random.normal(kx, shape) * 2 + 1, jax.random.normal(kg, shape)
        variants = {
            "flax.linen.BatchNorm": build(nn.BatchNorm(), x, g),
            "jaxrenorm BatchNorm, as shipped": build(jaxrenorm.linen.BatchNorm(), x, g),
        }
        variants["jaxrenorm BatchNorm, plain autodiff (saves everything)"] = build(
            _SavingEverything(), x, g
        )
        fns = {name: passes["fwd+bwd"] for name, (passes, _) in variants.items()}
        med = interleaved_medians(fns, rounds)
        base = med["flax.linen.BatchNorm"]
        for name, (_, temp) in variants.items():
            cells.setdefault(name, []).append(f"{med[name] / base:.2f}x, {temp / 2**20:.1f} MiB")
    rows += [f"| {name} | " + " | ".join(c) + " |" for name, c in cells.items()]
    return "\n".join(rows)


def main() -> None:
    shapes, rounds, _ = command_line(__doc__, SHAPES, QUICK_SHAPES)
    print(
        f"Float32, {rounds} interleaved rounds, median times relative to "
        f"flax.linen.BatchNorm; {platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {datetime.date.today().isoformat()}.\n"
    )
    print(forward_table(shapes, rounds) + "\n")
    print(backward_table(shapes, rounds))


if __name__ == "__main__":
    main()
