"""Side-by-side timing of jaxrenorm's linen modules against flax.linen.BatchNorm.

For each shape and dtype, in one process: the training forward pass, forward +
backward (`value_and_grad` w.r.t. params and input, with the batch_stats update,
the loss being sum(y * g) for a fixed upstream gradient g), the inference forward
pass, and the compiled temporary memory of forward + backward. Every function is
jitted and warmed up; the implementations then run in interleaved rounds
so that machine noise hits them alike, and each cell is
the median over rounds. Effective bandwidth is reported against a plain
elementwise copy (y = x * 1.0001) timed in the same rounds, the physical floor on
the machine. The order within a round is shuffled (fixed seed) so that no
implementation always runs after the same kernel.

Run: `python benchmarks/bench.py` (a few minutes on 2 CPU cores) or `--quick`
(small shapes, float32 only, few rounds: only proves it runs); `--masked` trains every layer
with a left-padding mask. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxrenorm

SHAPES = {"conv NHWC (64, 32, 32, 64)": (64, 32, 32, 64), "dense (4096, 256)": (4096, 256)}
QUICK_SHAPES = {"conv NHWC (8, 8, 8, 16)": (8, 8, 8, 16), "dense (256, 32)": (256, 32)}
MODULES: dict[str, Callable[[], nn.Module]] = {
    "flax.linen.BatchNorm": lambda: nn.BatchNorm(),
    "jaxrenorm BatchNorm": lambda: jaxrenorm.linen.BatchNorm(),
    "jaxrenorm BatchRenorm": lambda: jaxrenorm.linen.BatchRenorm(r_max=3.0, d_max=5.0),
    # The cost of the adaptive moment gradient, against the same virtual batches.
    "jaxrenorm BatchRenorm, groups of 8": lambda: jaxrenorm.linen.BatchRenorm(
        r_max=3.0, d_max=5.0, virtual_batch_size=8
    ),
    "jaxrenorm BatchRenorm, groups of 8, adaptive": lambda: jaxrenorm.linen.BatchRenorm(
        r_max=3.0, d_max=5.0, virtual_batch_size=8, grad_through_batch_moments="adaptive"
    ),
}
PASSES = ("train fwd", "fwd+bwd", "infer fwd")


def build(module: nn.Module, x: jax.Array, g: jax.Array, mask: jax.Array | None = None):
    """Jitted (train forward, forward+backward, inference forward) and fwd+bwd temp bytes."""
    # Jitted: an eager init would compile each of its operations, for every shape.
    init = jax.jit(functools.partial(module.init, use_running_average=False))
    variables = init(jax.random.key(0), x)
    params, stats = variables["params"], variables["batch_stats"]

    def train(params, stats, x):
        return module.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=False,
            mask=mask,
            mutable=["batch_stats"],
        )

    def loss(params, x, stats):
        y, upd = train(params, stats, x)
        return jnp.sum((y * g).astype(jnp.float32)), upd

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    fwd = jax.jit(train)
    infer = jax.jit(
        lambda params, stats, x: module.apply(
            {"params": params, "batch_stats": stats}, x, use_running_average=True
        )
    )
    temp = grad.lower(params, x, stats).compile().memory_analysis().temp_size_in_bytes
    return {
        "train fwd": lambda: fwd(params, stats, x),
        "fwd+bwd": lambda: grad(params, x, stats),
        "infer fwd": lambda: infer(params, stats, x),
    }, temp


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for f in fns.values():  # warm-up: compile and touch the buffers
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    order = np.random.default_rng(0)
    for _ in range(rounds):
        # A fresh order each round, so that no implementation always follows the
        # same kernel (and finds the same data in cache).
        for k in order.permutation(names):
            start = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def left_padding(shape: tuple[int, ...]) -> jax.Array:
    """A mask of shape (*shape[:-1], 1): the first quarter of each example's positions out.

    For a dense (N, C) input, the first quarter of the examples: what left-padded
    sequences give, and the case where the first element of a group is masked.
    """
    positions = shape[1:-1]
    if not positions:
        return (jnp.arange(shape[0]) >= shape[0] // 4).reshape(shape[0], 1)
    index = jnp.arange(int(np.prod(positions))).reshape(1, *positions, 1)
    return jnp.broadcast_to(index >= index.size // 4, (*shape[:-1], 1))


def run(shapes: dict[str, tuple[int, ...]], dtypes, rounds: int, masked: bool = False) -> str:
    rows = []
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            kx, kg = jax.random.split(jax.random.key(1))
            x = (jax.random.normal(kx, shape) * 2 + 1).astype(dtype)
            g = jax.random.normal(kg, shape).astype(dtype)
            mask = left_padding(shape) if masked else None
            copy = jax.jit(lambda x: x * jnp.asarray(1.0001, x.dtype))
            fns: dict[str, Callable[[], object]] = {"copy": lambda copy=copy, x=x: copy(x)}
            temps = {}
            for name, make in MODULES.items():
                passes, temps[name] = build(make(), x, g, mask)
                for p, f in passes.items():
                    fns[f"{name}|{p}"] = f
            med = interleaved_medians(fns, rounds)
            nbytes = x.size * x.dtype.itemsize
            # Bytes each pass must move at least: read x, write y (forward); read x and
            # g, write dx (backward).
            floor_bytes = {"train fwd": 2 * nbytes, "fwd+bwd": 5 * nbytes, "infer fwd": 2 * nbytes}
            copy_bw = 2 * nbytes / med["copy"]
            for name in MODULES:
                base = "flax.linen.BatchNorm"
                cells = []
                for p in PASSES:
                    t, t0 = med[f"{name}|{p}"], med[f"{base}|{p}"]
                    bw = floor_bytes[p] / t / copy_bw
                    cells.append(f"{t / t0:.2f}x ({t * 1e3:.2f} ms, {100 * bw:.0f}%)")
                mem = f"{temps[name] / temps[base]:.2f}x ({temps[name] / 2**20:.1f} MiB)"
                rows.append(
                    f"| {shape_name} | {jnp.dtype(dtype).name} | {name} | "
                    + " | ".join(cells)
                    + f" | {mem} |"
                )
    header = [
        "| shape | dtype | implementation | " + " | ".join(PASSES) + " | fwd+bwd temp memory |",
        "|---|---|---|" + "---|" * (len(PASSES) + 1),
    ]
    return "\n".join(header + rows)


def command_line(
    doc: str, shapes: dict, quick_shapes: dict, parser: argparse.ArgumentParser | None = None
) -> tuple[dict, int, argparse.Namespace]:
    """The options of the benchmark scripts: (shapes, rounds, all options)."""
    parser = parser or argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    return (quick_shapes, 3, args) if args.quick else (shapes, args.rounds, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--masked", action="store_true", help="train with a left-padding mask (`left_padding`)"
    )
    shapes, rounds, args = command_line(__doc__, SHAPES, QUICK_SHAPES, parser)
    dtypes = (jnp.float32,) if args.quick else (jnp.float32, jnp.bfloat16)
    table = run(shapes, dtypes, rounds, masked=args.masked)
    print(
        f"Ratios to flax.linen.BatchNorm (median time, then the median in ms and the "
        f"effective bandwidth as a fraction of an elementwise copy); {rounds} interleaved "
        f"rounds; {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}.\n"
    )
    print(table)


if __name__ == "__main__":
    main()
