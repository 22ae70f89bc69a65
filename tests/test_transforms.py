"""The layers under every JAX / Flax transform a model puts them through.

Each transformed computation is compared with the same computation written
without the transform (an unrolled loop, separate members, no remat), so the
transforms must neither change the numbers nor lose a statistics update.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrenorm
from tests import roundoff

# Round-off-sensitive: .ci/run runs this file again with XLA:CPU limited to AVX2.
pytestmark = pytest.mark.roundoff

SCHEDULE = dict(
    r_max=jaxrenorm.schedules.r_max_schedule(2.0, begin=0, end=4),
    d_max=jaxrenorm.schedules.d_max_schedule(1.0, begin=0, end=4),
)
LAYERS = {
    "bn": lambda **kw: jaxrenorm.linen.BatchNorm(**kw),
    "brn": lambda **kw: jaxrenorm.linen.BatchRenorm(**SCHEDULE, **kw),  # with `steps`
    "irn": lambda **kw: jaxrenorm.linen.InstanceRenorm(r_max=1.5, d_max=0.5, **kw),
}


def _x(shape=(8, 5, 4), seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 2 + 1


# The layers reduce 8 x 5 values per feature; the transformed and the plain
# computation order those sums differently (see tests/roundoff.py).
TERMS = 8 * 5


def _allclose(a, b):
    roundoff.assert_close(a, b, terms=TERMS)


class Block(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, _=None):
        y = LAYERS[self.kind](use_running_average=False)(nn.Dense(4)(x))
        return x + nn.relu(y), None


@pytest.mark.parametrize("kind", LAYERS)
def test_linen_scan_over_blocks_equals_the_unrolled_stack(kind):
    """nn.scan with batch_stats as a scanned collection: one set of statistics per block."""
    depth, x = 3, _x()
    scanned = nn.scan(
        Block,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=depth,
    )(kind)
    variables = scanned.init(jax.random.key(0), x)
    assert jax.tree.leaves(variables["batch_stats"])[0].shape[0] == depth

    def scanned_loss(params, x):
        (y, _), upd = scanned.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mutable=["batch_stats"],
        )
        return jnp.sum(y**2), upd["batch_stats"]

    def unrolled_loss(params, x):
        stats = []
        for i in range(depth):
            layer = jax.tree.map(
                lambda v, i=i: v[i], {"params": params, "batch_stats": variables["batch_stats"]}
            )
            (x, _), upd = Block(kind).apply(layer, x, mutable=["batch_stats"])
            stats.append(upd["batch_stats"])
        return jnp.sum(x**2), jax.tree.map(lambda *s: jnp.stack(s), *stats)

    grad = jax.grad(scanned_loss, argnums=(0, 1), has_aux=True)
    (dp, dx), stats = jax.jit(grad)(variables["params"], x)
    (dp_ref, dx_ref), stats_ref = jax.grad(unrolled_loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    _allclose(stats, stats_ref)
    # Relative to the tree's largest gradient: the Dense biases before a
    # normalization have a zero gradient up to rounding.
    _allclose((dp, dx), (dp_ref, dx_ref))
    if kind == "brn":
        np.testing.assert_array_equal(stats["BatchRenorm_0"]["steps"], [1] * depth)


@pytest.mark.parametrize("kind", LAYERS)
def test_remat_gives_the_same_gradients_and_statistics(kind):
    x = _x()
    plain, remat = Block(kind), nn.remat(Block)(kind)
    variables = plain.init(jax.random.key(1), x)

    def loss(module, params):
        (y, _), upd = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd

    (v_ref, upd_ref), g_ref = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(
        variables["params"]
    )
    for f in (lambda p: loss(remat, p), jax.checkpoint(lambda p: loss(plain, p))):
        (v, upd), g = jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])
        _allclose(v, v_ref)
        _allclose(upd, upd_ref)
        _allclose(g, g_ref)


@pytest.mark.parametrize("kind", LAYERS)
def test_linen_vmap_ensemble_keeps_separate_statistics(kind):
    """nn.vmap with variable_axes: each member has its own params and statistics."""
    members, x = 3, _x((3, 8, 5, 4), seed=2)
    ensemble = nn.vmap(
        Block,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=0,
    )(kind)
    variables = ensemble.init(jax.random.key(3), x)
    (y, _), upd = ensemble.apply(variables, x, mutable=["batch_stats"])
    for i in range(members):
        member = jax.tree.map(lambda v, i=i: v[i], variables)
        (y_i, _), upd_i = Block(kind).apply(member, x[i], mutable=["batch_stats"])
        _allclose(y[i], y_i)
        _allclose(jax.tree.map(lambda v, i=i: v[i], upd), upd_i)


@pytest.mark.parametrize("kind", LAYERS)
def test_jit_with_donated_state_and_eval_shape(kind):
    x = _x()
    block = Block(kind)
    shapes = jax.eval_shape(block.init, jax.random.key(4), x)
    variables = block.init(jax.random.key(4), x)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
        lambda v: (v.shape, v.dtype), variables
    )

    def step(variables, x):
        (y, _), upd = block.apply(variables, x, mutable=["batch_stats"])
        return {**variables, **upd}, y

    out_shapes = jax.eval_shape(step, variables, x)
    expected, y_ref = step(variables, x)
    donated = jax.jit(step, donate_argnums=0)
    new, y = donated(jax.tree.map(jnp.copy, variables), x)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), out_shapes) == jax.tree.map(
        lambda v: (v.shape, v.dtype), (new, y)
    )
    _allclose((new, y), (expected, y_ref))


def test_nnx_transforms_scan_remat_and_eval_shape():
    """NNX: nnx.scan over stacked layers, nnx.remat, nnx.eval_shape."""
    depth, x = 3, _x(seed=5)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return jaxrenorm.nnx.BatchRenorm(4, **SCHEDULE, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(6), depth))
    layers = [jaxrenorm.nnx.BatchRenorm(4, **SCHEDULE, rngs=nnx.Rngs(0)) for _ in range(depth)]
    for i, layer in enumerate(layers):  # the same variables as the stack's members
        nnx.update(layer, jax.tree.map(lambda v, i=i: v[i], nnx.state(stack)))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(layer, h):
        return h + jnp.tanh(layer(h))

    y = forward(stack, x)
    h = x
    for layer in layers:
        h = h + jnp.tanh(nnx.remat(lambda m, h: m(h))(layer, h))
    _allclose(y, h)
    _allclose(stack.var[...], jnp.stack([m.var[...] for m in layers]))
    np.testing.assert_array_equal(stack.steps[...], [1] * depth)

    abstract = nnx.eval_shape(lambda: jaxrenorm.nnx.InstanceRenorm(4, rngs=nnx.Rngs(0)))
    assert abstract.rho.shape == (4,) and abstract.mean.shape == (4,)
