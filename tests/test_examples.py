"""The examples run end to end (shortened) and report what their docstrings promise."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_trains():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out


def test_data_parallel_runs_both_modes():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "data_parallel.py"), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "8 devices" in out, out
    for mode in ("pmap", "sharded-jit"):
        accuracy = float(re.search(rf"\[{mode}\] test accuracy: ([0-9.]+)", out).group(1))
        assert accuracy > 0.85, out
        assert re.search(rf"\[{mode}\] throughput: [0-9,]+ examples/s", out), out
