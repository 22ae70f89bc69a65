"""Bad input raises a clear ValueError / TypeError at trace time, naming the argument."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxrenorm
from jaxrenorm import interop, schedules

X = jnp.ones((8, 4))
STATS = jaxrenorm.init_batch_stats(4)
FUNCTIONS = [jaxrenorm.batch_norm, jaxrenorm.batch_renorm]


def _call(fn, x=X, params=None, stats=STATS, **kw):
    kw.setdefault("use_running_average", False)
    return fn(x, params, stats, **kw)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            dict(params={"scale": jnp.ones(3)}),
            ValueError,
            r'params\["scale"\].*\(3,\).*\(8, 4\).*\(4,\)',
        ),
        (dict(params={"bias": jnp.ones((4, 1))}), ValueError, r'params\["bias"\].*\(4, 1\)'),
        (dict(params={"gamma": jnp.ones(4)}), ValueError, r"params.*gamma"),
        (dict(params=[jnp.ones(4)]), TypeError, r"params.*mapping"),
        (
            dict(stats={"mean": jnp.zeros(5), "var": jnp.ones(4)}),
            ValueError,
            r'batch_stats\["mean"\].*\(5,\)',
        ),
        (
            dict(stats={"mean": jnp.zeros(4), "var": jnp.ones(2)}),
            ValueError,
            r'batch_stats\["var"\].*\(2,\)',
        ),
        (dict(stats={"mean": jnp.zeros(4)}), ValueError, r"batch_stats.*'var'"),
        (dict(axis=2), ValueError, r"`axis`=2 is out of range.*rank 2"),
        (dict(axis=(0, 1)), ValueError, r"axis.*every axis"),
        (dict(axis=(1, -1)), ValueError, r"axis.*same axis twice"),
        (dict(axis=1.0), TypeError, r"axis"),
        (dict(x=jnp.ones((8, 4), jnp.int32)), TypeError, r"`x`.*floating.*int32.*\(8, 4\)"),
        (dict(x=jnp.ones((8, 4), bool)), TypeError, r"`x`.*floating"),
        (dict(mask=jnp.ones((3, 4), bool)), ValueError, r"`mask`.*\(3, 4\).*\(8, 4\)"),
        (dict(mask=jnp.ones((2, 8, 4), bool)), ValueError, r"`mask`.*\(2, 8, 4\)"),
        (dict(momentum=1.5), ValueError, r"`momentum`.*\[0.0, 1.0\].*1.5"),
        (dict(epsilon=-1e-5), ValueError, r"`epsilon`.*>= 0"),
        (dict(dtype=jnp.int32), TypeError, r"`dtype`"),
    ],
)
def test_bad_input(fn, kwargs, error, pattern):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=pattern):
        _call(fn, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(r_max=0.5), r"`r_max` must be >= 1.0, got 0.5"),
        (dict(d_max=-1.0), r"`d_max` must be >= 0.0, got -1.0"),
        (dict(r_max=jnp.ones(2)), r"`r_max` must be a scalar"),
    ],
)
def test_bad_renorm_bounds(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(jaxrenorm.batch_renorm, **kwargs)


def test_errors_are_raised_at_trace_time_under_jit():
    @jax.jit
    def f(x):
        return jaxrenorm.batch_norm(x, {"scale": jnp.ones(3)}, STATS, use_running_average=False)

    with pytest.raises(ValueError, match="scale"):
        jax.eval_shape(f, X)


def test_traced_bounds_are_not_checked_and_work():
    @jax.jit
    def f(r_max):
        return _call(jaxrenorm.batch_renorm, r_max=r_max)[0]

    assert f(2.0).shape == X.shape


def test_complex_renorm_is_refused():
    with pytest.raises(TypeError, match="complex"):
        _call(jaxrenorm.batch_renorm, x=X.astype(jnp.complex64))


def test_moments_errors():
    with pytest.raises(ValueError, match="`axes`=3 is out of range"):
        jaxrenorm.moments(X, 3)
    with pytest.raises(TypeError, match="floating"):
        jaxrenorm.moments(jnp.ones(4, jnp.int32), 0)
    with pytest.raises(ValueError, match="mask"):
        jaxrenorm.moments(X, 0, mask=jnp.ones(3, bool))


def test_init_batch_stats_errors():
    with pytest.raises(ValueError, match="feature_shape"):
        jaxrenorm.init_batch_stats(-1)
    with pytest.raises(TypeError, match="dtype"):
        jaxrenorm.init_batch_stats(3, jnp.int32)


def test_module_errors_name_the_argument():
    bn = jaxrenorm.linen.BatchNorm(use_running_average=False, axis=3)
    with pytest.raises(ValueError, match="`axis`=3 is out of range"):
        bn.init(jax.random.key(0), X)
    bn = jaxrenorm.linen.BatchRenorm(use_running_average=False, r_max=0.9)
    with pytest.raises(ValueError, match="r_max"):
        bn.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="floating"):
        jaxrenorm.linen.BatchNorm(use_running_average=False).init(
            jax.random.key(0), jnp.ones((4, 2), jnp.int32)
        )


# ---------------------------------------------------------------------------
# docs/errors.md: one table row per error, each triggered here through the public API.
#
# Three checks keep the table, these triggers and the library's source in step:
#   1. `test_error_table_row` is parametrized by the table's ids: each row's trigger must
#      raise the row's exception with the row's message fragment in its message.
#   2. `test_error_table_ids_match_triggers`: the table's ids are exactly TRIGGERS' keys,
#      so a row without a trigger, or a trigger without a row, fails.
#   3. `test_every_raise_in_the_library_has_a_row`: each trigger's traceback names the
#      library line that raised (its innermost frame in jaxrenorm/); every `raise`
#      statement found by parsing jaxrenorm/*.py must be that line for at least one row.
#      Matching by traceback rather than by text is exact even where a message is an
#      f-string (the printed text is not in the source) or two sites share a message,
#      and it survives edits that move lines. A new `raise` fails this test until it
#      gets a row here and in the docs.
# ---------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
PACKAGE = Path(jaxrenorm.__file__).resolve().parent
X4 = jnp.ones((2, 3, 3, 4))  # (N, H, W, C) for InstanceRenorm


def _code(cell: str) -> str:
    """The text of a Markdown code span (`a` or `` a `b` ``), as CommonMark reads it."""
    m = re.fullmatch(r"(`+)(.+)\1", cell)
    assert m, f"expected a code span, got {cell!r}"
    text = m[2]
    if len(text) > 2 and text.startswith(" ") and text.endswith(" "):
        text = text[1:-1]
    return text


def _table() -> dict[str, tuple[str, str]]:
    """{id: (exception name, message fragment)} from the table of docs/errors.md."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| id |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == ["id", "exception", "message (start)", "triggered by", "fix"]
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"a cell holds a '|' or one is missing: {line}"
        row_id = _code(cells[0])
        assert row_id not in rows, f"duplicate id {row_id}"
        rows[row_id] = (_code(cells[1]), _code(cells[2]))
    return rows


