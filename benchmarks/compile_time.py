"""Compile time of a ResNet-18 training step with each normalization layer.

The step is what Flax's ImageNet example compiles: a ResNet-18 (here the
CIFAR-style one, 3x3 stem, on 32x32 images) in training mode, cross-entropy,
`value_and_grad`, an optax SGD update and the new `batch_stats`, under `jax.jit`.
Each measurement starts from empty caches (`jax.clear_caches()`), as a fresh
process would, with JAX's persistent compilation cache off (a cached program
would be loaded, not compiled), and splits the time into tracing and lowering to StableHLO
("trace") and XLA's compilation ("XLA"). The layers take turns within each round
(order shuffled with a fixed seed) and each cell is the median over rounds, so
that machine noise hits them alike. The compiled step's run time (median of
interleaved calls) and temporary memory are reported beside it, so that compile
time is not bought with either. Wall-clock time is what a user waits; the
process's CPU time (all threads) counts only its own work, which other load on a
shared machine moves less.

`--pmap` compiles the example's data-parallel step instead: `jax.pmap` over
every local device with `axis_name="batch"` on each norm layer, the gradients
and the new `batch_stats` averaged with `lax.pmean`, a batch of 16 per device.
On a host without accelerators, create the devices first:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.

Run: `python benchmarks/compile_time.py [--pmap]` (about two minutes on 2 CPU
cores) or `--quick` (a narrow ResNet of one block on 8x8 images, one round: only
proves it runs). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import platform
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental.compilation_cache import compilation_cache

import jaxrenorm

LAYERS: dict[str, Callable[..., nn.Module]] = {
    "flax.linen.BatchNorm": nn.BatchNorm,
    "jaxrenorm BatchNorm": jaxrenorm.linen.BatchNorm,
    "jaxrenorm BatchRenorm": jaxrenorm.linen.BatchRenorm,  # the paper's schedules
    "jaxrenorm InstanceRenorm": jaxrenorm.linen.InstanceRenorm,
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    filters: int
    norm: Callable[..., nn.Module]
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(self.norm()(conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(conv(self.filters, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(self.filters, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet for 32x32 images; `stages` blocks per stage, `width` filters in the first."""

    norm: Callable[..., nn.Module]
    stages: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(
            self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(self.width * 2**i, norm, strides)(x)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def train_step(model: nn.Module, tx: optax.GradientTransformation, axis_name: str | None = None):
    """The training step of Flax's ImageNet example; with `axis_name`, its pmap step."""

    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
            batch_stats = lax.pmean(batch_stats, axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


TX = optax.sgd(0.1, momentum=0.9, nesterov=True)
AXIS = "batch"  # the pmap axis, as in Flax's ImageNet example


def initial_arguments(
    layer: Callable[..., nn.Module], model_args: dict, batch: tuple, pmap: bool
) -> tuple:
    """The step's arguments: initial variables, optimizer state and the batch.

    With `pmap` the state is replicated on every local device and the batch (a
    leading device axis) split across them.
    """
    variables = ResNet(layer, **model_args).init(jax.random.key(0), batch[0][0], train=False)
    state = (variables["params"], variables["batch_stats"], TX.init(variables["params"]))
    if not pmap:
        return (*state, *(b[0] for b in batch))
    devices = jax.local_device_count()
    state = jax.tree.map(lambda a: jnp.broadcast_to(a, (devices, *a.shape)), state)
    return jax.pmap(lambda *a: a)(*state, *batch)


def measure(layer: Callable[..., nn.Module], model_args: dict, args: tuple, pmap: bool) -> dict:
    """Trace + lower and XLA compile seconds of one step, from empty caches, and the program.

    "cpu" is the process's CPU time over both (every thread: XLA compiles kernels
    in parallel).
    """
    model = ResNet(layer, **model_args)
    jax.clear_caches()
    # The previous measurement's garbage is collected here, not while this one runs.
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    if pmap:
        lowered = jax.pmap(train_step(model, TX, AXIS), axis_name=AXIS).lower(*args)
    else:
        lowered = jax.jit(train_step(model, TX)).lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    cpu = time.process_time() - cpu
    return {"trace": traced - start, "xla": done - traced, "cpu": cpu, "compiled": compiled}


def run(
    model_args: dict, images: tuple[int, ...], rounds: int, step_rounds: int, pmap: bool = False
) -> str:
    """The Markdown table for a ResNet of `model_args` on a batch of this shape (per device)."""
    devices = jax.local_device_count() if pmap else 1
    # NumPy's generator: the batch's values do not matter here, and JAX's random
    # functions would compile programs of their own.
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((devices, *images)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, images.shape[:2]), jnp.int32)
    layers = {n: functools.partial(l, axis_name=AXIS) if pmap else l for n, l in LAYERS.items()}
    # Initialized once per layer, before any measurement: an eager init compiles each
    # of its operations, again after every `clear_caches`, and costs more than the step.
    args = {n: initial_arguments(layers[n], model_args, (images, labels), pmap) for n in LAYERS}
    times = {n: {"trace": [], "xla": [], "cpu": []} for n in LAYERS}
    programs = {}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for name in order.permutation(list(LAYERS)):
            m = measure(layers[name], model_args, args[name], pmap)
            for key in times[name]:
                times[name][key].append(m[key])
            programs[name] = (m["compiled"], args[name])
    step_time = interleaved_step_times(programs, step_rounds)
    base = "flax.linen.BatchNorm"
    med = {n: {k: float(np.median(v)) for k, v in t.items()} for n, t in times.items()}
    total = {n: m["trace"] + m["xla"] for n, m in med.items()}
    rows = [
        "| layer | trace + lower | XLA compile | total | vs Flax | CPU time (vs Flax) "
        "| step time vs Flax | temp memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in LAYERS:
        temp = programs[name][0].memory_analysis().temp_size_in_bytes
        rows.append(
            f"| {name} | {med[name]['trace']:.2f} s | {med[name]['xla']:.2f} s "
            f"| {total[name]:.2f} s | {total[name] / total[base]:.2f}x "
            f"| {med[name]['cpu']:.2f} s ({med[name]['cpu'] / med[base]['cpu']:.2f}x) "
            f"| {step_time[name] / step_time[base]:.2f}x ({step_time[name] * 1e3:.1f} ms) "
            f"| {temp / 2**20:.1f} MiB |"
        )
    return "\n".join(rows)


def interleaved_step_times(programs: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each compiled step, the calls interleaved across layers."""
    for compiled, args in programs.values():
        jax.block_until_ready(compiled(*args))
    samples: dict[str, list[float]] = {n: [] for n in programs}
    order = np.random.default_rng(1)
    for _ in range(rounds):
        for name in order.permutation(list(programs)):
            compiled, args = programs[name]
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            samples[name].append(time.perf_counter() - start)
    return {n: float(np.median(v)) for n, v in samples.items()}


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off inside (if a directory was set), as before after."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache reads the flag once, at its first use
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a narrow ResNet, one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pmap", action="store_true", help="the pmap step over local devices")
    args = parser.parse_args(argv)
    if args.quick:
        model = "ResNet of one block, width 4, training step (batch 4, 8x8x3)"
        model_args, images, rounds, step_rounds = {"stages": (1,), "width": 4}, (4, 8, 8, 3), 1, 3
    else:
        model = "ResNet-18 training step (batch 16, 32x32x3)"
        model_args, images, rounds, step_rounds = {}, (16, 32, 32, 3), args.rounds, 21
    if args.pmap:
        model += f" under jax.pmap over {jax.local_device_count()} devices (batch per device)"
    with no_persistent_cache():
        table = run(model_args, images, rounds=rounds, step_rounds=step_rounds, pmap=args.pmap)
    report = (
        f"{model}, medians over {rounds} rounds from "
        f"empty caches; {platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {datetime.date.today().isoformat()}.\n\n{table}"
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
