"""`jax.export` with a symbolic batch size: training and inference, every family.

An exported function is lowered once for every batch size `b`; it is then called
at two sizes and compared with the function itself, and with the float64
reference for the training call of the pure function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import jaxrenorm
from tests import reference

SIZES = (4, 6)  # two batch sizes the exported functions are called at
FEATURES = 3


def _batch(b: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed + b)
    return jnp.asarray(rng.normal(size=(b, 2, FEATURES)) * 2 + 5, jnp.float32)


def _exported(f, dims: str, *more, mask: bool = False) -> export.Exported:
    """`f` exported for inputs (batch, 2, FEATURES) with the batch size `dims`, then
    a per-example mask of the same size if `mask`, then the concrete `more`."""
    shape = export.symbolic_shape(f"{dims}, 2, {FEATURES}")
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32)]
    if mask:
        specs.append(jax.ShapeDtypeStruct((shape[0], 1, 1), jnp.bool_))
    specs += [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), m) for m in more]
    return export.export(jax.jit(f))(*specs)


def _same(exported, f, *args) -> None:
    """The exported function's results are the function's (the same program, up to
    XLA's choices for a shape it did not know: round-off)."""
    ours, direct = exported.call(*args), jax.jit(f)(*args)
    assert jax.tree.structure(ours) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


PARAMS = {"scale": jnp.array([1.0, 0.5, 2.0]), "bias": jnp.array([0.0, 1.0, -1.0])}
STATS = {"mean": jnp.full(FEATURES, 4.0), "var": jnp.full(FEATURES, 3.0)}
PURE = {
    "bn": lambda x: jaxrenorm.batch_norm(x, PARAMS, STATS, use_running_average=False),
    "brn": lambda x: jaxrenorm.batch_renorm(
        x, PARAMS, STATS, use_running_average=False, r_max=1.5, d_max=0.5
    ),
    "irn": lambda x: jaxrenorm.instance_renorm(
        x, {**PARAMS, "rho": jnp.full(FEATURES, 0.3)}, STATS, use_running_average=False
    ),
    "bn_eval": lambda x: jaxrenorm.batch_norm(x, PARAMS, STATS, use_running_average=True),
}


@pytest.mark.parametrize("kind", sorted(PURE))
def test_pure_functions_export_with_a_symbolic_batch(kind):
    f = PURE[kind]
    exp = _exported(f, "b")
    for b in SIZES:
        _same(exp, f, _batch(b))
    if kind == "bn":  # and the numbers are the reference's
        x = _batch(SIZES[0])
        ref = reference.normalize(
            np.asarray(x, np.float64),
            *(np.asarray(PARAMS[k]) for k in ("scale", "bias")),
            *(np.asarray(STATS[k]) for k in ("mean", "var")),
            np.zeros(x.shape),
        )
        y, new = exp.call(x)
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5)


def test_masks_and_virtual_batches_export_with_a_symbolic_batch():
    """A per-example mask of symbolic length; virtual groups of a batch written `2*k`."""

    def masked(x, mask):
        return jaxrenorm.batch_norm(x, PARAMS, STATS, use_running_average=False, mask=mask)

    exp = _exported(masked, "b", mask=True)
    for b in SIZES:
        mask = jnp.arange(b)[:, None, None] >= 1  # left padding: the first row masked
        _same(exp, masked, _batch(b), mask)

    def virtual(x):
        return jaxrenorm.batch_norm(
            x, PARAMS, STATS, use_running_average=False, virtual_batch_size=2
        )

    exp = _exported(virtual, "2*k")
    for b in SIZES:
        _same(exp, virtual, _batch(b))
    with pytest.raises(ValueError, match=r"symbolic batch size b .*`2\*k`"):
        _exported(virtual, "b")


def test_linen_and_nnx_layers_export_with_a_symbolic_batch():
    layer = jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=0.5)
    variables = layer.init(jax.random.key(0), _batch(4), use_running_average=False)

    def linen_train(x):
        return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

    def linen_eval(x):
        return layer.apply(variables, x, use_running_average=True)

    for f in (linen_train, linen_eval):
        exp = _exported(f, "b")
        for b in SIZES:
            _same(exp, f, _batch(b))

    model = jaxrenorm.nnx.BatchRenorm(FEATURES, r_max=1.5, d_max=0.5, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def nnx_train(x, state):  # the state is an argument: NNX mutates it in the trace
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module, nnx.BatchStat)

    def nnx_eval(x, state):
        return nnx.merge(graphdef, state)(x, use_running_average=True)

    for f in (nnx_train, nnx_eval):
        exp = _exported(f, "b", state)
        for b in SIZES:
            _same(exp, f, _batch(b), state)


def test_an_exported_training_step_survives_serialization():
    pytest.importorskip("flatbuffers", reason="jax.export.serialize needs flatbuffers")
    exp = _exported(PURE["brn"], "b")
    restored = export.deserialize(exp.serialize())
    for b in SIZES:
        _same(restored, PURE["brn"], _batch(b))
