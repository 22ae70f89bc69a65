"""Test configuration: eight CPU devices for the multi-device tests, and the suite's speed.

XLA reads XLA_FLAGS once, when jax initializes its backends, so this runs before
any test module imports jax. The rest makes the suite cheaper without changing
what a test checks: how XLA:CPU compiles, JAX's persistent compilation cache, the
order tests are handed out in, Python's cycle collector and a worker's exit.
"""

import atexit
import gc
import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# How XLA:CPU compiles the suite's programs: with its loop emitters for fused
# computations instead of its newer MLIR fusion emitters (the default since jaxlib
# 0.5), and with LLVM optimizing at level 1 instead of 3. Most of the suite's time
# is XLA compiling small programs, each run once or twice; these settings compile
# them about a third faster (the emitters) and a fifth faster again (the level; a
# random-number program in half the time), and a small CNN trains as fast. Each
# setting is XLA's own, for the same programs: like another processor's vector
# units, it changes how float operations are ordered and rounded (the bits of a
# result), not what is computed. The tests' claims are about the library's
# numbers, which must hold under any code generator: `.ci/run` runs the
# round-off-sensitive tests once more with XLA's defaults (and AVX2 code), and a
# setting given in XLA_FLAGS keeps the value given there.
_CODEGEN = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=1")
_PROBED = "JAXRENORM_TESTS_XLA_PROBED"  # set once the controller has probed the flags


# Starts XLA:CPU, which reads XLA_FLAGS: jaxlib's CPU client alone where this
# jaxlib has it (a fifth of a second), else jax (a second and a half).
_PROBE = """
try:
    from jaxlib._jax import get_tfrt_cpu_client
    get_tfrt_cpu_client()
except Exception:
    import jax
    jax.devices()
"""


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib knows `flags` (XLA aborts on an unknown one in XLA_FLAGS)."""
    import subprocess

    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", _PROBE]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


if _PROBED not in os.environ:
    os.environ[_PROBED] = "1"  # the pytest-xdist workers inherit the outcome
    _missing = [f for f in _CODEGEN if f.split("=")[0] not in os.environ["XLA_FLAGS"]]
    if _missing and _xla_accepts(" ".join(_missing)):
        os.environ["XLA_FLAGS"] += " " + " ".join(_missing)


# The longest tests (see the `--durations` report of .ci/run) are handed out first,
# in this order, so that at the end of a parallel run no worker is left alone with
# one of them. The compile-time benchmark comes first of all: it empties JAX's
# caches, which costs nothing while they hold nothing yet.
_FIRST = (
    "test_compile_time_quick_prints_every_layer",
    "test_small_batches_quick",
    "test_bench_quick_prints_the_full_table",
    "[guides/nnx.md]",
    "[troubleshooting.md]",
    "[guides/training-loops.md]",
    "test_resumed_training_is_bit_identical",
    "test_convert_flax_model_to_batch_norm_changes_no_output_or_training_step",
    "test_linen_scan_over_blocks_equals_the_unrolled_stack",
    "test_data_parallel_runs_both_modes",
    "test_instance_renorm_module_trains_like_the_reference",
)


def pytest_configure(config):
    """JAX's persistent compilation cache in this checkout's `.pytest_cache/`.

    Many tests compile the same program (a layer on the same shapes, the same step),
    each under its own `jit`, and in both workers: the cache, keyed by the program,
    the XLA flags, the devices and the jax version, compiles each once. A later run of
    the suite in the same checkout reuses what is still valid; a fresh clone starts
    empty. Compile times are no longer the suite's (benchmarks/compile_time.py turns
    the cache off while it measures).
    """
    cache = getattr(config, "cache", None)  # None under `-p no:cacheprovider`
    if cache is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache.mkdir("jax-compilation-cache")))
    # Every program, however small or quick to compile: a test's programs are.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _rank(item) -> int:
    return next((i for i, name in enumerate(_FIRST) if name in item.nodeid), len(_FIRST))


def pytest_collection_modifyitems(items):
    items.sort(key=_rank)


def pytest_collection_finish(session):
    """Python's cycle collector, tuned for a process that traces thousands of programs.

    Tracing and lowering allocate many short-lived objects, and every full
    collection walks the whole heap: the modules and the collected tests (frozen
    here, after a last collection, so that no collection walks them again) and
    JAX's caches. Collecting the young generation every 50,000 allocations instead
    of 700, and the older ones less often, cut the collector's share of a worker's
    time from about 5% to 1.5%; what the tests keep alive is unchanged.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def pytest_unconfigure(config):
    """A pytest-xdist worker leaves without tearing down what it compiled.

    By the time a worker's interpreter exits, its reports are with the controller,
    which waits for the process to end. Tearing down JAX's backends and caches and
    then the interpreter (thousands of compiled programs) takes seconds and checks
    nothing, so the worker's last exit handler ends the process at once.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        atexit.register(_end_worker)  # registered last, so it runs before JAX's handlers


def _end_worker() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
