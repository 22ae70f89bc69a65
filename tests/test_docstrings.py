"""The argument sections written into the source are those of the one table of descriptions."""

import importlib.util
import inspect

import pytest

import jaxrenorm
from jaxrenorm import _docs

DOCUMENTED = _docs.documented_objects()
WRITE = 'python -c "import jaxrenorm._docs as d; d.write_sections()"'


def test_every_public_function_and_layer_is_documented_from_the_table():
    names = {f"{obj.__module__}.{obj.__qualname__}" for obj in DOCUMENTED}
    families = ("linen", "nnx") + (("equinox",) if importlib.util.find_spec("equinox") else ())
    expected = {
        f"jaxrenorm.{family}.{layer}"
        for family in families
        for layer in ("BatchNorm", "BatchRenorm", "InstanceRenorm")
    }
    expected |= {f"jaxrenorm._norm.{fn}" for fn in ("batch_norm", "batch_renorm")}
    expected.add("jaxrenorm._norm.instance_renorm")
    assert names == expected


@pytest.mark.parametrize("obj", DOCUMENTED, ids=lambda o: f"{o.__module__}.{o.__qualname__}")
def test_the_source_shows_the_argument_section(obj):
    """What a reader of the source sees is what `help()` shows: one text, no drift."""
    assert inspect.cleandoc(obj.__doc__) == _docs.documented_docstring(obj), (
        f"{obj.__qualname__}: its argument section is out of date; run {WRITE}"
    )


def test_rewriting_an_outdated_section_restores_it(tmp_path, monkeypatch):
    """`write_sections` puts a changed description into a copy of the source."""
    source = inspect.getsourcefile(jaxrenorm.batch_norm)
    copy = tmp_path / "copy.py"
    copy.write_text(open(source).read())
    monkeypatch.setattr(_docs, "documented_objects", lambda: [jaxrenorm.batch_norm])
    monkeypatch.setattr(inspect, "getsourcefile", lambda obj: str(copy))
    described = _docs.ARGUMENTS["epsilon"]
    monkeypatch.setitem(_docs.ARGUMENTS, "epsilon", described + " Changed.")
    assert _docs.write_sections() == ["batch_norm"]
    assert "Changed." in copy.read_text() and "Changed." not in open(source).read()
    before, after = open(source).read().splitlines(), copy.read_text().splitlines()
    changed = [line for line in after if line not in before]
    assert changed and all("epsilon" in line or "Changed." in line for line in changed), changed
