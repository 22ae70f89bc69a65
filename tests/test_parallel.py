"""Cross-device statistics: pmap, shard_map, sharded jit and vmap with an axis name.

Every way of running data-parallel must give what the float64 reference gives on
the whole batch on one device: outputs, new running statistics and the gradients
of the same loss (sum(g * y) over the whole batch).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxrenorm
from tests import reference
from tests.harness import Run
from tests.test_norm import PADDED_KINDS, assert_padded_matches, padded, padded_reference

# Round-off-sensitive: .ci/run runs this file again with XLA:CPU limited to AVX2.
pytestmark = pytest.mark.roundoff

D = 8  # devices (tests/conftest.py)
B = 4  # examples per device
SHAPE = (D * B, 2, 3)  # (batch, length, features)
KINDS = {
    "bn": (jaxrenorm.batch_norm, {}),
    "brn": (jaxrenorm.batch_renorm, {"r_max": 1.5, "d_max": 0.5}),
    # n / (n - 1) with n the global valid count: counts must cross devices too.
    "bn_bessel": (jaxrenorm.batch_norm, {"bessel_correction": True}),
    # Per-example moments merged into the batch's: the same single collective.
    "irn": (jaxrenorm.instance_renorm, {"r_max": 1.5, "d_max": 0.5}),
}
PMAP_KINDS = ["bn", "brn", "bn_bessel"]
# Every mode runs BN and BRN; the Bessel correction (which only adds the global
# count) runs under pmap and shard_map, which keep the suite's time in budget.
BASIC = ["bn", "brn"]


def _problem(seed=0, mask_kind=None, kind="bn"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE) * 2 + 3
    x += np.repeat(rng.normal(size=(D, 1, 1, 1)) * 2, B, axis=0).reshape(D * B, 1, 1)
    params = {"scale": rng.uniform(0.5, 1.5, 3), "bias": rng.normal(size=3)}
    if kind == "irn":
        params["rho"] = rng.uniform(0.0, 1.0, 3)
    stats = {"mean": rng.normal(size=3) + 3, "var": rng.uniform(0.5, 3.0, 3)}
    g = rng.normal(size=SHAPE)
    mask = None
    if mask_kind == "unequal":  # 4, 3, 2, 1, 4, 3, 2, 1 valid rows per device
        mask = np.zeros((D * B, 1, 1), bool)
        for d in range(D):
            mask[d * B : d * B + (B - d % 4)] = True
    elif mask_kind == "one_device_empty":
        mask = np.ones((D * B, 1, 1), bool)
        mask[2 * B : 3 * B] = False
        x[2 * B : 3 * B] = np.nan  # masked NaN must not leak anywhere
    if mask is not None:
        g = g * mask  # the loss ignores masked positions
    return x, params, stats, g, mask


def _reference(kind, x, params, stats, g, mask, momentum=0.99, **extra):
    kw = KINDS[kind][1] | extra
    x_ref = np.where(mask, x, 0.0) if mask is not None else x  # masked values unused
    if kind == "irn":
        p = params
        return reference.instance_renorm(
            x_ref,
            p["scale"],
            p["bias"],
            p["rho"],
            stats["mean"],
            stats["var"],
            g,
            mask=mask,
            momentum=momentum,
            **kw,
        )
    return reference.normalize(
        x_ref,
        params["scale"],
        params["bias"],
        stats["mean"],
        stats["var"],
        g,
        mask=mask,
        momentum=momentum,
        **kw,
    )


def _f32(tree):
    return jax.tree.map(lambda a: None if a is None else jnp.asarray(a, jnp.float32), tree)


def _check(y, new, grads, ref, mask):
    valid = np.ones(SHAPE, bool) if mask is None else np.broadcast_to(mask, SHAPE)
    y = np.asarray(y).reshape(SHAPE)
    dx = np.asarray(grads[0]).reshape(SHAPE)
    np.testing.assert_allclose(y[valid], ref.y[valid], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5)
    np.testing.assert_allclose(dx[valid], ref.dx[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1]["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1]["bias"], ref.dbias, rtol=1e-4, atol=1e-4)
    if "rho" in grads[1]:
        np.testing.assert_allclose(grads[1]["rho"], ref.drho, rtol=1e-4, atol=1e-4)
    for leaf in jax.tree.leaves((y, new, grads)):
        assert np.all(np.isfinite(leaf))


def _global_loss(run, x, params, g):
    """sum(g * y) over the whole batch, differentiated w.r.t. x and params."""

    def loss(x, params):
        y, new = run(x, params)
        return jnp.sum(y.reshape(SHAPE) * g), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, new, grads


MASKS = [None, "unequal", "one_device_empty"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", PMAP_KINDS)
def test_pmap(kind, mask_kind):
    x, params, stats, g, mask = _problem(1, mask_kind)
    fn, kw = KINDS[kind]
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])
    ms = None if mask is None else mask.reshape(D, B, 1, 1)

    def run(xs, params):
        f = lambda x, m: fn(  # noqa: E731
            x, params, _f32(stats), use_running_average=False, axis_name="d", mask=m, **kw
        )
        y, new = jax.pmap(f, axis_name="d", in_axes=(0, None if ms is None else 0))(xs, ms)
        return y, jax.tree.map(lambda s: s[0], new)

    y, new, grads = _global_loss(run, xs, _f32(params), jnp.asarray(g, jnp.float32))
    _check(y, new, grads, _reference(kind, x, params, stats, g, mask), mask)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", KINDS)
def test_shard_map(kind, mask_kind):
    x, params, stats, g, mask = _problem(2, mask_kind, kind)
    fn, kw = KINDS[kind]
    mesh = Mesh(np.array(jax.devices()[:D]), ("data",))
    m = jnp.ones((D * B, 1, 1), bool) if mask is None else jnp.asarray(mask)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=(P("data"), P())
    )
    def sharded(x, params, m):
        return fn(x, params, _f32(stats), use_running_average=False, axis_name="data", mask=m, **kw)

    run = jax.jit(lambda x, params: sharded(x, params, m))
    y, new, grads = _global_loss(run, jnp.asarray(x, jnp.float32), _f32(params), g)
    _check(y, new, grads, _reference(kind, x, params, stats, g, mask), mask)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", [*BASIC, "irn"])
def test_sharded_jit_needs_no_axis_name(kind, mask_kind):
    x, params, stats, g, mask = _problem(3, mask_kind, kind)
    fn, kw = KINDS[kind]
    mesh = Mesh(np.array(jax.devices()[:D]), ("data",))
    shard = NamedSharding(mesh, P("data"))
    xs = jax.device_put(jnp.asarray(x, jnp.float32), shard)
    ms = None if mask is None else jax.device_put(jnp.asarray(mask), shard)
    assert len(xs.sharding.device_set) == D

    @jax.jit
    def run(x, params):
        return fn(x, params, _f32(stats), use_running_average=False, mask=ms, **kw)

    y, new, grads = _global_loss(run, xs, _f32(params), g)
    _check(y, new, grads, _reference(kind, x, params, stats, g, mask), mask)


@pytest.mark.parametrize("virtual", [None, B], ids=["batch", "virtual"])
@pytest.mark.parametrize("kind", ["bn", "brn", "irn"])
def test_explicitly_sharded_jit(kind, virtual):
    """`jax.make_mesh`'s default (explicit) axis types: sharding is part of the types.

    JAX refuses to slice or reshape an explicitly sharded axis unless told the
    output sharding, which the first-element shift and virtual groups need.
    """
    x, params, stats, g, mask = _problem(6, "unequal", kind)
    fn, kw = KINDS[kind]
    mesh = jax.make_mesh((D,), ("data",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    shard = NamedSharding(mesh, P("data"))
    xs = jax.device_put(jnp.asarray(x, jnp.float32), shard)
    ms = jax.device_put(jnp.asarray(mask), shard)

    @jax.jit
    def run(x, params):
        return fn(
            x,
            params,
            _f32(stats),
            use_running_average=False,
            mask=ms,
            virtual_batch_size=virtual,
            **kw,
        )

    with jax.set_mesh(mesh):  # eager work on explicitly sharded arrays needs the mesh
        y, new, grads = _global_loss(run, xs, _f32(params), g)
    assert y.sharding.spec[0] == "data"
    ref = _reference(kind, x, params, stats, g, mask, virtual_batch_size=virtual)
    _check(y, new, grads, ref, mask)
    too_big = functools.partial(
        fn, params=_f32(params), batch_stats=_f32(stats), use_running_average=False, **kw
    )
    with pytest.raises(ValueError, match=r"into 4 groups.*over the 8 shards"):
        jax.jit(too_big, static_argnames="virtual_batch_size")(xs, virtual_batch_size=8)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", BASIC)
def test_vmap_with_axis_name_shares_statistics(kind, mask_kind):
    """An ensemble axis with an axis name: members share one set of batch statistics."""
    x, params, stats, g, mask = _problem(4, mask_kind)
    fn, kw = KINDS[kind]
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])
    ms = jnp.ones((D, B, 1, 1), bool) if mask is None else jnp.asarray(mask.reshape(D, B, 1, 1))

    def run(xs, params):
        f = lambda x, m: fn(  # noqa: E731
            x, params, _f32(stats), use_running_average=False, axis_name="e", mask=m, **kw
        )
        y, new = jax.vmap(f, axis_name="e")(xs, ms)
        return y, jax.tree.map(lambda s: s[0], new)

    y, new, grads = _global_loss(run, xs, _f32(params), jnp.asarray(g, jnp.float32))
    _check(y, new, grads, _reference(kind, x, params, stats, g, mask), mask)


@pytest.mark.parametrize(
    ("kind", "groups"),
    [
        ("bn", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("brn", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # Groups of different sizes: each counts its own devices.
        ("bn_bessel", [[0, 1, 2], [3, 4, 5, 6, 7]]),
    ],
)
def test_pmap_axis_index_groups(kind, groups):
    """Groups of devices are normalized independently, each as its own batch."""
    x, params, stats, g, _ = _problem(5)
    fn, kw = KINDS[kind]
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])

    def run(xs, params):
        f = lambda x: fn(  # noqa: E731
            x,
            params,
            _f32(stats),
            use_running_average=False,
            axis_name="d",
            axis_index_groups=groups,
            **kw,
        )
        return jax.pmap(f, axis_name="d")(xs)

    def loss(xs, params):
        y, new = run(xs, params)
        return jnp.sum(y * jnp.asarray(g, jnp.float32).reshape(xs.shape)), (y, new)

    (_, (y, new)), (dx, _dp) = jax.value_and_grad(loss, (0, 1), has_aux=True)(xs, _f32(params))
    for group in groups:
        sl = slice(group[0] * B, (group[-1] + 1) * B)
        ref = reference.normalize(
            x[sl], params["scale"], params["bias"], stats["mean"], stats["var"], g[sl], **kw
        )
        np.testing.assert_allclose(
            y[group[0] : group[-1] + 1].reshape(ref.y.shape), ref.y, rtol=2e-5, atol=2e-5
        )
        np.testing.assert_allclose(new["var"][group[0]], ref.new_var, rtol=2e-5)
        np.testing.assert_allclose(
            dx[group[0] : group[-1] + 1].reshape(ref.dx.shape), ref.dx, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(("kinds", "fast"), [(("bn", "brn", "irn"), True), (("bn",), False)])
def test_members_holding_different_running_statistics(kinds, fast):
    """A vmapped ensemble whose members hold their own running statistics, synced over
    the vmapped axis: every member normalizes with the statistics of the whole batch
    and moves its own running statistics towards them (renorm: r, d from its own)."""
    x, params, stats, g, _ = _problem(8, kind="irn")
    rng = np.random.default_rng(9)
    member_stats = {  # 10 standard deviations apart from one member to the next
        "mean": stats["mean"] + 20.0 * np.arange(D)[:, None],
        "var": stats["var"] * rng.uniform(0.5, 2.0, (D, 3)),
    }
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])
    for kind in kinds:
        fn, kw = KINDS[kind]

        def loss(xs, kind=kind, fn=fn, kw=kw):
            def member(x, s):
                p = _f32(params) if kind == "irn" else _f32({**params, "rho": None})
                p = {k: v for k, v in p.items() if v is not None}
                return fn(
                    x, p, s, use_running_average=False, axis_name="e", use_fast_variance=fast, **kw
                )

            y, new = jax.vmap(member, axis_name="e")(xs, _f32(member_stats))
            return jnp.sum(y * jnp.asarray(g, jnp.float32).reshape(xs.shape)), (y, new)

        (_, (y, new)), dx = jax.value_and_grad(loss, has_aux=True)(xs)
        for d in (0, D - 1):
            own = {k: v[d] for k, v in member_stats.items()}
            ref = _reference(kind, x, params, own, g, None)
            rows = slice(d * B, (d + 1) * B)
            np.testing.assert_allclose(y[d], ref.y[rows], rtol=2e-5, atol=2e-5, err_msg=kind)
            np.testing.assert_allclose(new["mean"][d], ref.new_mean, rtol=2e-5, err_msg=kind)
            np.testing.assert_allclose(new["var"][d], ref.new_var, rtol=2e-5, err_msg=kind)
        if kind == "bn":  # every member's output is the same function of the batch
            np.testing.assert_allclose(dx.reshape(SHAPE), ref.dx, rtol=1e-4, atol=1e-4)


def test_axis_name_tuple():
    """A tuple of axis names reduces over all of them (nested pmap and vmap)."""
    x, params, stats, g, _ = _problem(6)
    xs = jnp.asarray(x, jnp.float32).reshape(2, 4, B, *SHAPE[1:])

    def f(x):
        return jaxrenorm.batch_renorm(
            x,
            _f32(params),
            _f32(stats),
            use_running_average=False,
            axis_name=("outer", "inner"),
            r_max=1.5,
            d_max=0.5,
        )

    y, new = jax.pmap(jax.vmap(f, axis_name="inner"), axis_name="outer")(xs)
    ref = _reference("brn", x, params, stats, g, None)
    np.testing.assert_allclose(np.asarray(y).reshape(SHAPE), ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["var"][1, 2], ref.new_var, rtol=2e-5)


# --- collectives ------------------------------------------------------------------


class TwoLayers(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, mask=None):
        x = self.norm(axis_name="d", use_running_average=False)(x, mask=mask)
        x = nn.Dense(3)(nn.relu(x))
        return self.norm(axis_name="d", use_running_average=False)(x, mask=mask)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter")


def _count_collectives(compiled_text: str) -> int:
    """Cross-device operations in a compiled program (XLA:CPU's synchronous forms and
    the asynchronous `-start` forms of other backends)."""
    return sum(
        1
        for line in compiled_text.splitlines()
        if any(f" {op}(" in line or f" {op}-start(" in line for op in COLLECTIVES)
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "norm",
    [
        jaxrenorm.linen.BatchNorm,
        functools.partial(jaxrenorm.linen.BatchRenorm, r_max=2.0, d_max=1.0),
        jaxrenorm.linen.BatchRenorm,  # with schedules and a steps counter
        jaxrenorm.linen.InstanceRenorm,
    ],
    ids=["bn", "brn", "brn_scheduled", "irn"],
)
def test_one_collective_per_layer_forward_and_at_most_two_with_backward(norm, masked):
    model = TwoLayers(norm)
    # Only compiled, never run: shapes are all it needs (no initializer runs).
    x = jax.ShapeDtypeStruct((D, B, 2, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((D, B, 2, 1), bool) if masked else None
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((B, 2, 3)))

    def forward(x, m, variables):
        return model.apply(variables, x, mask=m, mutable=["batch_stats"])

    def train(x, m, variables):
        def loss(params):
            y, upd = model.apply(
                {**variables, "params": params}, x, mask=m, mutable=["batch_stats"]
            )
            return jnp.sum(y**2), upd

        return jax.grad(loss, has_aux=True)(variables["params"])

    in_axes = (0, None if mask is None else 0, None)
    fwd = jax.pmap(forward, axis_name="d", in_axes=in_axes).lower(x, mask, variables).compile()
    both = jax.pmap(train, axis_name="d", in_axes=in_axes).lower(x, mask, variables).compile()
    assert _count_collectives(fwd.as_text()) == 2  # one gather per layer
    # The backward adds one per layer (the per-feature gradient sums, two rows; the
    # forward's gather is saved, not recomputed); the gradient of the Dense
    # parameters is not synchronized here (no pmean in `train`).
    assert _count_collectives(both.as_text()) <= 4


def _gathered_rows(compiled_text: str) -> list[tuple[int, int]]:
    """(devices, per-feature rows) of each all-reduce's operand: every device's rows,
    each in its own slot (the gather of `jaxrenorm._stats`)."""
    rows = []
    for line in compiled_text.splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            dims = line.split(" = f32[", 1)[1].split("]", 1)[0].split(",")
            rows.append((int(dims[1]), int(dims[0])))  # (rows, devices, ...)
    return rows


@pytest.mark.parametrize("masked", [False, True])
def test_a_constant_count_stays_out_of_the_gather(masked):
    """Without a mask every device holds as many values: the forward's one collective
    gathers each device's (shift, offset, var) and the count is a constant; with a
    mask, four rows.
    """
    x = jnp.ones((D, B, 2, 3))
    mask = jnp.ones((D, B, 2, 1), bool) if masked else None

    def forward(x, m):
        stats = jaxrenorm.init_batch_stats(3)
        return jaxrenorm.batch_norm(x, {}, stats, use_running_average=False, axis_name="d", mask=m)

    in_axes = (0, None if mask is None else 0)
    f = jax.pmap(forward, axis_name="d", in_axes=in_axes).lower(x, mask).compile()
    assert _gathered_rows(f.as_text()) == [(D, 4 if masked else 3)]


def test_exact_two_pass_uses_one_collective_per_layer():
    """Each device's two-pass moments are exact; merging them needs no second pass."""
    x = jnp.ones((D, B, 3))
    f = jax.pmap(
        lambda x: jaxrenorm.batch_norm(
            x,
            {},
            jaxrenorm.init_batch_stats(3),
            use_running_average=False,
            axis_name="d",
            use_fast_variance=False,
        ),
        axis_name="d",
    )
    assert _count_collectives(f.lower(x).compile().as_text()) == 1


