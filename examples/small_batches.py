"""When batch statistics fail: small and non-i.i.d. batches, BatchNorm vs BatchRenorm.

A small CNN (conv-norm-relu-pool x2, dense-norm-relu, dense) is trained with
optax Adam and a gradient batch of 32 on two tasks built from scikit-learn's
bundled digits: the digits as they are, and "noisy digits" (the same images and
split, each shifted by up to a pixel, its contrast scaled by a factor drawn from
[0.5, 1.5] and Gaussian noise of standard deviation 0.1 added; generated here,
with a fixed seed), a task on which batch statistics fail where digits only
bends them. Only the examples that provide the normalization statistics change:

- "i.i.d. 32", "i.i.d. 4", "i.i.d. 2": statistics over virtual batches of 32,
  4 or 2 examples drawn at random (Ioffe 2017 simulated microbatches this way);
- "one class per 4": every group of 4 examples that shares statistics holds a
  single class (the classic report: validation is fine when a batch is diverse,
  terrible when the images in a batch look alike).

Methods: BatchNorm; BatchRenorm with the paper's schedule scaled to the run;
BatchRenorm with `grad_through_batch_moments=False`, and with "adaptive" (the
gradient through each group's moments weighted per feature by how much the
groups of a batch differ); adaptive BatchRenorm in the layers whose statistics
groups hold at least MIN_GROUP_VALUES values per feature and LayerNorm in the
others (`SmallGroupFallback`: here the dense layer when its groups hold 2 or 4
examples, one value per feature each); InstanceRenorm (a learned
per-feature mix of BatchRenorm and instance normalization, in the conv layers;
the dense layer has no spatial axis and keeps BatchRenorm); and
flax.linen.GroupNorm, which uses no batch statistics, as the reference. Every
model is evaluated on the (i.i.d.) test set with the running statistics. The
seeds of a configuration train side by side under `jax.vmap`, and each training
run is one `lax.scan`.

Writes, per task, a Markdown table (mean and std over seeds) and a PNG plot to
--out-dir (default `examples/results/latest/`) and prints the table, plus how often
BatchRenorm's clipping was active late in training, and the learned
InstanceRenorm gates. Then it compares each table, cell by cell, with the
published one (`examples/results/small_batches.md` and
`small_batches_noisy.md`, the tables README shows), which a run never
overwrites unless it is given `--out-dir examples/results`. Default: 3 seeds x
1,500 steps (the time each task's runs took ends its caption; the programs are
compiled once for both tasks, while digits trains); `--quick` (1 seed, 150
steps, the settings with groups of 4) is a smoke test of about 30 seconds.

Run: `python examples/small_batches.py [--quick] [--seeds 3] [--steps 1500]`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from quickstart import load_data
from tqdm import tqdm

import jaxrenorm

SETTINGS = {  # name: (virtual batch size, one class per group)
    "i.i.d. 32": (32, False),
    "i.i.d. 4": (4, False),
    "i.i.d. 2": (2, False),
    "one class per 4": (4, True),
}
QUICK_SETTINGS = ("i.i.d. 4", "one class per 4")  # one virtual batch size: 4 compilations
BATCH = 32
# Below this many values per feature in a statistics group, SmallGroupFallback
# normalizes without batch statistics. The variance of n normal values has a
# relative standard deviation of sqrt(2 / (n - 1)): 37% at 16 values, 82% at 4,
# 141% at 2. In this CNN the conv layers' groups hold 32 or more values (2
# examples x 4x4 pixels at least) and the dense layer's hold one per example, so
# any threshold from 5 to 32 makes the same choices.
MIN_GROUP_VALUES = 16
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def noisy_digits(seed: int = 0) -> tuple[np.ndarray, ...]:
    """load_data's split of digits, each image shifted by up to one pixel, its
    contrast scaled by U(0.5, 1.5) and N(0, 0.1^2) noise added (fixed seed)."""
    rng = np.random.default_rng(10_000 + seed)

    def harden(x: np.ndarray) -> np.ndarray:
        n, h, w, _ = x.shape
        padded = np.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
        dy, dx = rng.integers(0, 3, (2, n))
        shifted = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        noisy = shifted * rng.uniform(0.5, 1.5, (n, 1, 1)) + rng.normal(0, 0.1, shifted.shape)
        return noisy.astype(np.float32)[..., None]

    x_train, x_test, y_train, y_test = load_data(seed)
    return harden(x_train), harden(x_test), y_train, y_test


# Task name: (data, settings, file name of its results). Both tasks have the same
# shapes, so they share every compiled program.
TASKS = {
    "digits": (load_data, tuple(SETTINGS), "small_batches"),
    "noisy digits": (
        noisy_digits,
        ("i.i.d. 32", "i.i.d. 2", "one class per 4"),
        "small_batches_noisy",
    ),
}
PUBLISHED = RESULTS / "small_batches.md"  # the digits table README shows (noisy digits beside it)


def methods(total_steps: int) -> dict[str, Callable[[int], Callable[..., nn.Module]]]:
    """Each method maps a virtual batch size to a factory `norm(train, spatial) -> module`."""
    r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(total_steps)

    def renorm(v, grad_through: bool | str = True, instance=False):
        def make(train, spatial):
            cls = (
                jaxrenorm.linen.InstanceRenorm
                if instance and spatial
                else jaxrenorm.linen.BatchRenorm
            )
            return cls(
                use_running_average=not train,
                virtual_batch_size=v,
                r_max=r_max,
                d_max=d_max,
                grad_through_batch_moments=grad_through,
                diagnostics=True,
            )

        return make

    def fallback(v):
        adaptive = renorm(v, grad_through="adaptive")
        return lambda train, spatial: SmallGroupFallback(v, adaptive(train, spatial))

    return {
        "BatchNorm": lambda v: (
            lambda train, spatial: jaxrenorm.linen.BatchNorm(
                use_running_average=not train, virtual_batch_size=v
            )
        ),
        "BatchRenorm": renorm,
        "BatchRenorm, no grad through moments": functools.partial(renorm, grad_through=False),
        "BatchRenorm, adaptive moment gradient": functools.partial(renorm, grad_through="adaptive"),
        "adaptive, LayerNorm in small groups": fallback,
        "InstanceRenorm": functools.partial(renorm, instance=True),
        "GroupNorm": lambda v: lambda train, spatial: nn.GroupNorm(num_groups=4),
    }


class SmallGroupFallback(nn.Module):
    """`norm` where a statistics group holds at least MIN_GROUP_VALUES values per
    feature, `nn.LayerNorm` (each example's own statistics over its features) where
    fewer: a group of a few values estimates its mean and variance mostly from noise,
    and from the class when the group holds one. Chosen from the input's shape.
    """

    virtual_batch_size: int
    norm: nn.Module

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        values = min(self.virtual_batch_size, x.shape[0]) * math.prod(x.shape[1:-1])
        return self.norm(x) if values >= MIN_GROUP_VALUES else nn.LayerNorm()(x)


class Conv3x3(nn.Module):
    """`nn.Conv(features, (3, 3), use_bias=False)` as one matmul over shifted copies.

    The same function and parameter (an HWIO `kernel`, LeCun-normal), computed as
    the 9 shifted copies of the zero-padded input concatenated along the channels,
    times the kernel. At these sizes (8x8 and 4x4 images, 1 to 16 channels) XLA:CPU's
    convolution is dominated by per-call overhead: this trains 4x faster.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
        )
        _, h, w, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        shifted = [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
        return jnp.concatenate(shifted, axis=-1) @ kernel.reshape(-1, self.features)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 as a reshape and a max (cheaper to differentiate)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    norm: Callable[[bool, bool], nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (16, 32):
            x = Conv3x3(features)(x)
            x = max_pool_2x2(nn.relu(self.norm(train, True)(x)))
        x = nn.Dense(64, use_bias=False)(x.reshape(x.shape[0], -1))
        x = nn.relu(self.norm(train, False)(x))
        return nn.Dense(10)(x)


def batch_indices(y: np.ndarray, steps: int, v: int, one_class: bool, rng) -> np.ndarray:
    """(steps, BATCH) training indices; with `one_class`, each group of v shares a label."""
    if not one_class:
        per_epoch = len(y) // BATCH
        epochs = -(-steps // per_epoch)
        order = np.concatenate(
            [rng.permutation(len(y))[: per_epoch * BATCH] for _ in range(epochs)]
        )
        return order[: steps * BATCH].reshape(steps, BATCH)
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    groups = BATCH // v
    labels = rng.integers(0, 10, size=(steps, groups))
    idx = [[rng.choice(by_class[c], v, replace=False) for c in row] for row in labels]
    return np.asarray(idx).reshape(steps, BATCH)


def initial_variables(norm, data, seeds: np.ndarray):
    """The models' variables, one per seed (stacked), for `trainer`.

    Initialized outside the trainer's program, op by op and one seed at a time (the
    same numbers as under vmap): the random kernels of the convolutions and dense
    layers have the same shapes whatever the normalization and the seed, so their
    (costly to compile) programs are compiled once for every method and seed.
    """
    x = jnp.asarray(data[0][:BATCH])
    model = CNN(norm)
    per_seed = [model.init(jax.random.key(int(seed)), x, train=False) for seed in seeds]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_seed)


def trainer(norm, data, steps: int, micro_batches: int = 1):
    """A jitted function (variables, indices) -> (test accuracies, late clipping
    diagnostics, rho), the variables from `initial_variables`: `train_program` on
    this data."""
    program = train_program(norm, steps, micro_batches)
    arrays = tuple(jnp.asarray(a) for a in data)
    return lambda variables, idx: program(variables, idx, arrays)


def train_program(norm, steps: int, micro_batches: int = 1):
    """A jitted function (variables, indices, data) -> (test accuracies, late
    clipping diagnostics, rho), the variables from `initial_variables`, data =
    (x_train, x_test, y_train, y_test): one program for every data set of these shapes.

    rho holds the (mean, min, max) of the learned gates of the InstanceRenorm layers
    (NaN without any).

    One model per seed, trained side by side under vmap; each run is one lax.scan.
    With `micro_batches` k > 1, each step accumulates the gradients of k
    micro-batches of BATCH / k examples (a `lax.scan`), each normalized with its
    own statistics and each updating the running statistics, and applies their mean.
    """
    model = CNN(norm)
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))

    def run(variables, idx, data):
        x_train, x_test, y_train, y_test = data
        params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

        def gradients(params, state, batch_idx):
            """The gradients of one batch's loss, the new state, the batch's diagnostics."""
            x, y = x_train[batch_idx], y_train[batch_idx]

            def loss_fn(params):
                logits, upd = model.apply(
                    {"params": params, **state},
                    x,
                    train=True,
                    mutable=["batch_stats", "intermediates"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, upd

            grads, upd = jax.grad(loss_fn, has_aux=True)(params)
            diag = jaxrenorm.collect_diagnostics(upd.get("intermediates", {}))
            summary = (
                {
                    name: jnp.mean(jnp.stack([v for k, v in diag.items() if k.endswith(name)]))
                    for name in ("r_clipped", "d_clipped")
                }
                if diag
                else {}
            )
            return grads, {k: upd[k] for k in state}, summary

        def step(carry, batch_idx):
            params, state, opt = carry
            if micro_batches == 1:
                grads, state, summary = gradients(params, state, batch_idx)
            else:

                def micro(state, micro_idx):
                    grads, state, summary = gradients(params, state, micro_idx)
                    return state, (grads, summary)

                micro_idx = batch_idx.reshape(micro_batches, -1)
                state, (grads, summary) = jax.lax.scan(micro, state, micro_idx)
                grads, summary = jax.tree.map(lambda a: a.mean(0), (grads, summary))
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), state, opt), summary

        (params, state, _), diag = jax.lax.scan(step, (params, state, tx.init(params)), idx)
        logits = model.apply({"params": params, **state}, x_test, train=False)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
        late = {k: v[-(steps // 4) :].mean() for k, v in diag.items()}  # last quarter
        gates = [
            jnp.clip(leaf, 0, 1)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path).endswith("['rho']")
        ]
        gates = jnp.concatenate(gates) if gates else jnp.full(1, jnp.nan)
        rho = jnp.stack([gates.mean(), gates.min(), gates.max()])
        return accuracy, late, rho

    return jax.jit(jax.vmap(run, in_axes=(0, 0, None)))


def markdown_table(results, setting_names, method_names) -> str:
    lines = [
        "| method | " + " | ".join(setting_names) + " |",
        "|---|" + "---|" * len(setting_names),
    ]
    for m in method_names:
        cells = []
        for s in setting_names:
            acc = 100 * results[(m, s)]
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, setting_names, method_names, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(method_names)
    for i, m in enumerate(method_names):
        acc = [100 * results[(m, s)] for s in setting_names]
        pos = np.arange(len(setting_names)) + (i - (len(method_names) - 1) / 2) * width
        ax.bar(pos, [a.mean() for a in acc], width, yerr=[a.std() for a in acc], label=m, capsize=3)
    ax.set_xticks(np.arange(len(setting_names)), setting_names)
    ax.set_ylabel("test accuracy (%), running statistics")
    ax.set_xlabel("examples that share batch statistics")
    ax.set_ylim(0, 100)
    ax.axhline(10, color="gray", lw=0.8, ls=":")  # chance
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _hardware() -> str:
    """What ran the experiment, e.g. "a 2-core x86_64 CPU"."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"a {os.cpu_count()}-core {platform.machine()} CPU"
    return f"{jax.device_count()} x {device.device_kind}"


def main(argv: list[str] | None = None) -> str:
    """Runs the experiment with the command-line arguments `argv`; returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="1 seed, 150 steps: a smoke test")
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=None,
        help="default: examples/results/latest (examples/results/quick with --quick); "
        "examples/results publishes the run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 150
    if args.out_dir is None:  # a run never overwrites the published results by default
        args.out_dir = RESULTS / ("quick" if args.quick else "latest")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    all_methods = methods(args.steps)
    seeds = np.arange(args.seeds, dtype=np.int32)
    tasks = {}
    for task, (load, task_settings, _) in TASKS.items():
        if args.quick:  # the groups of 4: one virtual batch size, programs for both tasks
            task_settings = [k for k in task_settings if k in QUICK_SETTINGS]
        tasks[task] = (load(0), {k: SETTINGS[k] for k in task_settings})
    runs = [(t, m, s) for t, (_, settings) in tasks.items() for s in settings for m in all_methods]
    data_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tasks["digits"][0])

    # One program per method and virtual batch size, for both tasks (their data have
    # the same shapes), compiled ahead of time on a background thread, in the order the
    # runs need them, while the main thread trains with the programs already compiled
    # (compiling is a third of the work).
    def program(method, v):
        norm = all_methods[method](v)
        variables = jax.eval_shape(lambda: initial_variables(norm, tasks["digits"][0], seeds))
        indices = jax.ShapeDtypeStruct((args.seeds, args.steps, BATCH), np.int32)
        return train_program(norm, args.steps).lower(variables, indices, data_shapes).compile()

    def key(method, v):
        return method, None if method == "GroupNorm" else v

    # Per task: {(method, setting): ...}, and the seconds its runs took.
    results, diagnostics, gates = ({t: {} for t in tasks} for _ in range(3))
    # The models' initial variables depend on the method and the virtual batch size
    # only (the data lends them its shapes): made once, for every setting and task.
    inits = {}
    elapsed = dict.fromkeys(tasks, 0.0)
    with ThreadPoolExecutor(max_workers=1) as compiler:
        programs = {}
        for task, method, setting in runs:
            v = tasks[task][1][setting][0]
            if key(method, v) not in programs:
                programs[key(method, v)] = compiler.submit(program, method, v)
        for task, method, setting in tqdm(runs, desc="training (runs)", unit="run"):
            start = time.perf_counter()
            data, settings = tasks[task]
            v, one_class = settings[setting]
            rng = np.random.default_rng(1234)  # the same batches for every method
            indices = np.stack(
                [batch_indices(data[2], args.steps, v, one_class, rng) for _ in seeds]
            ).astype(np.int32)
            if key(method, v) not in inits:
                inits[key(method, v)] = initial_variables(all_methods[method](v), data, seeds)
            variables = inits[key(method, v)]
            acc, late, rho = programs[key(method, v)].result()(variables, indices, data)
            results[task][(method, setting)] = np.asarray(acc)
            if not np.isnan(rho).any():
                gates[task][setting] = np.asarray(rho)
            if late:
                diagnostics[task][(method, setting)] = {k: np.asarray(d) for k, d in late.items()}
            elapsed[task] += time.perf_counter() - start

    reports = []
    for task, (_, settings) in tasks.items():
        report = task_report(
            task,
            results[task],
            diagnostics[task],
            gates[task],
            list(settings),
            list(all_methods),
            args,
            elapsed[task],
        )
        name = TASKS[task][2]
        print("\n" + report)
        (args.out_dir / f"{name}.md").write_text(report)
        title = report.split("\n\n")[1].replace("; ", "\n", 1)
        plot(results[task], list(settings), list(all_methods), args.out_dir / f"{name}.png", title)
        print(f"wrote {args.out_dir / f'{name}.md'} and {args.out_dir / f'{name}.png'}")
        published = RESULTS / f"{name}.md"
        if published.exists() and args.out_dir.resolve() != RESULTS:
            print(compare(report, published.read_text(), published))
        reports.append(report)
    return "\n".join(reports)


