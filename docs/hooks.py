"""MkDocs hooks: the bundled KaTeX, and the small-batches plot from examples/results.

markdown-katex asks a system `katex` or `npx --no-install katex` first, once per
formula (an npm start-up each, which may also try the network); the binary it
bundles is what makes the build offline and reproducible, so it is always used.
"""

from __future__ import annotations

import pathlib

from markdown_katex import wrapper
from mkdocs.structure.files import File

_BUNDLED_KATEX = [str(wrapper._get_pkg_bin_path())]
wrapper.get_bin_cmd = lambda: list(_BUNDLED_KATEX)

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = {
    f"guides/{name}.png": ROOT / "examples" / "results" / f"{name}.png"
    for name in ("small_batches", "small_batches_noisy")
}


def on_files(files, config):
    for dest, src in GENERATED.items():
        files.append(File.generated(config, dest, abs_src_path=str(src)))
    return files
