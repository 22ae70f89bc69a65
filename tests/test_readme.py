"""README's code blocks run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    if "import equinox" in BLOCKS[index]:
        pytest.importorskip("equinox")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})


def test_readme_shows_the_published_table_of_the_main_example():
    """README shows examples/results/small_batches.md, the table a run of the script printed.

    A run writes to examples/results/latest/ (ignored by git) and compares itself
    with the published table, so running README's first command never changes
    what this test reads.
    """
    results = README.parent / "examples" / "results" / "small_batches.md"
    assert results.read_text().strip() in README.read_text()
