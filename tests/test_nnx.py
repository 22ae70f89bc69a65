"""jaxrenorm.nnx against flax.nnx.BatchNorm, the linen modules and the float64 reference."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx.nn import dtypes
from jax.sharding import PartitionSpec as P

import jaxrenorm
from jaxrenorm import init_batch_stats as init_stats
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
        (
            jaxrenorm.linen.BatchRenorm,
            jaxrenorm.nnx.BatchRenorm,
            dict(r_max=1.5, d_max=0.5, virtual_batch_size=2, grad_through_batch_moments="adaptive"),
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


# --- parity with flax.nnx.BatchNorm ------------------------------------------------

CLASSES = [jaxrenorm.nnx.BatchNorm, jaxrenorm.nnx.BatchRenorm, jaxrenorm.nnx.InstanceRenorm]


def _constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    """Every named constructor argument, along the class's jaxrenorm bases."""
    params = {}
    for klass in reversed(cls.__mro__):
        if issubclass(klass, jaxrenorm.nnx.BatchNorm) and "__init__" in vars(klass):
            sig = inspect.signature(klass.__init__).parameters
            params |= {k: p for k, p in sig.items() if p.kind != inspect.Parameter.VAR_KEYWORD}
    return params


@pytest.mark.parametrize("cls", CLASSES)
def test_constructor_takes_every_argument_of_flax_nnx_batch_norm(cls):
    """A future Flax argument fails here, not in a user's model as a TypeError."""
    ours = _constructor_parameters(cls)
    for name, theirs in inspect.signature(nnx.BatchNorm.__init__).parameters.items():
        assert name in ours, f"{cls.__name__} lacks flax.nnx.BatchNorm's `{name}`"
        assert ours[name].kind == theirs.kind, name
        assert ours[name].default == theirs.default, name


def test_every_argument_has_flax_meaning_and_variables():
    """Non-default values of every Flax argument: same variables, dtypes and attributes."""
    kw = dict(
        use_running_average=True,
        axis=1,
        momentum=0.8,
        epsilon=1e-3,
        dtype=jnp.float16,
        param_dtype=jnp.bfloat16,
        use_bias=False,
        use_scale=True,
        bias_init=nnx.initializers.ones_init(),
        scale_init=nnx.initializers.constant(2.0),
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance=False,
        scale_metadata={"note": "kept"},
    )
    theirs = nnx.BatchNorm(4, rngs=nnx.Rngs(1), **kw)
    x = _batches(1, shape=(6, 4, 5), seed=7)[0]
    for cls in CLASSES:
        ours = cls(4, rngs=nnx.Rngs(1), **kw)
        state = {k: v for k, v in nnx.state(ours).items() if k in ("scale", "bias", "mean", "var")}
        chex.assert_trees_all_equal(dict(state), dict(nnx.state(theirs)), strict=True)
        assert ours.scale.get_metadata()["note"] == "kept"
        for name in ("use_running_average", "axis", "momentum", "epsilon", "dtype"):
            assert getattr(ours, name) == getattr(theirs, name), name
        if cls is jaxrenorm.nnx.BatchNorm:
            y, y_ref = ours(x), theirs(x)  # inference, features on axis 1, float16
            assert y.dtype == y_ref.dtype == jnp.float16
            np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mask", [None, "features"])
@pytest.mark.parametrize("use_fast_variance", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_flax_nnx_scenarios(dtype, param_dtype, use_fast_variance, mask):
    """Flax's own NNX normalization scenarios: flax.nnx, jaxrenorm.linen and the reference."""
    x = jax.random.normal(jax.random.key(0), (10, 5)) * 2 + 1
    valid = np.array([True, False, True, False, True]) if mask else np.ones(5, bool)
    mask = None if mask is None else jnp.asarray(valid)
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance)
    ours = jaxrenorm.nnx.BatchNorm(5, use_running_average=False, rngs=nnx.Rngs(42), **kw)
    theirs = nnx.BatchNorm(5, use_running_average=False, rngs=nnx.Rngs(42), **kw)
    y, y_ref = ours(x, mask=mask), theirs(x, mask=mask)
    assert y.dtype == y_ref.dtype and ours.mean[...].dtype == theirs.mean[...].dtype
    low = jnp.float16 in (dtype, param_dtype)
    tol = dict(rtol=2e-3, atol=2e-3) if low else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, valid], np.asarray(y_ref)[:, valid], **tol)
    for ours_stat, theirs_stat in ((ours.mean, theirs.mean), (ours.var, theirs.var)):
        np.testing.assert_allclose(ours_stat[...][valid], theirs_stat[...][valid], **tol)
    # Features with no valid element keep their statistics (Flax's become NaN).
    np.testing.assert_array_equal(ours.mean[...][~valid], 0.0)
    np.testing.assert_array_equal(ours.var[...][~valid], 1.0)
    ref = reference.normalize(x, np.ones(5), np.zeros(5), np.zeros(5), np.ones(5), 0 * x, mask=mask)
    np.testing.assert_allclose(np.asarray(y, np.float64)[:, valid], ref.y[:, valid], **tol)
    # jaxrenorm.linen on the input and params as `promote_dtype` promotes them (as Flax's
    # test compares its NNX and linen modules): bitwise the same output and statistics.
    x, _, _, scale, bias = dtypes.promote_dtype(
        (x, ours.mean[...], ours.var[...], ours.scale[...], ours.bias[...]), dtype=dtype
    )
    linen = jaxrenorm.linen.BatchNorm(use_running_average=False, **kw)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": init_stats(5)}
    y_linen, upd = linen.apply(variables, x, mask=mask, mutable=["batch_stats"])
    chex.assert_trees_all_equal(
        (y, ours.mean[...], ours.var[...]),
        (y_linen, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]),
        strict=True,
    )


