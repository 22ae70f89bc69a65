"""Data-parallel training of the quickstart CNN with cross-device BatchRenorm, two ways.

Both train the quickstart's `TrainState` (parameters, optimizer state and the
`batch_stats` collection) with its loss and gradient.

`--mode pmap`: `jax.pmap` over the devices, BatchRenorm with `axis_name="batch"`
(one all-reduce of counts, sums and sums of squares per layer), gradients
averaged with `lax.pmean`.

`--mode sharded-jit`: one `jax.jit` program over a `Mesh`; the batch is sharded
with `NamedSharding(mesh, P("data"))`, the state is replicated, and the model
needs no axis name: the quickstart's single-device `train_step` runs unchanged,
XLA inserts the collectives, and the statistics are those of the whole global
batch.

Both print the test accuracy and the training throughput. On a CPU-only machine
the script asks XLA for 8 host devices itself (the flag only affects the CPU
platform, so on a GPU/TPU host the real devices are used). About 15 s for both
modes on 2 CPU cores: `python examples/data_parallel.py --mode pmap` (or
`sharded-jit`, or `both`, the default).

Several hosts: start the same command on every host with
`--coordinator HOST0:PORT --num-processes N --process-id I` (I = 0..N-1); each
process then loads the data, feeds its own devices its slice of every global
batch, and `jax.distributed.initialize` joins the devices of all hosts into one
system. On CPU-only hosts add `--cpu-collectives gloo`.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import time

import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from quickstart import (
    CNN,
    accuracy,
    create_train_state,
    load_data,
    loss_and_grads,
    train_step,
)
from tqdm import tqdm


def _batches(x, y, batch_size, epochs, seed):
    """Global batches, each split so that this process gets its own contiguous slice."""
    rng = np.random.default_rng(seed)
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(len(x) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size][lo : lo + per_process]
            yield x[idx], y[idx]


def train_pmap(args, data, total_steps):
    x_train, x_test, y_train, y_test = data
    n_local = jax.local_device_count()
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, total_steps))
    # The layers compute the statistics of the global batch over the mapped axis.
    model = CNN(total_steps=total_steps, axis_name="batch")
    state = create_train_state(model, x_train[:2], tx, args.seed)
    state = jax.tree.map(lambda a: np.broadcast_to(a, (n_local, *np.shape(a))), state)

    def step(state, x, y):
        loss, grads, batch_stats = loss_and_grads(state, x, y)
        grads = lax.pmean(grads, "batch")
        state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
        return state, lax.pmean(loss, "batch")

    step = jax.pmap(step, axis_name="batch", donate_argnums=0)

    def shard(a):
        return a.reshape(n_local, -1, *a.shape[1:])

    def run_step(state, x, y):
        return step(state, shard(x), shard(y))

    state = _loop(run_step, state, x_train, y_train, args, total_steps)
    return _accuracy(jax.tree.map(lambda a: a[0], state), x_test, y_test)


def train_sharded_jit(args, data, total_steps):
    x_train, x_test, y_train, y_test = data
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, total_steps))
    model = CNN(total_steps=total_steps)  # no axis name: XLA inserts the collectives
    state = create_train_state(model, x_train[:2], tx, args.seed)
    state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated

    def global_array(a):
        shape = (a.shape[0] * jax.process_count(), *a.shape[1:])
        return jax.make_array_from_process_local_data(data_sharding, a, shape)

    def run_step(state, x, y):
        return train_step(state, global_array(x), global_array(y))

    state = _loop(run_step, state, x_train, y_train, args, total_steps)
    return _accuracy(state, x_test, y_test)


def _loop(run_step, state, x_train, y_train, args, total_steps):
    """Runs the steps with a progress bar; reports throughput after the first (compiling) step."""
    bar = tqdm(
        _batches(x_train, y_train, args.batch_size, args.epochs, args.seed),
        total=total_steps,
        desc=args.current_mode,
        disable=jax.process_index() != 0,
    )
    start, seen = None, 0
    for x, y in bar:
        state, loss = run_step(state, x, y)
        if start is None:
            jax.block_until_ready(state)
            start = time.perf_counter()
            continue
        seen += args.batch_size
        bar.set_postfix(loss=f"{float(np.asarray(loss).ravel()[0]):.3f}", refresh=False)
    jax.block_until_ready(state)
    assert start is not None, "the timing needs two steps or more"
    elapsed = time.perf_counter() - start
    print(f"[{args.current_mode}] throughput: {seen / elapsed:,.0f} examples/s")
    return state


def _accuracy(state, x, y):
    # Evaluation uses the running statistics: no axis name is involved.
    return float(accuracy(jax.device_get(state), x, y))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["pmap", "sharded-jit", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for several hosts")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--cpu-collectives", choices=["gloo", "mpi"], default=None)
    args = parser.parse_args(argv)

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.batch_size % jax.device_count():
        parser.error(
            f"--batch-size {args.batch_size} must divide over {jax.device_count()} devices"
        )
    print(
        f"{jax.device_count()} devices ({jax.devices()[0].platform}), "
        f"{jax.process_count()} process(es), global batch {args.batch_size} "
        f"({args.batch_size // jax.device_count()} per device)"
    )

    data = load_data(args.seed)
    total_steps = args.epochs * (len(data[0]) // args.batch_size)
    modes = ["pmap", "sharded-jit"] if args.mode == "both" else [args.mode]
    for mode in modes:
        args.current_mode = mode
        train = train_pmap if mode == "pmap" else train_sharded_jit
        accuracy = train(args, data, total_steps)
        print(f"[{mode}] test accuracy: {accuracy:.4f}")
    if args.coordinator:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