ROWS = _table()


def _bn(**kw):
    return lambda: _call(jaxrenorm.batch_norm, **kw)


def _brn(**kw):
    return lambda: _call(jaxrenorm.batch_renorm, **kw)


def _renorm_with_steps_linen(steps):
    layer = jaxrenorm.linen.BatchRenorm(use_running_average=False)
    variables = layer.init(_KEY, X)
    variables["batch_stats"]["steps"] = steps
    return layer.apply(variables, X, mutable=["batch_stats"])


def _renorm_with_steps_nnx(steps):
    layer = jaxrenorm.nnx.BatchRenorm(X.shape[-1], rngs=nnx.Rngs(0))
    layer.steps = nnx.BatchStat(steps)
    return layer(X)


HAS_EQUINOX = importlib.util.find_spec("equinox") is not None


def _equinox_mode_legacy():
    if not HAS_EQUINOX:
        pytest.skip("equinox is not installed (the `equinox` extra)")
    return jaxrenorm.equinox.BatchNorm(3, "batch", mode="legacy")  # Equinox's deprecated default


def _exhausted_recalibrate():
    batches = iter([X])
    list(batches)  # e.g. a generator already used up by a previous epoch
    model = jaxrenorm.linen.BatchNorm()
    jaxrenorm.recalibrate(model, {"batch_stats": {}}, batches, use_running_average=False)


