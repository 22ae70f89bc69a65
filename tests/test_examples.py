"""The examples run end to end (shortened) and report what their docstrings promise."""

import importlib
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_example(script: str, *args: str) -> str:
    """Runs examples/<script> with `args` and returns its standard output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout


def test_quickstart_trains():
    out = _run_example("quickstart.py", "--epochs", "3")
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out


def test_data_parallel_runs_both_modes():
    out = _run_example("data_parallel.py", "--epochs", "1")
    assert "8 devices" in out, out
    for mode in ("pmap", "sharded-jit"):
        accuracy = float(re.search(rf"\[{mode}\] test accuracy: ([0-9.]+)", out).group(1))
        assert accuracy > 0.8, out
        assert re.search(rf"\[{mode}\] throughput: [0-9,]+ examples/s", out), out


def test_small_batches_quick(tmp_path):
    out = _run_example("small_batches.py", "--quick", "--out-dir", str(tmp_path))
    report = (tmp_path / "small_batches.md").read_text()
    assert report.strip() in out
    methods = (
        "BatchNorm",
        "BatchRenorm",
        "BatchRenorm, no grad through moments",
        "InstanceRenorm",
        "GroupNorm",
    )
    for method in methods:
        row = re.search(rf"^\| {re.escape(method)} \| (.*) \|$", report, flags=re.M)
        cells = row.group(1).split(" | ")
        assert len(cells) == 2 and all(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in cells), row
    assert "r clipped" in report
    # The learned gate, mean [min, max], inside [0, 1], per setting.
    gates = re.findall(r"(\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\]", report)
    assert len(gates) == 2 and all(
        0 <= float(lo) <= float(m) <= float(hi) <= 1 for m, lo, hi in gates
    )
    png = (tmp_path / "small_batches.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_quickstart_nnx_trains():
    out = _run_example("quickstart_nnx.py", "--epochs", "3")
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out


def test_custom_loop_trains_in_process(monkeypatch, capsys):
    """The pure-function loop, imported and run in this process (no interpreter start-up)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # it imports quickstart's data
    custom_loop = importlib.import_module("custom_loop")
    accuracy = custom_loop.main(["--steps", "300"])
    assert accuracy > 0.95  # 0.98-0.99 over seeds 0-3
    assert f"test accuracy: {accuracy:.4f}" in capsys.readouterr().out
