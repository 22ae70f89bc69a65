"""jaxrenorm.linen against flax.linen.BatchNorm (the peer) and the float64 reference."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrenorm
from jaxrenorm._layers import Layer
from tests import reference

CONFIGS = [
    dict(shape=(16, 5)),
    dict(shape=(4, 6, 6, 3), momentum=0.9),
    dict(shape=(4, 3, 5, 5), axis=1, epsilon=1e-3),
    dict(shape=(6, 4, 5), axis=(1, 2)),
    dict(shape=(8, 3), use_bias=False),
    dict(shape=(8, 3), use_scale=False),
    dict(shape=(8, 3), use_bias=False, use_scale=False),
    dict(shape=(8, 3), dtype=jnp.bfloat16),
    dict(shape=(8, 3), param_dtype=jnp.bfloat16),
    dict(shape=(8, 3), force_float32_reductions=False, param_dtype=jnp.bfloat16),
]


def _split(config):
    config = dict(config)
    return config.pop("shape"), config


def _x(shape, seed=0, offset=0.5):
    return jax.random.normal(jax.random.key(seed), shape) * 2.0 + offset


def _randomize(variables, seed=1):
    """Non-trivial params and statistics, so equality of outputs means something."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 1.5)).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, new)


def _tol(config):
    low = jnp.bfloat16 in (config.get("dtype"), config.get("param_dtype"))
    return dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c))
def test_variables_match_flax(config):
    shape, kw = _split(config)
    x = _x(shape)
    ours = jaxrenorm.linen.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
    theirs = nn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
    chex.assert_trees_all_equal(ours, theirs, strict=True)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_apply_matches_flax(config, train):
    """A Flax checkpoint loads unchanged and gives the same outputs and updates."""
    shape, kw = _split(config)
    x = _x(shape, seed=2)
    theirs = nn.BatchNorm(use_fast_variance=False, **kw)  # Flax's accurate variance
    variables = _randomize(theirs.init(jax.random.key(0), x, use_running_average=False))
    y_ref, upd_ref = theirs.apply(
        variables, x, use_running_average=not train, mutable=["batch_stats"]
    )
    for fast in (True, False):
        ours = jaxrenorm.linen.BatchNorm(use_fast_variance=fast, **kw)
        y, upd = ours.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
        assert y.dtype == y_ref.dtype
        chex.assert_trees_all_close(y, y_ref, **_tol(config))
        chex.assert_trees_all_close(upd, upd_ref, **_tol(config))
        for a, b, v in zip(
            jax.tree.leaves(upd),
            jax.tree.leaves(upd_ref),
            jax.tree.leaves(variables["batch_stats"]),
            strict=True,
        ):
            # Flax promotes bfloat16 statistics to float32 on the first update (so the
            # next step retraces); ours keep the dtype they were created with.
            assert a.dtype == v.dtype
            assert a.dtype == b.dtype or kw.get("force_float32_reductions") is False


def test_mask_matches_flax():
    x = _x((12, 4), seed=3)
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (12, 4)).at[0].set(True)
    theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = _randomize(theirs.init(jax.random.key(0), x))
    y_ref, upd_ref = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    ours = jaxrenorm.linen.BatchNorm(use_running_average=False)
    y, upd = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    chex.assert_trees_all_close((y, upd), (y_ref, upd_ref), rtol=1e-5, atol=1e-5)


def test_complex_inputs_match_flax():
    k1, k2 = jax.random.split(jax.random.key(5))
    x = (jax.random.normal(k1, (16, 3)) + 1j * jax.random.normal(k2, (16, 3)) + 2 - 1j).astype(
        jnp.complex64
    )
    theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = theirs.init(jax.random.key(0), x)
    y_ref, upd_ref = theirs.apply(variables, x, mutable=["batch_stats"])
    y, upd = jaxrenorm.linen.BatchNorm(use_running_average=False).apply(
        variables, x, mutable=["batch_stats"]
    )
    assert y.dtype == y_ref.dtype
    chex.assert_trees_all_close((y, upd), (y_ref, upd_ref), rtol=1e-5, atol=1e-5)