# --- numerics across devices ---------------------------------------------------------


def test_offset_data_across_devices():
    """x = 1e4 + N(0, 1) over 8 devices, from the first call, in both variance modes.

    Each device shifts by a sample of its own data and the devices' moments merge
    exactly, so the running mean (here the initial 0, 1e4 standard deviations from
    the data) plays no part in the accuracy.
    """
    x = 1e4 + jax.random.normal(jax.random.key(7), (D, 64, 4))
    true_var = np.asarray(x, np.float64).reshape(-1, 4).var(0)

    def step(fast):
        return jax.pmap(
            lambda x, s: jaxrenorm.batch_norm(
                x,
                {},
                s,
                use_running_average=False,
                axis_name="d",
                momentum=0.0,
                use_fast_variance=fast,
            ),
            axis_name="d",
            in_axes=(0, None),
        )

    stats = jaxrenorm.init_batch_stats(4)
    for fast in (False, True):
        y, new = step(fast)(x, stats)
        np.testing.assert_allclose(np.asarray(new["var"][0], np.float64), true_var, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 4).std(0), 1.0, rtol=1e-4)


def test_linen_module_under_pmap_matches_whole_batch():
    x, params, stats, g, mask = _problem(8, "unequal")
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])
    ms = jnp.asarray(mask.reshape(D, B, 1, 1))
    variables = {"params": _f32(params), "batch_stats": _f32(stats)}
    brn = jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=0.5, axis_name="batch")
    y, upd = jax.pmap(
        lambda x, m: brn.apply(
            variables, x, use_running_average=False, mask=m, mutable=["batch_stats"]
        ),
        axis_name="batch",
    )(xs, ms)
    ref = _reference("brn", x, params, stats, g, mask)
    valid = np.broadcast_to(mask, SHAPE)
    np.testing.assert_allclose(
        np.asarray(y).reshape(SHAPE)[valid], ref.y[valid], rtol=2e-5, atol=2e-5
    )
    np.testing.assert_allclose(upd["batch_stats"]["mean"][5], ref.new_mean, rtol=2e-5)