def task_report(task, results, diagnostics, gates, setting_names, method_names, args, elapsed):
    """One task's Markdown report: the accuracy table, its caption, the learned
    InstanceRenorm gates and the late clipping of the BatchRenorm layers."""
    table = markdown_table(results, setting_names, method_names)
    about = (
        f"{task} test accuracy (%), mean ± std over {args.seeds} seed"
        f"{'s' if args.seeds > 1 else ''}, {args.steps:,} steps, gradient batch {BATCH}; "
        f"{_hardware()}, jax {jax.__version__}, {elapsed:.0f} s"
    )
    clip_lines = [
        f"| {m} | {s} | {100 * d['r_clipped'].mean():.0f}% | {100 * d['d_clipped'].mean():.0f}% |"
        for (m, s), d in diagnostics.items()
    ]
    clipping = "\n".join(
        [
            "Clipping in the last quarter of training (fraction of features and groups "
            "where the bound was active):",
            "",
            "| method | setting | r clipped | d clipped |",
            "|---|---|---|---|",
            *clip_lines,
        ]
    )
    gate_lines = "\n".join(
        [
            "Learned InstanceRenorm gate rho over the conv layers' features, mean "
            "[min, max] over features and seeds (0.5 at the start; 1 = batch statistics, "
            "0 = instance statistics):",
            "",
            "| " + " | ".join(gates) + " |",
            "|" + "---|" * len(gates),
            "| "
            + " | ".join(
                f"{g[:, 0].mean():.2f} [{g[:, 1].min():.2f}, {g[:, 2].max():.2f}]"
                for g in gates.values()
            )
            + " |",
        ]
    )
    return f"{table}\n\n{about}\n\n{gate_lines}\n\n{clipping}\n"