def _virtual_groups_over_shards():
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    x = jax.device_put(jnp.ones((6, 4)), NamedSharding(mesh, P("data")))
    f = jax.jit(lambda x: _call(jaxrenorm.batch_norm, x=x, virtual_batch_size=2))
    f(x)  # 6 / 2 = 3 groups over 2 shards; raises while tracing, nothing compiles


def _virtual_groups_of_a_symbolic_batch():
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 4"), jnp.float32)
    f = jax.jit(lambda x: _call(jaxrenorm.batch_norm, x=x, virtual_batch_size=2))
    export.export(f)(spec)  # "b" may be odd: the batch must be written "2*k"


def _axis_name_layer_linen(name):
    layer = jaxrenorm.linen.BatchNorm(use_running_average=False, axis_name=name)
    variables = layer.init(_KEY, X)  # initializing needs no bound axis, as in Flax
    return layer.apply(variables, X, mutable=["batch_stats"])  # outside pmap/vmap


def _torch_sd(n_weight=4, n_stats=4, **extra):
    sd = {
        "weight": np.ones(n_weight),
        "bias": np.zeros(n_weight),
        "running_mean": np.zeros(n_stats),
        "running_var": np.ones(n_stats),
    }
    return sd | extra


_KEY = jax.random.key(0)
_AFFINE = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}


# Each row's ways of raising it, through the public API.
def _frozen_statistics(path):
    """Entering `frozen_statistics(path)`, where its checks run."""

    def enter():
        with jaxrenorm.linen.frozen_statistics(path):
            pass

    return enter


