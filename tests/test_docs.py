"""Every page of the documentation site runs as written.

The ```python blocks of each page under docs/ run in order in one namespace (a
page reads as one session). Sections included from README.md (`--8<--`) are
README's own blocks, which tests/test_readme.py runs.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)


def test_pages_exist():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "api.md", "errors.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page):
    namespace: dict = {}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.name} block {i}", "exec"), namespace)


def test_math_is_written_for_the_build_time_renderer():
    """Display math in ```math fences (rendered to MathML by markdown-katex)."""
    assert "```math" in (DOCS / "concepts.md").read_text()
    for page in PAGES:
        assert "\\(" not in page.read_text(), page  # MathJax-style delimiters would not render


def test_snippet_sections_exist_in_readme():
    """Every `--8<-- "README.md:name"` has its start and end markers in README."""
    readme = (DOCS.parent / "README.md").read_text()
    for page in PAGES:
        for name in re.findall(r'--8<-- "README\.md:([\w-]+)"', page.read_text()):
            assert f"[start:{name}]" in readme and f"[end:{name}]" in readme, (page, name)