def parse_report(report: str) -> tuple[dict[tuple[str, str], tuple[float, float]], int, int]:
    """The accuracy table of a report: ({(method, setting): (mean, std)}, seeds, steps)."""
    lines = report.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    settings = header[1:]
    cells = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        method, *values = (c.strip() for c in line.strip("|").split("|"))
        for setting, value in zip(settings, values, strict=True):
            mean, std = value.split(" ± ")
            cells[(method, setting)] = (float(mean), float(std))
    about = re.search(r"over (\d+) seeds?, ([\d,]+) steps", report)
    if about is None:
        raise ValueError("the report has no 'over N seeds, M steps' caption")
    return cells, int(about.group(1)), int(about.group(2).replace(",", ""))


def compare(report: str, published: str, path: pathlib.Path = PUBLISHED) -> str:
    """Says, cell by cell, how this run's accuracy table compares with the published one.

    A cell agrees when the difference of the two means is within 3 standard errors
    of a difference of means over seeds, sqrt(s1^2 / n1 + s2^2 / n2), plus 0.1 for
    the rounding of both tables to one decimal. Training on one-class groups is
    chaotic: its last digits move from one CPU to another.
    """
    cells, seeds, steps = parse_report(report)
    ref, ref_seeds, ref_steps = parse_report(published)
    where = f"the published table ({path.relative_to(RESULTS.parents[1])})"
    if steps != ref_steps:
        return f"Not compared with {where}: it trained {ref_steps:,} steps, this run {steps:,}."
    common = [k for k in cells if k in ref]
    differ = []
    for key in common:
        (m, s), (m0, s0) = cells[key], ref[key]
        if abs(m - m0) > 3 * math.sqrt(s**2 / seeds + s0**2 / ref_seeds) + 0.1:
            differ.append(
                f"  {key[0]} / {key[1]}: {m0:.1f} ± {s0:.1f} published, "
                f"{m:.1f} ± {s:.1f} here ({m - m0:+.1f})"
            )
    summary = (
        f"Compared with {where}, {ref_seeds} seeds: {len(common) - len(differ)} of "
        f"{len(common)} cells agree within 3 standard errors"
    )
    return summary + ("." if not differ else "; these differ:\n" + "\n".join(differ))


if __name__ == "__main__":
    main()
