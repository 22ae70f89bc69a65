"""One process of the 2-process test in test_multiprocess.py (not a test module itself).

Usage: python multiprocess_worker.py PORT PROCESS_ID OUT.npz

Each process owns 4 CPU devices; `jax.distributed` joins them into one 8-device
system over gloo on 127.0.0.1. The processes build the same global batch from a
fixed seed, each puts its half on its own devices, and run one cross-device
BatchRenorm training step (shard_map with an axis name over all 8 devices).
Process 0 writes the new statistics and its half of the output to OUT.
"""

import functools
import os
import sys

import numpy as np

GLOBAL_SHAPE = (32, 5, 3)


def problem():
    """The global batch and variables; test_multiprocess.py builds the same ones."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=GLOBAL_SHAPE) * 2 + 3).astype(np.float32)
    x[16:] += 1.5  # the two processes see different distributions
    params = {
        "scale": rng.uniform(0.5, 1.5, 3).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float32),
    }
    stats = {
        "mean": (rng.normal(size=3) + 3).astype(np.float32),
        "var": rng.uniform(0.5, 3.0, 3).astype(np.float32),
    }
    return x, params, stats


def main(port: str, process_id: str, out: str) -> None:
    # Set up the process before jax initializes; importing this module (the test
    # does, for `problem`) must not touch the test process's jax.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxrenorm

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        initialization_timeout=40,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    x, params, stats = problem()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = x[jax.process_index() * 16 : (jax.process_index() + 1) * 16]
    xs = jax.make_array_from_process_local_data(sharding, local, GLOBAL_SHAPE)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"),), out_specs=(P("data"), P()))
    def step(x):
        return jaxrenorm.batch_renorm(
            x, params, stats, use_running_average=False, axis_name="data", r_max=1.5, d_max=0.5
        )

    y, new = step(xs)
    y_local = np.concatenate([np.asarray(s.data) for s in y.addressable_shards])
    new = {k: np.asarray(v.addressable_data(0)) for k, v in new.items()}
    if jax.process_index() == 0:
        np.savez(out, y=y_local, mean=new["mean"], var=new["var"])
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
