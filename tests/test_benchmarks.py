"""The benchmark runs (--quick); its numbers are reported, never asserted."""

import contextlib
import importlib
import io
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jaxrenorm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_quick_prints_the_full_table(monkeypatch, capsys):
    """In process (no new interpreter, no second import of JAX)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick"])
    importlib.import_module("bench").main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x (" in line]
    # 2 shapes x 5 implementations (float32 only), each with 3 timed passes and memory.
    assert len(rows) == 2 * len(importlib.import_module("bench").MODULES) == 10, out
    for row in rows:
        assert len(re.findall(r"\d+\.\d\dx \(", row)) == 4, row


def test_formulations_quick_prints_both_tables(monkeypatch, capsys):
    """In process (no new interpreter): both tables, and a plain-autodiff variant that
    differs from the shipped layer in what its backward pass keeps."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["formulations.py", "--quick"])
    formulations = importlib.import_module("formulations")
    formulations.main()
    out = capsys.readouterr().out
    forward = [line for line in out.splitlines() if re.search(r"\| \d+\.\d\dx \| \d", line)]
    backward = [line for line in out.splitlines() if line.count(" MiB") == 1]
    assert len(forward) == 6 and len(backward) == 3, out
    # The input is the one full-size value the shipped layer keeps; plain autodiff
    # keeps a full-size intermediate besides.
    shipped = _full_size_residuals(jaxrenorm.linen.BatchNorm())
    assert shipped == 1 < _full_size_residuals(formulations._SavingEverything())


def _full_size_residuals(layer) -> int:
    """How many input-sized values the layer's gradient keeps from its forward pass."""
    x = jnp.ones((8, 4, 4, 3))
    variables = layer.init(jax.random.key(0), x, use_running_average=False)

    def loss(x):
        y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y.sum()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, x)
    return printed.getvalue().count("f32[8,4,4,3]")


@pytest.mark.parametrize("mode", [[], ["--pmap"]], ids=["jit", "pmap"])
def test_compile_time_quick_prints_every_layer(monkeypatch, mode):
    """In process, first in its worker (tests/conftest.py): it empties JAX's caches.

    `--pmap` runs on the 8 CPU devices of tests/conftest.py.
    """
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    report = importlib.import_module("compile_time").main(["--quick", *mode])
    cells = (
        r"\d+\.\d\d s \| \d+\.\d\d s \| \d+\.\d\d s \| \d+\.\d\dx \| \d+\.\d\d s \(\d+\.\d\dx\) "
        r"\| \d+\.\d\dx \(\d+\.\d ms\)"
    )
    for layer in ("flax.linen.BatchNorm", "BatchNorm", "BatchRenorm", "InstanceRenorm"):
        assert re.search(
            rf"^\| (jaxrenorm )?{re.escape(layer)} \| {cells} \| [\d.]+ MiB \|$", report, flags=re.M
        ), report
    assert re.search(
        r"^\| flax\.linen\.BatchNorm \| .* \| 1\.00x \| .* \(1\.00x\) \| 1\.00x ", report, re.M
    )