def test_nnx_view_sets_evaluation_beside_flax_layers():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.norm = jaxrenorm.nnx.BatchRenorm(4, r_max=1.5, d_max=0.5, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dropout(self.linear(x)))

    model = Model(nnx.Rngs(0))
    x = _batches(1, shape=(16, 3), seed=8)[0]
    model(x)  # a training call moves the running statistics
    evaluation = nnx.view(model, deterministic=True, use_running_average=True)
    assert evaluation.norm.use_running_average and evaluation.dropout.deterministic
    assert model.norm.use_running_average is False  # the model itself stays in training
    y = evaluation(x)
    h = np.asarray(model.linear(x), np.float64)
    stats = (model.norm.mean[...], model.norm.var[...])
    ref = reference.normalize(h, np.ones(4), np.zeros(4), *stats, 0 * h, train=False)
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    assert jaxrenorm.batch_dependence(evaluation, x, key=jax.random.key(1)) < 1e-5
    # A model whose only layer with the key is jaxrenorm's: no "unused keys" error.
    alone = nnx.view(jaxrenorm.nnx.InstanceRenorm(4, rngs=nnx.Rngs(0)), use_running_average=True)
    assert alone.use_running_average is True


def test_custom_promote_dtype_is_used_and_statistics_stay_float32():
    calls = []

    def to_bfloat16(args, *, dtype=None):
        calls.append((len(args), dtype))
        return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)

    bn = jaxrenorm.nnx.BatchNorm(3, promote_dtype=to_bfloat16, rngs=nnx.Rngs(0))
    y = bn(_batches(1, shape=(16, 3))[0])
    assert calls == [(5, None)]  # (x, mean, var, scale, bias), as Flax calls it
    assert y.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32


def test_parameter_metadata_shards_like_flax():
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    meta = {"out_sharding": ("model",)}
    with jax.set_mesh(mesh):
        theirs = nnx.BatchNorm(4, scale_metadata=meta, bias_metadata=meta, rngs=nnx.Rngs(0))
        ours = jaxrenorm.nnx.InstanceRenorm(
            4, scale_metadata=meta, bias_metadata=meta, rho_metadata=meta, rngs=nnx.Rngs(0)
        )
    specs = nnx.get_partition_spec(nnx.state(ours))
    flax_specs = nnx.get_partition_spec(nnx.state(theirs))
    for name in ("scale", "bias", "mean", "var"):
        assert specs[name].get_value() == flax_specs[name].get_value(), name
    assert specs["rho"].get_value() == P("model")
    assert ours.scale[...].sharding.spec == theirs.scale[...].sharding.spec == P("model")


# --- convert ---------------------------------------------------------------------