def test_virtual_batches_are_local_to_each_device():
    """With virtual batches the groups live on one device: no collective at all."""
    x, params, stats, g, _ = _problem(9)
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])

    def f(x):
        return jaxrenorm.batch_renorm(
            x,
            _f32(params),
            _f32(stats),
            use_running_average=False,
            axis_name="d",
            virtual_batch_size=2,
            r_max=1.5,
            d_max=0.5,
        )

    pf = jax.pmap(f, axis_name="d")
    y, new = pf(xs)
    assert _count_collectives(pf.lower(xs).compile().as_text()) == 0
    for d in (0, 5):
        ref = reference.normalize(
            x[d * B : (d + 1) * B],
            params["scale"],
            params["bias"],
            stats["mean"],
            stats["var"],
            g[d * B : (d + 1) * B],
            r_max=1.5,
            d_max=0.5,
            virtual_batch_size=2,
        )
        np.testing.assert_allclose(y[d], ref.y, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new["var"][d], ref.new_var, rtol=2e-5)


# --- Flax NNX ---------------------------------------------------------------------

NNX_KINDS = {
    "bn": (jaxrenorm.nnx.BatchNorm, {}),
    "brn": (jaxrenorm.nnx.BatchRenorm, {"r_max": 1.5, "d_max": 0.5}),
    "bn_bessel": (jaxrenorm.nnx.BatchNorm, {"bessel_correction": True}),
    "irn": (jaxrenorm.nnx.InstanceRenorm, {"r_max": 1.5, "d_max": 0.5}),
}


