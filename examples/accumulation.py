"""Gradient accumulation: 8 micro-batches of 4 against one batch of 32.

The small-batches task (`examples/small_batches.py`: its CNN on scikit-learn's
digits, Adam with cosine decay, the same data order) trained with BatchNorm and
BatchRenorm in three ways, every run the same number of optimizer steps:

- "one batch of 32": one gradient and one statistics update per step;
- "8 x 4, as is": each step accumulates the gradients of 8 micro-batches of 4,
  each normalized with its own statistics and each updating the running
  statistics, with the per-step settings unchanged (momentum 0.99 per call,
  BatchRenorm's ramps `scaled_paper_schedules(steps)` reading a counter that now
  advances 8 times per step): what a user meets who wraps a loop in
  `optax.MultiSteps`;
- "8 x 4, helpers": the same with the time constants kept in optimizer steps:
  `jaxrenorm.micro_batch_momentum(0.99, 8)` and
  `scaled_paper_schedules(steps, micro_batches=8)`.

Evaluated on the test set with the running statistics; mean ± std over seeds.
Writes the table to --out-dir (default `examples/results/latest/`;
`examples/results` publishes it). Default: 3 seeds x 1,500 steps, about 2
minutes on a 2-core x86-64 CPU; `--quick` (BatchRenorm, the two accumulating
ways, 1 seed, 30 steps) only proves it runs.

Run: `python examples/accumulation.py [--quick] [--seeds 3] [--steps 1500]`.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
from quickstart import load_data
from small_batches import BATCH, RESULTS, _hardware, batch_indices, initial_variables, trainer

import jaxrenorm

MICRO_BATCHES = 8  # of BATCH // MICRO_BATCHES = 4 examples
WAYS = {  # name: (micro-batches per step, time constants kept in optimizer steps)
    "one batch of 32": (1, False),
    f"{MICRO_BATCHES} x {BATCH // MICRO_BATCHES}, as is": (MICRO_BATCHES, False),
    f"{MICRO_BATCHES} x {BATCH // MICRO_BATCHES}, helpers": (MICRO_BATCHES, True),
}


def norm(method: str, steps: int, micro_batches: int, helpers: bool):
    """The factory `norm(train, spatial) -> module` of the CNN."""
    k = micro_batches if helpers else 1
    momentum = jaxrenorm.micro_batch_momentum(0.99, k)
    r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(steps, micro_batches=k)

    def make(train: bool, spatial: bool):
        if method == "BatchNorm":
            return jaxrenorm.linen.BatchNorm(use_running_average=not train, momentum=momentum)
        return jaxrenorm.linen.BatchRenorm(
            use_running_average=not train, momentum=momentum, r_max=r_max, d_max=d_max
        )

    return make


def main(argv: list[str] | None = None) -> str:
    """Runs the comparison with the command-line arguments `argv`; returns the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--quick", action="store_true", help="BatchRenorm, 8 x 4, 1 seed, 30 steps: a smoke test"
    )
    parser.add_argument("--out-dir", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    methods, ways = ("BatchNorm", "BatchRenorm"), WAYS
    if args.quick:  # one batch of 32 is small_batches.py's own program, tested there
        args.seeds, args.steps, methods = 1, 30, ("BatchRenorm",)
        ways = {name: way for name, way in WAYS.items() if way[0] > 1}
    out_dir = args.out_dir or RESULTS / ("quick" if args.quick else "latest")
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_data(0)
    seeds = np.arange(args.seeds, dtype=np.int32)
    rng = np.random.default_rng(1234)  # the same batches for every way and method
    indices = np.stack(
        [batch_indices(data[2], args.steps, BATCH, False, rng) for _ in seeds]
    ).astype(np.int32)
    start = time.perf_counter()
    rows = []
    for method in methods:
        cells = []
        for micro_batches, helpers in ways.values():
            make = norm(method, args.steps, micro_batches, helpers)
            variables = initial_variables(make, data, seeds)
            run = trainer(make, data, args.steps, micro_batches=micro_batches)
            accuracy = 100 * np.asarray(run(variables, indices)[0])
            cells.append(f"{accuracy.mean():.1f} ± {accuracy.std():.1f}")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    elapsed = time.perf_counter() - start
    table = "\n".join(
        [
            "| method | " + " | ".join(ways) + " |",
            "|---|" + "---|" * len(ways),
            *rows,
            "",
            f"digits test accuracy (%), mean ± std over {args.seeds} seed"
            f"{'s' if args.seeds > 1 else ''}, {args.steps:,} optimizer steps of "
            f"{BATCH} examples; {_hardware()}, jax {jax.__version__}, {elapsed:.0f} s",
        ]
    )
    print(table)
    (out_dir / "accumulation.md").write_text(table + "\n")
    print(f"wrote {out_dir / 'accumulation.md'}")
    return table


if __name__ == "__main__":
    main()