class _Block(nnx.Module):
    def __init__(self, features_in, rngs):
        self.conv = nnx.Conv(features_in, 4, (3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class _Zoo(nnx.Module):
    """A model as a zoo ships it: Flax's BatchNorm in a list, a dict and a shared layer."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.blocks = nnx.List([_Block(3, rngs), _Block(4, rngs)])
        self.heads = nnx.Dict({"logits": nnx.Linear(4, 5, rngs=rngs)})
        self.norms = nnx.Dict({"pre": nnx.BatchNorm(4, epsilon=1e-3, rngs=rngs)})
        self.last = self.norms["pre"]  # the same layer under two names

    def __call__(self, x):
        x = self.stem(x)
        x = self.blocks[1](self.blocks[0](x) - 1.0)  # block 1 sees block 0's output
        return self.heads["logits"](self.last(x).mean((1, 2)))


def _zoo_data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 2)) * 2 + 1, jnp.float32)
    return x, jnp.asarray(rng.integers(0, 5, size=8))


@nnx.jit
def _train_step(model, optimizer, x, labels):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads


@functools.cache
def _zoo_training():
    model = _Zoo(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for seed in range(3):
        _train_step(model, optimizer, *_zoo_data(seed))
    return model, optimizer


def _trained_zoo_model():
    """A fresh copy of a model (and its optimizer) trained for 3 steps with Flax's layer."""
    return tuple(nnx.clone(node) for node in _zoo_training())


def test_convert_flax_model_to_batch_norm_changes_no_output_or_training_step():
    model, optimizer = _trained_zoo_model()
    flax_model = nnx.clone(model)
    flax_optimizer = nnx.Optimizer(flax_model, optax.adam(1e-2), wrt=nnx.Param)
    nnx.update(flax_optimizer, nnx.clone(nnx.state(optimizer)))
    scale = model.blocks[0].norm.scale
    assert jaxrenorm.nnx.convert(model, to=jaxrenorm.nnx.BatchNorm) is model
    for norm in (model.blocks[0].norm, model.blocks[1].norm, model.norms["pre"]):
        assert type(norm) is jaxrenorm.nnx.BatchNorm
    assert model.last is model.norms["pre"] and model.last.epsilon == 1e-3
    assert model.blocks[0].norm.momentum == 0.8 and model.blocks[0].norm.scale is scale
    x, labels = _zoo_data(7)
    evaluate = lambda m: nnx.view(m, use_running_average=True)(x)  # noqa: E731
    np.testing.assert_allclose(evaluate(model), evaluate(flax_model), rtol=1e-6, atol=1e-6)
    # One more training step, with the optimizer built before the conversion.
    loss, grads = _train_step(model, optimizer, x, labels)
    loss_ref, grads_ref = _train_step(flax_model, flax_optimizer, x, labels)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_ref), atol=2e-5)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(flax_model)), atol=2e-5
    )


def test_convert_between_jaxrenorm_layers_carries_settings_and_variables():
    model, _ = _trained_zoo_model()
    x, _ = _zoo_data(8)
    y_eval = nnx.view(model, use_running_average=True)(x)
    r_max, d_max = jaxrenorm.schedules.scaled_paper_schedules(100)
    jaxrenorm.nnx.convert(model, r_max=r_max, d_max=d_max, virtual_batch_size=4)
    norm = model.blocks[1].norm
    assert type(norm) is jaxrenorm.nnx.BatchRenorm and norm.virtual_batch_size == 4
    assert norm.r_max is r_max and int(norm.steps[...]) == 0 and norm.momentum == 0.8
    np.testing.assert_allclose(nnx.view(model, use_running_average=True)(x), y_eval, atol=1e-6)
    model(x)  # a training call
    assert int(model.blocks[1].norm.steps[...]) == 1
    mean = model.blocks[1].norm.mean
    jaxrenorm.nnx.convert(model, to=jaxrenorm.nnx.InstanceRenorm, rngs=nnx.Rngs(3))
    norm = model.blocks[1].norm
    assert type(norm) is jaxrenorm.nnx.InstanceRenorm and norm.mean is mean
    assert int(norm.steps[...]) == 1 and norm.virtual_batch_size == 4  # carried over
    np.testing.assert_array_equal(norm.rho[...], 0.5)  # new: at its initial value
    # Back to Flax: the variables stay, jaxrenorm's own settings and variables go.
    jaxrenorm.nnx.convert(model, to=nnx.BatchNorm)
    assert type(model.blocks[1].norm) is nnx.BatchNorm and model.blocks[1].norm.mean is mean
    assert not hasattr(model.blocks[1].norm, "rho")


def test_converted_model_splits_merges_and_jits():
    model, _ = _trained_zoo_model()
    jaxrenorm.nnx.convert(model, to=jaxrenorm.nnx.BatchRenorm, r_max=1.5, d_max=0.5)
    graphdef, state = nnx.split(model)
    x, _ = _zoo_data(9)
    merged = nnx.merge(graphdef, state)
    y_ref = nnx.clone(model)(x)

    @nnx.jit
    def train_call(model, x):
        return model(x)

    np.testing.assert_allclose(train_call(merged, x), y_ref, rtol=1e-5, atol=1e-5)
    assert type(merged.last) is jaxrenorm.nnx.BatchRenorm and merged.last is merged.norms["pre"]


def test_convert_edge_cases():
    layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    new = jaxrenorm.nnx.convert(layer, to=jaxrenorm.nnx.BatchNorm)  # the model is the layer
    assert type(new) is jaxrenorm.nnx.BatchNorm and new.scale is layer.scale
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="no flax.nnx.BatchNorm"):
        assert jaxrenorm.nnx.convert(linear) is linear
    with pytest.raises(TypeError, match="`r_maxx`, which BatchRenorm does not take"):
        jaxrenorm.nnx.convert(layer, r_maxx=3.0)
    with pytest.raises(TypeError, match="`num_features`"):
        jaxrenorm.nnx.convert(layer, num_features=4)
    with pytest.raises(TypeError, match="`to` must be a batch normalization class"):
        jaxrenorm.nnx.convert(layer, to=nnx.LayerNorm)