def test_training_against_reference():
    x = _x((32, 6), seed=6, offset=3.0)
    bn = jaxrenorm.linen.BatchNorm(momentum=0.8)
    variables = _randomize(bn.init(jax.random.key(0), x, use_running_average=False))
    g = jax.random.normal(jax.random.key(7), x.shape)

    def loss(params, x):
        y, upd = bn.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * g), upd

    (_, upd), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    p, s = variables["params"], variables["batch_stats"]
    ref = reference.normalize(x, p["scale"], p["bias"], s["mean"], s["var"], g, momentum=0.8)
    np.testing.assert_allclose(dx, ref.dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], ref.dbias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref.new_var, rtol=1e-5)


def test_init_does_not_update_statistics_and_ignores_axis_name():
    x = _x((8, 3), offset=10.0)
    for module in (
        jaxrenorm.linen.BatchNorm(use_running_average=False, axis_name="batch"),
        jaxrenorm.linen.BatchRenorm(use_running_average=False, axis_name="batch"),
    ):
        variables = module.init(jax.random.key(0), x)  # no "batch" axis exists here
        np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
        np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
    assert int(variables["batch_stats"]["steps"]) == 0


def test_use_running_average_is_merged_like_flax():
    x = _x((4, 3))
    bn = jaxrenorm.linen.BatchNorm(use_running_average=True)
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        bn.apply(variables, x, use_running_average=False)
    with pytest.raises(ValueError, match="use_running_average"):
        jaxrenorm.linen.BatchNorm().apply(variables, x)


def test_eval_does_not_need_mutable_stats():
    x = _x((4, 3))
    for module in (jaxrenorm.linen.BatchNorm(), jaxrenorm.linen.BatchRenorm()):
        variables = module.init(jax.random.key(0), x, use_running_average=True)
        y = module.apply(variables, x, use_running_average=True)
        np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


# --- BatchRenorm ------------------------------------------------------------------


def test_batch_renorm_module_matches_reference():
    x = _x((16, 4), seed=8, offset=1.0)
    brn = jaxrenorm.linen.BatchRenorm(r_max=1.5, d_max=0.5, use_running_average=False)
    variables = _randomize(brn.init(jax.random.key(0), x))
    assert "steps" not in variables["batch_stats"]  # constant bounds need no counter
    y, upd = brn.apply(variables, x, mutable=["batch_stats"])
    p, s = variables["params"], variables["batch_stats"]
    ref = reference.normalize(
        x, p["scale"], p["bias"], s["mean"], s["var"], x, r_max=1.5, d_max=0.5
    )
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref.new_mean, rtol=2e-5)


def test_batch_renorm_steps_and_schedule():
    """`steps` counts training calls only; the bounds are the schedules' values at it."""
    x = _x((16, 4), seed=9, offset=1.0)
    r_sched = optax.linear_schedule(1.0, 2.0, transition_steps=4)
    d_sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    brn = jaxrenorm.linen.BatchRenorm(r_max=r_sched, d_max=d_sched, momentum=0.5)
    variables = brn.init(jax.random.key(0), x, use_running_average=False)
    assert variables["batch_stats"]["steps"].dtype == jnp.int32
    assert int(variables["batch_stats"]["steps"]) == 0

    step = jax.jit(functools.partial(brn.apply, use_running_average=False, mutable=["batch_stats"]))
    for t in range(6):
        stats = variables["batch_stats"]
        xt = x * (1 + 0.3 * t) + t
        y, upd = step(variables, xt)
        p = variables["params"]
        ref = reference.normalize(
            xt,
            p["scale"],
            p["bias"],
            stats["mean"],
            stats["var"],
            xt,
            momentum=0.5,
            r_max=float(r_sched(t)),
            d_max=float(d_sched(t)),
        )
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
        assert int(upd["batch_stats"]["steps"]) == t + 1
        variables = {"params": variables["params"], **upd}

    _y_eval, upd = brn.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["steps"]) == 6  # inference does not count


