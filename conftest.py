"""Collection of the package's doctests: a module of an optional dependency that is
not installed (Equinox) is left out, as its tests under tests/ skip."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("equinox") is None:
    collect_ignore.append("jaxrenorm/equinox.py")