def _nnx_model(kind, params, stats, **kw):
    cls, extra = NNX_KINDS[kind]
    features = len(stats["mean"])
    model = cls(features, momentum=0.99, rngs=nnx.Rngs(0), **extra, **kw)
    for name, value in {**params, **stats}.items():
        getattr(model, name)[...] = jnp.asarray(value, jnp.float32)
    return model


def _nnx_check(model, y, dx, grads, ref, mask):
    params = {name: grads[name][...] for name in ("scale", "bias", "rho") if name in grads}
    new = {"mean": model.mean[...], "var": model.var[...]}
    _check(y, new, (dx, params), ref, mask)


@pytest.mark.parametrize("mask_kind", [None, "unequal"])
@pytest.mark.parametrize("kind", NNX_KINDS)
def test_nnx_shard_map(kind, mask_kind):
    x, params, stats, g, mask = _problem(11, mask_kind, kind="irn" if kind == "irn" else "bn")
    model = _nnx_model(kind, params, stats, axis_name="d")
    mesh = jax.make_mesh((D,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    m = np.ones((D * B, 1, 1), bool) if mask is None else mask

    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P("d"))
    def forward(model, x, m):
        return model(x, mask=m)

    @nnx.jit
    def step(model, x, m):
        def loss(model, x):
            y = forward(model, x, m)
            return jnp.sum(y * g), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)

    (grads, dx), y = step(model, jnp.asarray(x, jnp.float32), jnp.asarray(m))
    _nnx_check(model, y, dx, grads, _reference(kind, x, params, stats, g, mask), mask)