def test_paper_schedule_is_the_default_and_starts_as_batch_norm():
    x = _x((16, 4), seed=10, offset=2.0)
    brn = jaxrenorm.linen.BatchRenorm(use_running_average=False)
    assert brn.r_max is jaxrenorm.schedules.PAPER_R_MAX
    assert brn.d_max is jaxrenorm.schedules.PAPER_D_MAX
    variables = _randomize(brn.init(jax.random.key(0), x))
    variables["batch_stats"]["steps"] = jnp.int32(0)
    bn = jaxrenorm.linen.BatchNorm(use_running_average=False)
    bn_vars = {"params": variables["params"], "batch_stats": dict(variables["batch_stats"])}
    del bn_vars["batch_stats"]["steps"]
    y_brn, _ = brn.apply(variables, x, mutable=["batch_stats"])
    y_bn, _ = bn.apply(bn_vars, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_brn, y_bn, rtol=1e-6, atol=1e-6)


def test_class_relations_and_hooks_match_the_nnx_family():
    """BatchNorm <- BatchRenorm <- InstanceRenorm in every family, so `isinstance`
    answers alike; each answers the hooks of the contract with the same signatures;
    a BatchRenorm's fields are BatchNorm's followed by its own."""
    families = [jaxrenorm.linen, jaxrenorm.nnx]
    if importlib.util.find_spec("equinox") is not None:
        families.append(jaxrenorm.equinox)
    for family in families:
        assert family.BatchRenorm.__bases__ == (family.BatchNorm,)
        assert family.InstanceRenorm.__bases__ == (family.BatchRenorm,)
    members = vars(Layer).items()
    hooks = [n for n, m in members if inspect.isfunction(m) and not n.startswith("__")]
    assert hooks == ["_bounds", "_gate", "_record_input"]
    for name in hooks:
        expected = inspect.signature(getattr(Layer, name))
        for family in families:
            assert inspect.signature(getattr(family.BatchNorm, name)) == expected, name
    # What a training call records besides the statistics: written back by the Flax
    # families, returned in the new state by Equinox's.
    for family in (jaxrenorm.linen, jaxrenorm.nnx):
        assert list(inspect.signature(family.BatchNorm._after_training_call).parameters) == [
            "self",
            "terms",
        ]
    fields = lambda cls: [f.name for f in dataclasses.fields(cls)]  # noqa: E731
    machinery = ["parent", "name"]  # Flax's, last in every module
    bn = fields(jaxrenorm.linen.BatchNorm)[: -len(machinery)]
    assert fields(jaxrenorm.linen.BatchRenorm)[: len(bn)] == bn


def test_every_setting_of_the_pure_function_is_a_layer_setting_in_both_families():
    """The glue reads settings by name, so an option added to `batch_renorm` must be
    a linen field and an NNX constructor argument of the same name and default (the
    layers list them in source so that pyright and IDEs see them; this ties them)."""
    from tests.test_nnx import _constructor_parameters

    pure = inspect.signature(jaxrenorm.batch_renorm).parameters
    per_call = {"x", "params", "batch_stats", "mask"}
    layer_defaults = {"use_running_average", "r_max", "d_max"}  # None/False, schedules
    linen = {f.name: f.default for f in dataclasses.fields(jaxrenorm.linen.BatchRenorm)}
    nnx_args = {k: p.default for k, p in _constructor_parameters(jaxrenorm.nnx.BatchRenorm).items()}
    for name, parameter in pure.items():
        if name in per_call:
            continue
        assert name in linen, f"linen.BatchRenorm lacks `{name}`"
        assert name in nnx_args, f"nnx.BatchRenorm lacks `{name}`"
        if name not in layer_defaults:
            assert linen[name] == parameter.default, name
            assert nnx_args[name] == parameter.default, name
    for name in ("r_max", "d_max"):
        assert linen[name] is nnx_args[name], name
    shared = set(linen) & set(nnx_args)
    assert all(linen[n] == nnx_args[n] for n in shared - {"use_running_average"}), shared


