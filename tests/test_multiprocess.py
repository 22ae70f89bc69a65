"""Two processes of 4 CPU devices each, joined by jax.distributed into 8 devices.

A cross-device BatchRenorm step over all 8 devices must give the statistics of
the whole batch, computed here in one process by the float64 reference.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import reference
from tests.multiprocess_worker import problem

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ROOT = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> bool:
    import jax

    before = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # a jaxlib without gloo rejects the value
        return False
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    return True


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_match_the_whole_batch(tmp_path):
    port = str(_free_port())
    out = tmp_path / "out.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), port, str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=50)[0] for p in procs]
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)

    x, params, stats = problem()
    ref = reference.normalize(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], x, r_max=1.5, d_max=0.5
    )
    got = np.load(out)
    np.testing.assert_allclose(got["mean"], ref.new_mean, rtol=1e-5)
    np.testing.assert_allclose(got["var"], ref.new_var, rtol=1e-5)
    np.testing.assert_allclose(got["y"], ref.y[:16], rtol=2e-5, atol=2e-5)
