"""Every page of the documentation site runs as written.

The ```python blocks of each page under docs/ run in order in one namespace (a
page reads as one session). Sections included from README.md (`--8<--`) are
README's own blocks, which tests/test_readme.py runs.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import pathlib
import re

import flax
import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
# The Equinox family is an optional extra: without it, its page and API skip.
HAS_EQUINOX = importlib.util.find_spec("equinox") is not None


def test_pages_exist():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "troubleshooting.md"} <= names
    assert {"errors.md", "api/jaxrenorm.md", "api/linen.md", "api/nnx.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page):
    if "import equinox" in page.read_text() and not HAS_EQUINOX:
        pytest.skip("equinox is not installed (the `equinox` extra)")
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


# --- the API reference --------------------------------------------------------

API_MODULES = ("jaxrenorm", "jaxrenorm.linen", "jaxrenorm.nnx", "jaxrenorm.schedules")
API_MODULES += ("jaxrenorm.tools", "jaxrenorm.interop", "jaxrenorm.typing")
API_MODULES += ("jaxrenorm.equinox",) if HAS_EQUINOX else ()


def _public_objects():
    """(qualified name, object) for every public name of every public module."""
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                yield f"{module_name}.{name}", obj


def _rendered_objects():
    """The objects the `:::` directives of docs/api/ render (a module: its public names)."""
    rendered = []
    for page in sorted((DOCS / "api").glob("*.md")):
        directives = re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", page.read_text(), flags=re.M)
        for directive in directives:
            target, options = directive.group(1), directive.group(2)
            if target.startswith("jaxrenorm.equinox") and not HAS_EQUINOX:
                continue
            try:
                obj = importlib.import_module(target)
            except ImportError:
                module, _, name = target.rpartition(".")
                obj = getattr(importlib.import_module(module), name)
            if inspect.ismodule(obj):
                names = re.findall(r"^        - (\w+)$", options, flags=re.M) or obj.__all__
                rendered += [getattr(obj, name) for name in names]
            else:
                rendered.append(obj)
    return rendered


def test_every_public_name_is_on_an_api_page():
    rendered = _rendered_objects()
    missing = [name for name, obj in _public_objects() if not any(obj is r for r in rendered)]
    assert not missing, f"not rendered on any page of docs/api/: {missing}"


def _arguments(obj) -> list[str]:
    """What a reader passes: a function's parameters, a layer's fields or constructor's."""
    if isinstance(obj, type) and issubclass(obj, flax.linen.Module):
        fields = [f.name for f in dataclasses.fields(obj) if f.name not in ("parent", "name")]
        return fields
    if isinstance(obj, type) and not issubclass(obj, tuple):  # NNX, Equinox: the constructors
        ours = [c for c in obj.__mro__ if c.__module__.startswith("jaxrenorm")]
        inits = [c.__init__ for c in ours if "__init__" in vars(c)]
        return sorted({p for init in inits for p in _parameters(init)} - {"args", "kwargs"})
    if isinstance(obj, type) and issubclass(obj, tuple):  # a NamedTuple
        return list(obj._fields)
    return _parameters(obj)


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


PUBLIC = dict(_public_objects())


@pytest.mark.parametrize("name, obj", PUBLIC.items(), ids=list(PUBLIC))
def test_every_argument_is_documented_in_plain_text(name, obj):
    """Each argument has an entry in its docstring, which holds no LaTeX."""
    if not (inspect.isfunction(obj) or isinstance(obj, type)):
        return  # a constant (the paper's schedules), documented by its `#:` comment
    documented = [(obj, _arguments(obj))]
    if isinstance(obj, type) and "__call__" in dir(obj) and obj.__call__.__doc__:
        documented.append((obj.__call__, _parameters(obj.__call__)))
    for target, arguments in documented:
        doc = inspect.getdoc(target)
        missing = [a for a in arguments if not re.search(rf"^\s+(\*{{1,2}})?{a}:", doc, flags=re.M)]
        assert not missing, f"{name}: no description of {missing}"
        for latex in ("```math", "\\frac", "$`", "\\sqrt"):
            assert latex not in doc, f"{name}: LaTeX ({latex}) in a docstring"


# --- figures quoted on more than one page -------------------------------------------

ROOT = DOCS.parent
_DEFAULT_VARIANCE = r"\| shifted, one copy of k per reduction \(default\) \| "
# A figure quoted in prose is followed by `<!--figure:NAME-->` (invisible on the
# site and on GitHub); NAME's source is the results file that holds it.
FIGURE_SOURCES = {
    "small-batches-time": ("examples/results/small_batches.md", r"jax [\d.]+, (\d+ s)\n"),
    "small-batches-noisy-time": (
        "examples/results/small_batches_noisy.md",
        r"jax [\d.]+, (\d+ s)\n",
    ),
    "accumulation-time": ("examples/results/accumulation.md", r"jax [\d.]+, (\d+ s)\n"),
    "variance-cost-conv": ("docs/benchmarks.md", _DEFAULT_VARIANCE + r"([\d.\u2013]+x) \|"),
    "variance-cost-dense": (
        "docs/benchmarks.md",
        _DEFAULT_VARIANCE + r"[\d.\u2013]+x \| ([\d.\u2013]+x) \|",
    ),
}
RESULTS = sorted((ROOT / "examples" / "results").glob("*.md"))
QUOTING = [*PAGES, ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]