def test_float64_statistics_are_one_argument_in_every_family():
    """With x64 enabled, float64 running statistics (`batch_stats_dtype`, or the
    dtype given to `init_batch_stats`) make inference on offset float64 data as
    accurate as float64 allows; the default keeps them float32 (about 1e-4 here)."""
    from flax import nnx

    rng = np.random.default_rng(3)
    x_np = 1e4 + rng.normal(size=(64, 3)) * rng.uniform(0.5, 2.0, 3)
    mean, var = x_np.mean(0), x_np.var(0)
    want = (x_np - mean) / np.sqrt(var + 1e-5)  # momentum 0: running = batch statistics

    def error(y):
        return np.max(np.abs(np.asarray(y, np.float64) - want))

    with jax.enable_x64(True):
        x = jnp.asarray(x_np)  # float64
        stats = jaxrenorm.init_batch_stats(3, jnp.float64)
        _, stats = jaxrenorm.batch_norm(x, None, stats, use_running_average=False, momentum=0.0)
        y_pure, _ = jaxrenorm.batch_norm(x, None, stats, use_running_average=True)

        def linen(dtype):
            bn = jaxrenorm.linen.BatchNorm(momentum=0.0, batch_stats_dtype=dtype)
            v = bn.init(jax.random.key(0), x, use_running_average=True)
            _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            return bn.apply({**v, **upd}, x, use_running_average=True), upd["batch_stats"]

        def nnx_layer(dtype):
            layer = jaxrenorm.nnx.BatchNorm(
                3, momentum=0.0, batch_stats_dtype=dtype, rngs=nnx.Rngs(0)
            )
            layer(x)
            return layer(x, use_running_average=True), {"mean": layer.mean[...]}

        results = {"pure": (y_pure, stats)}
        for name, family in (("linen", linen), ("nnx", nnx_layer)):
            results[name] = family(jnp.float64)
            y32, stats32 = family(None)
            assert stats32["mean"].dtype == jnp.float32, name  # the default, by design
            assert error(y32) > 1e-6, name
        for name, (y, s) in results.items():
            assert s["mean"].dtype == jnp.float64 and y.dtype == jnp.float64, name
            assert error(y) <= 1e-9, (name, error(y))