TRIGGERS = {
    "not-floating-array": [
        _bn(x=jnp.zeros((8, 4), jnp.uint8)),
        _bn(params={"scale": jnp.array([1, 1, 1, 1])}),
    ],
    "x-scalar": [_bn(x=jnp.float32(1.0))],
    "axis-not-int": [lambda: jaxrenorm.linen.BatchNorm(False, axis=None).init(_KEY, X)],
    "axis-entry-not-int": [_bn(axis=(-1.0,))],
    "axis-empty": [_bn(axis=())],
    "axis-out-of-range": [_bn(axis=3)],
    "axis-repeated": [_bn(axis=(1, -1))],
    "no-reduction-axis": [_bn(axis=(0, 1))],
    "feature-shape-mismatch": [
        lambda: jaxrenorm.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(X),
        lambda: jaxrenorm.fold_batch_norm(jnp.ones((4, 3)), None, None, STATS),
    ],
    "params-not-mapping": [_bn(params=(jnp.ones(4), jnp.zeros(4)))],
    "params-unknown-key": [
        _bn(params={"gamma": jnp.ones(4), "beta": jnp.zeros(4)}),
        lambda: jaxrenorm.fold_batch_norm(
            jnp.ones((4, 3)), None, {"gamma": jnp.ones(3)}, jaxrenorm.init_batch_stats(3)
        ),
    ],
    "rho-missing": [
        lambda: jaxrenorm.instance_renorm(X4, _AFFINE, STATS, use_running_average=False)
    ],
    "batch-stats-missing": [
        _bn(stats={"batch_stats": STATS}),
        lambda: jaxrenorm.fold_batch_norm(jnp.ones((4, 3)), None, None, {"mean": jnp.zeros(3)}),
    ],
    "batch-stats-variables-missing": [
        lambda: jaxrenorm.linen.BatchNorm(True).apply({"params": _AFFINE}, X)
    ],
    "linen-use-running-average-missing": [lambda: jaxrenorm.linen.BatchNorm().init(_KEY, X)],
    "nnx-use-running-average-missing": [
        lambda: jaxrenorm.nnx.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))(X)
    ],
    "mask-shape": [_bn(mask=jnp.ones(8, bool))],
    "shift-shape": [lambda: jaxrenorm.moments(X, 0, shift=jnp.ones(8))],
    "momentum-out-of-range": [
        _bn(momentum=99),
        lambda: interop.momentum_from_torch(10),
        lambda: interop.momentum_to_torch(-0.1),
        lambda: jaxrenorm.micro_batch_momentum(1.5, 2),
    ],
    "epsilon-negative": [_bn(epsilon=-1e-5)],
    "r-max-below-one": [
        lambda: jaxrenorm.linen.BatchRenorm(False, r_max=0.5).init(_KEY, X),
        lambda: schedules.scaled_paper_schedules(1000, r_max=0.5),
    ],
    "d-max-negative": [
        _brn(d_max=-1.0),
        lambda: schedules.scaled_paper_schedules(1000, d_max=-1.0),
    ],
    "bound-not-scalar": [_brn(r_max=jnp.full(4, 3.0))],
    "moment-gradient-value": [
        _brn(grad_through_batch_moments="sometimes"),
        lambda: jaxrenorm.linen.BatchRenorm(False, grad_through_batch_moments=0.5).init(_KEY, X),
    ],
    "dtype-not-floating": [
        _bn(dtype=jnp.int8),
        lambda: jaxrenorm.init_batch_stats(4, jnp.int32),
    ],
    "renorm-complex": [
        _brn(x=X.astype(jnp.complex64)),
        lambda: jaxrenorm.linen.BatchRenorm(False).init(_KEY, X.astype(jnp.complex64)),
    ],
    "instance-layout": [lambda: jaxrenorm.nnx.InstanceRenorm(4, rngs=nnx.Rngs(0))(X)],
    "not-a-positive-int": [
        _bn(virtual_batch_size=0),
        lambda: schedules.scaled_paper_schedules(1e5),
        lambda: jaxrenorm.micro_batch_momentum(0.9, 0),
        lambda: schedules.in_optimizer_steps(schedules.PAPER_R_MAX, 2.0),
        lambda: jaxrenorm.device_groups(8, 0),
    ],
    "virtual-batch-axis0-feature": [
        _bn(axis=0, stats=jaxrenorm.init_batch_stats(8), virtual_batch_size=2)
    ],
    "virtual-batch-size-indivisible": [_bn(virtual_batch_size=3)],
    "one-value-per-feature": [
        _bn(x=jnp.ones((1, 4))),
        _bn(virtual_batch_size=1),
        lambda: jaxrenorm.nnx.BatchNorm(4, rngs=nnx.Rngs(0))(jnp.ones((1, 4))),
    ],
    "virtual-batch-shards": [_virtual_groups_over_shards],
    "virtual-batch-symbolic": [_virtual_groups_of_a_symbolic_batch],
    "axis-unbound": [
        _bn(axis_name="batch"),
        lambda: _axis_name_layer_linen("batch"),
        lambda: jaxrenorm.nnx.BatchRenorm(4, axis_name=("batch",), rngs=nnx.Rngs(0))(X),
    ],
    "feature-shape-invalid": [lambda: jaxrenorm.init_batch_stats((3, None))],
    "torch-momentum-none": [lambda: interop.momentum_from_torch(None)],
    "state-dict-no-running-stats": [
        lambda: interop.from_torch_batch_norm(
            {f"bn1.{k}": v for k, v in _torch_sd().items()}, prefix="bn1"
        )
    ],
    "state-dict-not-1d": [
        lambda: interop.from_torch_batch_norm(_torch_sd(running_mean=np.zeros((1, 4))))
    ],
    "state-dict-shape-mismatch": [lambda: interop.from_torch_batch_norm(_torch_sd(n_weight=3))],
    "schedule-begin-end": [lambda: schedules.d_max_schedule(begin=10, end=5)],
    "schedule-not-callable": [lambda: schedules.in_optimizer_steps(3.0, 4)],
    "device-groups-indivisible": [lambda: jaxrenorm.device_groups(8, 3)],
    "frozen-path-not-string": [_frozen_statistics(("backbone", "norm"))],
    "frozen-path-not-regex": [_frozen_statistics("blocks_[0-2")],
    "schedule-final": [
        lambda: schedules.r_max_schedule(final=0.5),
        lambda: schedules.d_max_schedule(final=-1.0),
    ],
    "convert-target": [
        lambda: jaxrenorm.nnx.convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), to=nnx.LayerNorm)
    ],
    "convert-override": [
        lambda: jaxrenorm.nnx.convert(nnx.BatchNorm(2, rngs=nnx.Rngs(0)), r_maxx=3.0)
    ],
    "sbx-unknown-argument": [lambda: jaxrenorm.interop.sbx_batch_renorm(warmup=3)],
    "steps-not-real-scalar": [
        lambda: _renorm_with_steps_linen(jnp.zeros((8,), jnp.int32)),
        lambda: _renorm_with_steps_nnx(jnp.array(True)),
    ],
    "convert-variables-unmapped": [
        lambda: jaxrenorm.linen.convert_variables(
            {"params": {"Dense_0": {}}}, {"params": {"Dense_1": {}}}
        )
    ],
    "recalibrate-no-layer": [
        _exhausted_recalibrate,
        lambda: jaxrenorm.nnx.recalibrate(nnx.BatchNorm(4, rngs=nnx.Rngs(0)), [X]),
    ],
    "equinox-mode": [_equinox_mode_legacy],
    "batch-dependence-too-few": [lambda: jaxrenorm.batch_dependence(lambda x: x, X[:3], key=_KEY)],
    "batch-dependence-batch-size": [
        lambda: jaxrenorm.batch_dependence(lambda x: jnp.mean(x**2), X, key=_KEY)
    ],
}
CASES = [(row_id, i) for row_id, ways in sorted(TRIGGERS.items()) for i in range(len(ways))]


