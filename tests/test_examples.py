"""The examples run end to end (shortened) and report what their docstrings promise."""

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example(name: str, monkeypatch):
    """examples/<name>.py imported as a module (the examples import quickstart)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module(name)


def _run_example(script: str, *args: str, monkeypatch, capsys) -> str:
    """Runs examples/<script>'s `main(args)` in this process; returns what it printed.

    In-process: no interpreter start-up and no second import of JAX, and the
    example runs on the 8 CPU devices the test session already has.
    """
    _example(script.removesuffix(".py"), monkeypatch).main(list(args))
    return capsys.readouterr().out


def test_quickstart_trains(monkeypatch, capsys):
    out = _run_example("quickstart.py", "--epochs", "3", monkeypatch=monkeypatch, capsys=capsys)
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out


def test_data_parallel_runs_both_modes(monkeypatch, capsys):
    out = _run_example("data_parallel.py", "--epochs", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert "8 devices" in out, out
    for mode in ("pmap", "sharded-jit"):
        accuracy = float(re.search(rf"\[{mode}\] test accuracy: ([0-9.]+)", out).group(1))
        assert accuracy > 0.8, out
        assert re.search(rf"\[{mode}\] throughput: [0-9,]+ examples/s", out), out


def test_small_batches_quick(tmp_path, monkeypatch, capsys):
    out = _run_example(
        "small_batches.py",
        "--quick",
        "--out-dir",
        str(tmp_path),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
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
    # The second task: its own table (one class per 4 in --quick) and plot.
    noisy = (tmp_path / "small_batches_noisy.md").read_text()
    assert noisy.strip() in out and "noisy digits test accuracy" in noisy
    for method in (*methods, "adaptive, LayerNorm in small groups"):
        assert re.search(rf"^\| {re.escape(method)} \| \d+\.\d ± \d+\.\d \|$", noisy, re.M)
    assert (tmp_path / "small_batches_noisy.png").read_bytes()[:4] == b"\x89PNG"
    # The run says how it compares with the published table, which it leaves alone.
    assert "Not compared with the published table" in out and "this run 150" in out


def test_accumulation_quick(tmp_path, monkeypatch, capsys):
    out = _run_example(
        "accumulation.py",
        "--quick",
        "--out-dir",
        str(tmp_path),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    table = (tmp_path / "accumulation.md").read_text()
    assert table.strip() in out
    assert table.startswith("| method | 8 x 4, as is | 8 x 4, helpers |")
    row = re.search(r"^\| BatchRenorm \| (.*) \|$", table, flags=re.M)
    cells = row.group(1).split(" | ")
    assert len(cells) == 2 and all(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in cells), row
    assert "30 optimizer steps of 32 examples" in table


def test_small_batches_compares_a_run_with_the_published_table(monkeypatch):
    small_batches = _example("small_batches", monkeypatch)
    published = small_batches.PUBLISHED.read_text()
    cells, _, steps = small_batches.parse_report(published)
    assert len(cells) == len(small_batches.methods(steps)) * len(small_batches.SETTINGS)
    n = len(cells)
    assert f"{n} of {n} cells agree" in small_batches.compare(published, published)
    # One cell moved by far more than its seeds' spread: named, with both values.
    method, setting = "BatchNorm", "i.i.d. 32"
    mean, std = cells[(method, setting)]
    moved = published.replace(f"| {method} | {mean:.1f} ± {std:.1f}", f"| {method} | 50.0 ± 0.1")
    said = small_batches.compare(moved, published)
    assert f"{n - 1} of {n} cells agree" in said
    assert f"{method} / {setting}: {mean:.1f} ± {std:.1f} published, 50.0 ± 0.1 here" in said


def test_small_group_fallback_chooses_by_values_per_group(monkeypatch):
    """Batch statistics where a group holds at least MIN_GROUP_VALUES values per
    feature, LayerNorm where fewer; the noisy task has digits' shapes and split."""
    import jax
    import numpy as np

    small_batches = _example("small_batches", monkeypatch)
    assert small_batches.MIN_GROUP_VALUES == 16
    for v, shape, batch_statistics in [
        (4, (8, 64), False),  # 4 values per feature
        (16, (32, 64), True),  # 16
        (2, (8, 4, 4, 32), True),  # 2 x 4 x 4 = 32
        (32, (2, 3), False),  # a call of 2 examples: 2 values
    ]:
        norm = small_batches.methods(10)["adaptive, LayerNorm in small groups"](v)(True, None)
        variables = jax.eval_shape(norm.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, "f4"))
        assert ("batch_stats" in variables) == batch_statistics, (v, shape, variables)
        assert ("LayerNorm_0" in variables["params"]) != batch_statistics, (v, shape)
    digits, noisy = small_batches.load_data(0), small_batches.noisy_digits(0)
    assert [a.shape for a in noisy] == [a.shape for a in digits]
    np.testing.assert_array_equal(noisy[2], digits[2])  # the same labels, the same split
    np.testing.assert_array_equal(noisy[0], small_batches.noisy_digits(0)[0])  # fixed seed


def test_quickstart_nnx_trains(monkeypatch, capsys):
    out = _run_example("quickstart_nnx.py", "--epochs", "3", monkeypatch=monkeypatch, capsys=capsys)
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 0.9, out


def test_custom_loop_trains_in_process(monkeypatch, capsys):
    """The pure-function loop, imported and run in this process (no interpreter start-up)."""
    custom_loop = _example("custom_loop", monkeypatch)
    accuracy = custom_loop.main(["--steps", "300"])
    assert accuracy > 0.95  # 0.98-0.99 over seeds 0-3
    assert f"test accuracy: {accuracy:.4f}" in capsys.readouterr().out


def test_small_batches_conv_is_flax_conv(monkeypatch):
    """The experiment's Conv3x3 computes nn.Conv(features, (3, 3), use_bias=False)."""
    import flax.linen as nn
    import jax
    import numpy as np

    small_batches = _example("small_batches", monkeypatch)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    variables = nn.Conv(7, (3, 3), use_bias=False).init(jax.random.key(1), x)
    np.testing.assert_allclose(
        small_batches.Conv3x3(7).apply(variables, x),
        nn.Conv(7, (3, 3), use_bias=False).apply(variables, x),
        rtol=1e-5,
        atol=1e-5,
    )
    ours = small_batches.Conv3x3(7).init(jax.random.key(1), x)
    assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, variables)