def test_modules_train_in_a_model():
    """A small MLP with each module trains (loss falls) under jit with optax."""

    class MLP(nn.Module):
        norm: type

        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(16)(x)
            x = self.norm(use_running_average=not train)(x)
            return nn.Dense(1)(nn.relu(x))

    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4)).astype(np.float32) * 5 + 20
    Y = (X[:, :1] - 20) ** 2 / 25
    for norm in (
        jaxrenorm.linen.BatchNorm,
        functools.partial(jaxrenorm.linen.BatchRenorm, r_max=2.0, d_max=1.0),
    ):
        model = MLP(norm)
        variables = model.init(jax.random.key(0), X, train=False)
        tx = optax.adam(1e-2)
        opt = tx.init(variables["params"])

        @jax.jit
        def step(params, stats, opt, model=model, tx=tx):
            def loss_fn(params):
                pred, upd = model.apply(
                    {"params": params, "batch_stats": stats}, X, train=True, mutable=["batch_stats"]
                )
                return jnp.mean((pred - Y) ** 2), upd["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt)
            return optax.apply_updates(params, updates), stats, opt, loss

        params, stats = variables["params"], variables["batch_stats"]
        losses = []
        for _ in range(60):
            params, stats, opt, loss = step(params, stats, opt)
            losses.append(float(loss))
        assert losses[-1] < 0.2 * losses[0], losses[::10]
        eval_pred = model.apply({"params": params, "batch_stats": stats}, X, train=False)
        assert np.all(np.isfinite(eval_pred))


def test_default_module_is_accurate_on_offset_data():
    """The module's default variance on x = 1e4 + N(0, 1) in float32, from the first call.

    flax.linen.BatchNorm's default (E[x^2] - E[x]^2) has a relative variance error of
    about 25 here and an output standard deviation of about 234 (REFERENCES.md).
    """
    x = 1e4 + jax.random.normal(jax.random.key(11), (64, 8, 8, 4))
    for module in (
        jaxrenorm.linen.BatchNorm(momentum=0.0),
        jaxrenorm.linen.BatchRenorm(momentum=0.0),  # the paper's schedule: BN at first
    ):
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        true_var = np.asarray(x, np.float64).reshape(-1, 4).var(0)
        rel = np.abs(np.asarray(upd["batch_stats"]["var"], np.float64) / true_var - 1)
        assert rel.max() <= 1e-3
        np.testing.assert_allclose(np.asarray(y).reshape(-1, 4).std(0), 1.0, rtol=1e-2)


@pytest.mark.parametrize("grad_through", [True, False, "adaptive"])
def test_modules_with_virtual_batches_match_reference(grad_through):
    x = _x((12, 3, 3, 2), seed=12, offset=1.0)
    g = jax.random.normal(jax.random.key(13), x.shape)
    for module, kw in (
        (jaxrenorm.linen.BatchNorm(virtual_batch_size=4), {}),
        (
            jaxrenorm.linen.BatchRenorm(
                virtual_batch_size=4,
                r_max=1.4,
                d_max=0.4,
                grad_through_batch_moments=grad_through,
            ),
            {"r_max": 1.4, "d_max": 0.4, "grad_through_batch_moments": grad_through},
        ),
    ):
        variables = _randomize(module.init(jax.random.key(0), x, use_running_average=False))

        def loss(x, params, module=module, variables=variables):
            y, upd = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * g), (y, upd)

        (_, (y, upd)), (dx, dp) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            x, variables["params"]
        )
        p, s = variables["params"], variables["batch_stats"]
        ref = reference.normalize(
            x, p["scale"], p["bias"], s["mean"], s["var"], g, virtual_batch_size=4, **kw
        )
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(upd["batch_stats"]["var"], ref.new_var, rtol=2e-5)
        np.testing.assert_allclose(dx, ref.dx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dp["scale"], ref.dscale, rtol=1e-4, atol=1e-4)


# --- InstanceRenorm ---------------------------------------------------------------


def test_instance_renorm_module_trains_like_the_reference():
    """Variables, three training steps (outputs, statistics, gradients) and inference."""
    x0 = _x((4, 5, 5, 3), seed=14)
    layer = jaxrenorm.linen.InstanceRenorm(r_max=1.5, d_max=0.5, momentum=0.8)
    variables = layer.init(jax.random.key(0), x0, use_running_average=False)
    assert jax.tree.map(jnp.shape, variables) == {
        "params": {"scale": (3,), "bias": (3,), "rho": (3,)},
        "batch_stats": {"mean": (3,), "var": (3,)},
    }
    np.testing.assert_array_equal(variables["params"]["rho"], [0.5, 0.5, 0.5])
    variables = _randomize(variables)
    params = {**variables["params"], "rho": jnp.asarray([0.0, 0.3, 1.0])}
    stats = variables["batch_stats"]

    def loss(params, stats, x, g):
        y, upd = layer.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * g), (y, upd["batch_stats"])

    step = jax.jit(jax.value_and_grad(loss, (0, 2), has_aux=True))
    for i in range(3):
        x = _x((4, 5, 5, 3), seed=20 + i, offset=i)
        g = jax.random.normal(jax.random.key(30 + i), x.shape)
        (_, (y, new_stats)), (dp, dx) = step(params, stats, x, g)
        p = params
        ref = reference.instance_renorm(
            x,
            p["scale"],
            p["bias"],
            p["rho"],
            stats["mean"],
            stats["var"],
            g,
            momentum=0.8,
            r_max=1.5,
            d_max=0.5,
        )
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new_stats["mean"], ref.new_mean, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(new_stats["var"], ref.new_var, rtol=2e-5)
        np.testing.assert_allclose(dx, ref.dx, rtol=1e-4, atol=1e-4)
        for name, want in [("scale", ref.dscale), ("bias", ref.dbias), ("rho", ref.drho)]:
            np.testing.assert_allclose(dp[name], want, rtol=1e-4, atol=1e-4, err_msg=name)
        stats = new_stats
    x = _x((2, 5, 5, 3), seed=40)
    y = layer.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    p, s = params, stats
    ref = reference.instance_renorm(
        x, p["scale"], p["bias"], p["rho"], s["mean"], s["var"], x, train=False
    )
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)