@functools.cache
def _raised(row_id: str, i: int) -> tuple[str, str, tuple[str, int] | None]:
    """(exception name, message, (file, line) of the innermost library frame) of a trigger."""
    try:
        TRIGGERS[row_id][i]()
    except Exception as e:  # the row's test compares the type
        frames = [
            (path.name, f.lineno)
            for f in traceback.extract_tb(e.__traceback__)
            if (path := Path(f.filename).resolve()).parent == PACKAGE
        ]
        return type(e).__name__, str(e), frames[-1] if frames else None
    pytest.fail(f"{row_id}: the trigger raised nothing")


@pytest.mark.parametrize(("row_id", "i"), CASES)
def test_error_table_row(row_id, i):
    exception, fragment = ROWS[row_id]
    name, message, site = _raised(row_id, i)
    assert name == exception, f"{row_id}: {name}: {message}"
    assert fragment in message, f"{row_id}: {fragment!r} not in {message!r}"
    assert site is not None, f"{row_id}: raised outside jaxrenorm's call stack"


def test_error_table_ids_match_triggers():
    assert set(ROWS) == set(TRIGGERS), (
        f"rows without a trigger: {sorted(set(ROWS) - set(TRIGGERS))}; "
        f"triggers without a row: {sorted(set(TRIGGERS) - set(ROWS))}"
    )
    for row_id, (exception, fragment) in ROWS.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", row_id), row_id
        # NameError: an unbound axis name, as JAX's own error for it.
        assert exception in ("ValueError", "TypeError", "NameError"), (row_id, exception)
        assert fragment.strip(), row_id


def _raise_statements() -> list[tuple[str, int, int, str]]:
    """(file, first line, last line, source) of every `raise` in jaxrenorm/*.py.

    Not those of a module's `__getattr__`, whose AttributeError is Python's protocol
    for a missing attribute rather than a check of an argument.
    """
    out = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        protocol = {
            id(node)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for node in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and id(node) not in protocol:
                text = ast.get_source_segment(source, node)
                out.append((path.name, node.lineno, node.end_lineno, text))
    return sorted(out)


def test_every_raise_in_the_library_has_a_row():
    statements = _raise_statements()
    assert len(statements) >= 30  # the scan works (33 when the table was last changed)
    for file, line, _, text in statements:
        # The documented contract: ValueError or TypeError (NameError for an unbound
        # axis, as JAX's), constructed with a message.
        assert re.match(r"raise (ValueError|TypeError|NameError)\(", text), f"{file}:{line}: {text}"
    if not HAS_EQUINOX:  # the check of the Equinox layers' `mode` is only reached with it
        statements = [s for s in statements if "`mode` must be" not in s[3]]
        cases = [(row_id, i) for row_id, i in CASES if row_id != "equinox-mode"]
    else:
        cases = CASES
    reached = {_raised(row_id, i)[2] for row_id, i in cases}
    missing = [
        f"{file}:{first}: {text.splitlines()[0]}"
        for file, first, last, text in statements
        if not any(site == (file, n) for n in range(first, last + 1) for site in reached)
    ]
    assert not missing, "raise sites without a row in docs/errors.md:\n" + "\n".join(missing)


def test_every_check_is_in_the_checks_module():
    """One validation path: the library raises only from jaxrenorm/_checks.py."""
    outside = [f"{f}:{line}" for f, line, _, _ in _raise_statements() if f != "_checks.py"]
    assert not outside, f"raise statements outside _checks.py: {outside}"
