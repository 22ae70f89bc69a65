"""MkDocs hook: publish the small-batches plot from examples/results (its single source)."""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = {"guides/small_batches.png": ROOT / "examples" / "results" / "small_batches.png"}


def on_files(files, config):
    for dest, src in GENERATED.items():
        files.append(File.generated(config, dest, abs_src_path=str(src)))
    return files