def _source_value(name: str) -> str:
    path, pattern = FIGURE_SOURCES[name]
    found = re.search(pattern, (ROOT / path).read_text())
    assert found, f"{path} no longer holds the figure {name!r} ({pattern})"
    return found.group(1)


@pytest.mark.parametrize("path", QUOTING, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_figures_are_what_their_sources_hold(path):
    """Every marked figure equals its source's; every accuracy "mean ± std" quoted
    is a cell of a results file; a run time of the experiments or a cost of the
    default variance quoted in prose carries a marker."""
    text = path.read_text()
    for marked in re.finditer(r"<!--figure:([\w-]+)-->", text):
        name = marked.group(1)
        assert name in FIGURE_SOURCES, f"{path.name}: unknown figure {name!r}"
        value = _source_value(name)
        assert text[: marked.start()].endswith(value), (
            f"{path.name} quotes {text[marked.start() - 20 : marked.start()]!r} "
            f"as {name}; its source holds {value!r}"
        )
    results = "\n".join(r.read_text() for r in RESULTS)
    if "results" not in path.parts:
        for quoted in re.findall(r"\d+\.\d ± \d+\.\d", text):
            assert quoted in results, f"{path.name} quotes {quoted}, which no results file holds"
    # Paragraphs, list items and table rows, each on its own.
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:- |\|))", text):
        unmarked = re.sub(r"[^\s|]+<!--figure:[\w-]+-->", "", paragraph)
        if re.search(r"small_batches\.py|accumulation\.py", unmarked):
            duration = re.search(r"\b\d+(?:[.,]\d+)?\s?(?:s|min|minutes)\b(?! of)", unmarked)
            assert not duration, f"{path.name}: an unmarked run time: {duration.group(0)!r}"
        # The cost of the default variance (compile times are another matter).
        talks_cost = all(re.search(rf"\b{w}", unmarked) for w in ("variance", "cost"))
        talks_cost = talks_cost and "compile" not in unmarked
        if talks_cost and not paragraph.lstrip().startswith("|"):
            ratio = re.search(r"\b\d\.\d+(?:[\u2013-]\d\.\d+)?x\b", unmarked)
            assert not ratio, f"{path.name}: an unmarked variance cost: {ratio.group(0)!r}"


LAYERS = {n: obj for n, obj in PUBLIC.items() if hasattr(obj, "__jaxrenorm_documents__")}
LAYERS = {n: obj for n, obj in LAYERS.items() if isinstance(obj, type)}


@pytest.mark.parametrize("name, layer", LAYERS.items(), ids=list(LAYERS))
def test_a_layer_lists_its_own_arguments_first(name, layer):
    """`Args:` holds what the layer adds over its base class; each base's arguments
    follow under `Args: Inherited from <base>:`, the nearest base first."""
    doc = inspect.getdoc(layer) + "\n"
    sections = re.findall(r"^Args:(?: Inherited from (\w+):)?\n((?:  .*\n)+)", doc, flags=re.M)
    family = [c for c in layer.__mro__ if c.__module__ == layer.__module__]
    assert [owner or layer.__name__ for owner, _ in sections] == [c.__name__ for c in family]
    own = re.findall(r"^  (\w+):", sections[0][1], flags=re.M)
    inherited = set(_arguments(family[1])) if len(family) > 1 else set()
    assert set(own) == set(_arguments(layer)) - inherited, name


def test_the_api_pages_show_each_argument_with_its_default_and_an_anchor():
    """As mkdocstrings reads `jaxrenorm.linen.BatchRenorm`: its own arguments in the
    first parameter section, each with its default (the linen fields too), and
    `parameter_headings` gives each an anchor, `#jaxrenorm.linen.BatchRenorm(r_max)`."""
    griffe = pytest.importorskip("griffe")  # the `docs` extra
    config = (DOCS.parent / "mkdocs.yml").read_text()
    assert re.search(r"^ +parameter_headings: true$", config, flags=re.M)
    extension = griffe.load_extensions(f"{DOCS / 'griffe_signatures.py'}:RuntimeSignatures")
    package = griffe.load("jaxrenorm", extensions=extension, docstring_parser="google")
    sections = package["linen.BatchRenorm"].docstring.parsed
    arguments = [s for s in sections if s.kind is griffe.DocstringSectionKind.parameters]
    assert [s.title for s in arguments] == [None, "Inherited from BatchNorm:"]
    defaults = {p.name: str(p.default) for p in arguments[0].value}
    assert list(defaults) == ["r_max", "d_max", "grad_through_batch_moments", "diagnostics"]
    assert defaults["r_max"].endswith("PAPER_R_MAX") and defaults["diagnostics"] == "False"
    assert all(p.default is not None for p in arguments[1].value)


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's `toc` gives a heading."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


@pytest.mark.parametrize("name, obj", PUBLIC.items(), ids=list(PUBLIC))
def test_links_from_docstrings_land_on_a_heading(name, obj):
    """A docstring's link to a page of the site (`../concepts.md#batch-renormalization`,
    relative to docs/api/) names an existing page and one of its headings."""
    for page, anchor in re.findall(r"\]\(\.\./([\w/.-]+\.md)(?:#([\w-]+))?\)", obj.__doc__ or ""):
        path = DOCS / page
        assert path.exists(), f"{name}: no page {page}"
        headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
        assert not anchor or anchor in map(_slug, headings), f"{name}: no #{anchor} in {page}"
