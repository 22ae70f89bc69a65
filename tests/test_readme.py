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
    """README shows the accuracy tables and captions of examples/results/small_batches.md
    and small_batches_noisy.md, the tables a run of the script printed.

    A run writes to examples/results/latest/ (ignored by git) and compares itself
    with the published tables, so running README's first command never changes
    what this test reads.
    """
    for name in ("small_batches.md", "small_batches_noisy.md"):
        results = (README.parent / "examples" / "results" / name).read_text()
        table = results[: results.index("\n\nLearned InstanceRenorm gate")]
        assert table.count("\n|") >= 5 and table.strip() in README.read_text(), name
