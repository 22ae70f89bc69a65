"""jaxrenorm.nnx against flax.nnx.BatchNorm, the linen modules and the float64 reference."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxrenorm
from tests import reference


def _batches(n=4, shape=(16, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape) * (1 + i) + i, jnp.float32) for i in range(n)]


def test_variables_and_steps_match_flax_nnx():
    ours = jaxrenorm.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    for x in _batches():
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5)
    ours.eval()
    theirs.eval()
    x = _batches(1, seed=1)[0]
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # The call-time flag takes precedence over the module's mode.
    np.testing.assert_allclose(
        ours(x, use_running_average=False),
        theirs(x, use_running_average=False),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("linen_cls", "nnx_cls", "kw"),
    [
        (jaxrenorm.linen.BatchNorm, jaxrenorm.nnx.BatchNorm, dict(virtual_batch_size=4)),
        (jaxrenorm.linen.BatchNorm, jaxrenorm.nnx.BatchNorm, dict(bessel_correction=True)),
        (jaxrenorm.linen.BatchRenorm, jaxrenorm.nnx.BatchRenorm, dict(r_max=1.5, d_max=0.5)),
        (
            jaxrenorm.linen.BatchRenorm,
            jaxrenorm.nnx.BatchRenorm,
            dict(
                r_max=jaxrenorm.schedules.r_max_schedule(2.0, begin=1, end=3),
                d_max=jaxrenorm.schedules.d_max_schedule(1.0, begin=1, end=2),
                grad_through_batch_moments=False,
            ),
        ),
        (
            jaxrenorm.linen.InstanceRenorm,
            jaxrenorm.nnx.InstanceRenorm,
            dict(r_max=1.5, d_max=0.5, rho_init=nnx.initializers.constant(0.3)),
        ),
    ],
)
def test_nnx_equals_linen_over_several_steps(linen_cls, nnx_cls, kw):
    x0 = _batches(1)[0]
    module = linen_cls(momentum=0.8, **kw)
    variables = module.init(jax.random.key(0), x0, use_running_average=False)
    ours = nnx_cls(3, momentum=0.8, rngs=nnx.Rngs(0), **kw)
    g = jnp.asarray(np.random.default_rng(5).normal(size=x0.shape), jnp.float32)
    for x in _batches(4, seed=2):

        def linen_loss(x, variables=variables):
            y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            return jnp.sum(y * g), upd

        (_, upd), dx_linen = jax.value_and_grad(linen_loss, has_aux=True)(x)
        variables = {**variables, **upd}

        def nnx_loss(model, x):
            return jnp.sum(model(x) * g)

        dx_nnx = nnx.grad(nnx_loss, argnums=1)(ours, x)  # updates ours' statistics
        np.testing.assert_allclose(dx_nnx, dx_linen, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.var[...], variables["batch_stats"]["var"], rtol=1e-6)
        if "steps" in variables["batch_stats"]:
            assert int(ours.steps[...]) == int(variables["batch_stats"]["steps"])


def test_nnx_batch_renorm_against_reference_and_steps():
    x = _batches(1, seed=3)[0]
    brn = jaxrenorm.nnx.BatchRenorm(3, r_max=1.5, d_max=0.5, rngs=nnx.Rngs(0))
    assert brn.steps is None  # constant bounds need no counter
    brn.mean[...] = jnp.asarray([3.0, 2.0, 1.0])
    y = brn(x)
    ref = reference.normalize(
        np.asarray(x, np.float64),
        np.ones(3),
        np.zeros(3),
        [3.0, 2.0, 1.0],
        np.ones(3),
        np.zeros(x.shape),
        r_max=1.5,
        d_max=0.5,
    )
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(brn.mean[...], ref.new_mean, rtol=1e-5)
    scheduled = jaxrenorm.nnx.BatchRenorm(3, rngs=nnx.Rngs(0))
    scheduled(x)
    scheduled(x, use_running_average=True)
    assert int(scheduled.steps[...]) == 1


def test_nnx_jit_training_with_optimizer_and_diagnostics():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 8, rngs=rngs)
            self.norm = jaxrenorm.nnx.BatchRenorm(
                8, r_max=2.0, d_max=1.0, diagnostics=True, rngs=rngs
            )
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.norm(self.dense(x))))

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(64, 4)) * 5 + 20, jnp.float32)
    Y = (X[:, :1] - 20) ** 2 / 25
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(X) - Y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0]
    diag = model.norm.diagnostics_values.get_value()
    assert set(diag) == {"r_clipped", "d_clipped", "r_mean_abs_dev", "d_mean_abs"}
    model.eval()
    assert np.all(np.isfinite(model(X)))


def test_nnx_vmap_ensemble_and_pmap_axis_name():
    x = _batches(1, shape=(8, 16, 3), seed=4)[0]

    @nnx.split_rngs(splits=8)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return jaxrenorm.nnx.BatchNorm(3, rngs=rngs)

    ensemble = make(nnx.Rngs(0))

    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def apply(model, x):
        return model(x)

    y = apply(ensemble, x)  # separate statistics per member
    for i in (0, 5):
        ref = reference.normalize(
            np.asarray(x[i]), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), np.zeros(x[i].shape)
        )
        np.testing.assert_allclose(y[i], ref.y, rtol=2e-5, atol=2e-5)

    shared = jaxrenorm.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(shared)

    def per_device(x):
        model = nnx.merge(graphdef, state, copy=True)
        return model(x), nnx.state(model)

    y, new_state = jax.pmap(per_device, axis_name="batch")(x)
    ref = reference.normalize(
        np.asarray(x).reshape(-1, 3),
        np.ones(3),
        np.zeros(3),
        np.zeros(3),
        np.ones(3),
        np.zeros((128, 3)),
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new_state["var"][...][3], ref.new_var, rtol=2e-5)


def test_nnx_shard_map_instance_renorm_matches_whole_batch():
    """nnx.shard_map with an axis name: statistics of the global batch, one update."""
    mesh = jax.make_mesh((8,), ("batch",))
    x = _batches(1, shape=(16, 5, 3), seed=6)[0]
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("batch")))
    model = jaxrenorm.nnx.InstanceRenorm(
        3, axis_name="batch", r_max=1.5, d_max=0.5, momentum=0.9, rngs=nnx.Rngs(0)
    )

    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))
    def train_step(model, x):
        return model(x)

    y = train_step(model, xs)
    n = np.ones(3)
    ref = reference.instance_renorm(
        np.asarray(x),
        n,
        0 * n,
        0.5 * n,
        0 * n,
        n,
        np.zeros(x.shape),
        momentum=0.9,
        r_max=1.5,
        d_max=0.5,
    )
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(model.mean[...], ref.new_mean, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(model.var[...], ref.new_var, rtol=2e-5)


_ = (functools, nn)


def test_scheduled_training_step_traces_once():
    """`steps` is a traced BatchStat: the bounds move every step without recompiling."""
    r_sched = optax.linear_schedule(1.0, 2.0, transition_steps=6)
    d_sched = optax.linear_schedule(0.0, 1.0, transition_steps=6)
    model = jaxrenorm.nnx.BatchRenorm(
        3, r_max=r_sched, d_max=d_sched, diagnostics=True, rngs=nnx.Rngs(0)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = _batches(1, shape=(16, 3), seed=11)[0] + 2.0

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def step(model, optimizer, x):
        def loss(model):
            return jnp.mean((model(x) - 1.0) ** 2)

        optimizer.update(model, nnx.grad(loss)(model))

    chex.clear_trace_counter()
    d_used = []
    for _ in range(6):
        step(model, optimizer, x)
        d_used.append(float(model.diagnostics_values.get_value()["d_mean_abs"]))
    assert int(model.steps[...]) == 6
    assert d_used[0] == 0.0 and d_used[-1] > 0.0  # d_max = 0 at step 0 only
