"""Type-check the package and the code its documentation shows, as a user's pyright would.

pyright (pinned in pyproject.toml's `typecheck` extra, settings in its [tool.pyright])
checks `jaxrenorm/`, `examples/`, and the documented snippets, written here to
build/doc-snippets/: each ```python block of README.md as a file of its own (README's
blocks run one by one), and the blocks of each page under docs/ joined into one
file per page (a page runs as one session, tests/test_docs.py).

Every error fails, except those listed in .ci/typecheck-known.txt: errors in the
types of other libraries (scikit-learn, Flax) that a correct call meets, each with
its reason. A listed error that no longer occurs fails too, so the list stays true.

    python .ci/typecheck.py [ROOT]
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)


def write_snippets(root: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    files = []
    for i, block in enumerate(BLOCK.findall((root / "README.md").read_text())):
        files.append(out / f"readme_block_{i}.py")
        files[-1].write_text(block)
    for page in sorted((root / "docs").rglob("*.md")):
        blocks = BLOCK.findall(page.read_text())
        if blocks:
            name = page.relative_to(root / "docs").with_suffix("").as_posix()
            files.append(out / f"docs_{re.sub(r'[^A-Za-z0-9]', '_', name)}.py")
            files[-1].write_text("\n".join(blocks))
    return files


def known_errors(root: pathlib.Path) -> set[tuple[str, str]]:
    """(file, first line of the message) pairs from .ci/typecheck-known.txt."""
    known = set()
    for line in (root / ".ci" / "typecheck-known.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            file, message = line.split(" | ", 1)
            known.add((file.strip(), message.strip()))
    return known


def main(root: pathlib.Path) -> int:
    snippets = write_snippets(root, root / "build" / "doc-snippets")
    print(f"pyright on jaxrenorm/, examples/ and {len(snippets)} files of documented snippets")
    run = subprocess.run(
        ["pyright", "--outputjson", "--project", str(root)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    report = json.loads(run.stdout)
    print(f"pyright {report['version']}: {report['summary']['filesAnalyzed']} files analyzed")
    known, seen, failures = known_errors(root), set(), []
    for d in report["generalDiagnostics"]:
        if d["severity"] != "error":
            continue
        file = pathlib.Path(d["file"]).relative_to(root).as_posix()
        message = d["message"].splitlines()[0]
        where = f"{file}:{d['range']['start']['line'] + 1}"
        if (file, message) in known:
            seen.add((file, message))
        else:
            failures.append(f"{where}: {d['message']} ({d.get('rule', '')})")
    in_package = sum(f.startswith("jaxrenorm/") for f in failures)
    print(f"errors: {in_package} in jaxrenorm/, {len(failures) - in_package} in documented code")
    print(f"{len(seen)} known errors of other libraries' types (.ci/typecheck-known.txt)")
    failures += [f"listed but no longer reported: {f} | {m}" for f, m in sorted(known - seen)]
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