def test_instance_renorm_module_ends_and_errors():
    x = _x((4, 3, 5, 5), seed=15)  # NCHW
    brn = jaxrenorm.linen.BatchRenorm(axis=1)
    irn = jaxrenorm.linen.InstanceRenorm(axis=1, rho_init=nn.initializers.ones)
    v_brn = brn.init(jax.random.key(0), x, False)
    v_irn = irn.init(jax.random.key(0), x, False)
    assert int(v_irn["batch_stats"]["steps"]) == 0  # the paper's schedule by default
    for i in range(2):  # rho = 1: BatchRenorm, step by step (statistics and `steps`)
        xi = _x(x.shape, seed=16 + i, offset=i)
        y_brn, upd_brn = brn.apply(v_brn, xi, False, mutable=["batch_stats"])
        y_irn, upd_irn = irn.apply(v_irn, xi, False, mutable=["batch_stats"])
        np.testing.assert_allclose(y_irn, y_brn, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(upd_irn, upd_brn, rtol=1e-6, atol=1e-6)
        v_brn, v_irn = {**v_brn, **upd_brn}, {**v_irn, **upd_irn}
    # rho = 0: instance normalization, the same in training and inference.
    v0 = {**v_irn, "params": {**v_irn["params"], "rho": jnp.zeros(3)}}
    xd = np.asarray(x, np.float64)
    mu, var = xd.mean((2, 3), keepdims=True), xd.var((2, 3), keepdims=True)
    want = (xd - mu) / np.sqrt(var + 1e-5)
    for train in (True, False):
        y = irn.apply(v0, x, not train, mutable=["batch_stats"])[0]
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"spatial axis.*\(8, 3\)"):
        jaxrenorm.linen.InstanceRenorm().init(jax.random.key(0), jnp.ones((8, 3)), False)


def test_scheduled_training_step_traces_once():
    """`steps` is a traced counter: the bounds move every step without recompiling."""
    r_sched = optax.linear_schedule(1.0, 2.0, transition_steps=6)
    d_sched = optax.linear_schedule(0.0, 1.0, transition_steps=6)
    brn = jaxrenorm.linen.BatchRenorm(r_max=r_sched, d_max=d_sched, diagnostics=True)
    x = _x((16, 3), seed=11, offset=2.0)
    variables = brn.init(jax.random.key(0), x, use_running_average=False)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, batch_stats, opt_state, x):
        def loss(params):
            y, state = brn.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                use_running_average=False,
                mutable=["batch_stats", "intermediates"],
            )
            return jnp.mean((y - 1.0) ** 2), state

        grads, state = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        d_mean_abs = jaxrenorm.collect_diagnostics(state)["d_mean_abs"]
        return optax.apply_updates(params, updates), state["batch_stats"], opt_state, d_mean_abs

    chex.clear_trace_counter()
    params, batch_stats = variables["params"], variables["batch_stats"]
    d_used = []
    for _ in range(6):
        params, batch_stats, opt_state, d_mean_abs = step(params, batch_stats, opt_state, x)
        d_used.append(float(d_mean_abs))
    assert int(batch_stats["steps"]) == 6
    assert d_used[0] == 0.0 and d_used[-1] > 0.0  # d_max = 0 at step 0 only