@pytest.mark.skipif(not hasattr(nnx, "pmap"), reason="this flax has no nnx.pmap")
@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_nnx_pmap(kind):
    x, params, stats, g, _ = _problem(12)
    model = _nnx_model(kind, params, stats, axis_name="d")
    xs = jnp.asarray(x, jnp.float32).reshape(D, B, *SHAPE[1:])

    @nnx.pmap(in_axes=(None, 0), axis_name="d")
    def forward(model, x):
        return model(x)

    y = forward(model, xs)  # one training call: the statistics of the global batch
    ref = _reference(kind, x, params, stats, g, None)
    np.testing.assert_allclose(np.asarray(y).reshape(SHAPE), ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(model.mean[...], ref.new_mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(model.var[...], ref.new_var, rtol=2e-5)


@pytest.mark.parametrize("features_sharded", [False, True], ids=["batch", "batch+features"])
@pytest.mark.parametrize("kind", ["bn", "brn", "irn"])
def test_nnx_jit_with_parameters_sharded_by_metadata(kind, features_sharded):
    """A (data, model) mesh: the batch over data, scale/bias (and rho) over model."""
    rng = np.random.default_rng(13)
    shape = (16, 5, 6)
    x = rng.normal(size=shape) * 2 + 3 + rng.normal(size=(16, 1, 1))
    g = rng.normal(size=shape)
    params = {"scale": rng.uniform(0.5, 1.5, 6), "bias": rng.normal(size=6)}
    params |= {"rho": rng.uniform(0, 1, 6)} if kind == "irn" else {}
    stats = {"mean": rng.normal(size=6) + 3, "var": rng.uniform(0.5, 3.0, 6)}
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    meta = {"out_sharding": ("model",)}
    metadata = dict(scale_metadata=meta, bias_metadata=meta)
    metadata |= {"rho_metadata": meta} if kind == "irn" else {}
    with jax.set_mesh(mesh):
        model = _nnx_model(kind, {}, {"mean": np.zeros(6)}, **metadata)
    for name, value in {**params, **stats}.items():  # values, keeping each variable's sharding
        var = getattr(model, name)
        var[...] = jax.device_put(jnp.asarray(value, jnp.float32), var[...].sharding)
    assert model.scale[...].sharding.spec == P("model")
    spec = P("data", None, "model") if features_sharded else P("data")
    xs, gs = (
        jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, spec)) for a in (x, g)
    )

    @nnx.jit
    def step(model, x, g):
        def loss(model, x):
            y = model(x)
            return jnp.sum(y * g), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)

    with jax.set_mesh(mesh):
        (grads, dx), y = step(model, xs, gs)
    assert grads["scale"][...].sharding.spec == P("model")
    kw = NNX_KINDS[kind][1]
    if kind == "irn":
        ref = reference.instance_renorm(x, *params.values(), *stats.values(), g, **kw)
    else:
        ref = reference.normalize(x, *params.values(), *stats.values(), g, **kw)
    np.testing.assert_allclose(np.asarray(y), ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx), ref.dx, rtol=1e-4, atol=1e-4)
    for name in params:
        want = getattr(ref, f"d{name}")
        np.testing.assert_allclose(grads[name][...], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.mean[...], ref.new_mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(model.var[...], ref.new_var, rtol=2e-5)


# --- padded sequences across devices ------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "virtual"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", ["bn", "brn", "irn"])
def test_padded_sequences_under_shard_map(kind, padding, mode):
    """Offset data from the first call: exact mode across devices, or virtual groups.

    With `axis_name` the shift of the one-pass variance must be common to every
    device, and is the running mean (0 at the first call), so offset data needs
    the exact mode there; virtual groups are local and shift by their first valid
    element.
    """
    x, mask, params, stats, g = padded(padding, n=16)
    params = params | ({"rho": np.array([0.2, 0.5, 0.9])} if kind == "irn" else {})
    fn, extra = PADDED_KINDS[kind]
    kw = dict(use_fast_variance=False) if mode == "exact" else dict(virtual_batch_size=2)
    mesh = jax.make_mesh((D,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def per_device(x, m, params):
        y, new = fn(
            x,
            params,
            _f32(stats),
            use_running_average=False,
            axis_name="d",
            mask=m,
            momentum=0.0,
            **extra,
            **kw,
        )
        return y, jax.tree.map(lambda s: s[None], new)  # per device: one row each

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P("d"))
    )

    @jax.jit
    def run(x, params):
        def loss(x, params):
            y, new = sharded(x, jnp.asarray(mask), params)
            return jnp.sum(y * g), (y, new)

        (_, (y, new)), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return Run(y, new, dx, dparams)

    got = run(jnp.asarray(x, jnp.float32), _f32(params))
    if mode == "exact":  # the statistics of the whole batch, the same on every device
        ref = padded_reference(kind, x, mask, params, stats, g, momentum=0.0)
        assert_padded_matches(got, ref, mask, stats=0)
        return
    # Virtual groups of 2 are each device's 2 rows: per-device statistics and outputs.
    ref = padded_reference(kind, x, mask, params, stats, g, momentum=0.0, virtual_batch_size=2)
    for d in (0, 5):
        rows = slice(2 * d, 2 * d + 2)
        ref_d = padded_reference(kind, x[rows], mask[rows], params, stats, g[rows], momentum=0.0)
        np.testing.assert_allclose(got.new["var"][d], ref_d.new_var, rtol=1e-3)
    got = got._replace(new={k: v[0] for k, v in got.new.items()})
    ref0 = padded_reference(kind, x[:2], mask[:2], params, stats, g[:2], momentum=0.0)
    ref.new_mean, ref.new_var = ref0.new_mean, ref0.new_var  # device 0's
    assert_padded_matches(got, ref, mask)
