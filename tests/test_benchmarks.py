"""The benchmark runs (--quick); its numbers are reported, never asserted."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_quick_prints_the_full_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x (" in line]
    # 2 shapes x 2 dtypes x 3 implementations, each with 3 timed passes and memory.
    assert len(rows) == 12, out
    for row in rows:
        assert len(re.findall(r"\d+\.\d\dx \(", row)) == 4, row
