"""sbx's BatchRenorm layer replaced by jaxrenorm's (`jaxrenorm.interop.sbx_batch_renorm`).

The factory is checked against the float64 reference on both sides of the
warm-up switch. With the `rl` extra installed (sbx-rl, gymnasium), sbx's own
layer and its CrossQ agent are run too; without it those tests skip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm
from tests import reference

WARMUP, STEPS = 2, 4


def test_factory_is_batch_norm_then_renorm_against_the_reference():
    layer = jaxrenorm.interop.sbx_batch_renorm(use_running_average=False, warmup_steps=WARMUP)
    xs = [jax.random.normal(jax.random.key(i), (16, 3)) * 2 + 3 * i for i in range(STEPS)]
    variables = layer.init(jax.random.key(9), xs[0])
    params = variables["params"]
    mean, var = np.zeros(3), np.ones(3)
    apply = jax.jit(functools.partial(layer.apply, mutable=["batch_stats"]))
    for step, x in enumerate(xs):
        y, updates = apply(variables, x)
        bounds = (1.0, 0.0) if step < WARMUP else (3.0, 5.0)  # a hard switch, as in sbx
        ref = reference.normalize(
            x, params["scale"], params["bias"], mean, var, np.zeros(x.shape),
            momentum=0.99, eps=1e-3, r_max=bounds[0], d_max=bounds[1],
        )  # fmt: skip
        stats = updates["batch_stats"]
        np.testing.assert_allclose(y, ref.y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"], ref.new_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats["var"], ref.new_var, rtol=1e-5)
        assert int(stats["steps"]) == step + 1
        if step >= WARMUP:  # the statistics are far apart: renorm's correction is visible
            assert np.abs(ref.d).max() > 0.1
        variables = {"params": params, **updates}
        mean, var = ref.new_mean, ref.new_var


def test_factory_takes_sbx_arguments_and_refuses_others():
    layer = jaxrenorm.interop.sbx_batch_renorm(
        True, momentum=0.9, warmup_steps=5, axis=-1, use_scale=False, name="bn"
    )
    assert isinstance(layer, jaxrenorm.linen.BatchRenorm)
    assert (layer.momentum, layer.epsilon, layer.use_scale, layer.name) == (0.9, 1e-3, False, "bn")
    assert jaxrenorm.interop.sbx_batch_renorm(epsilon=1e-5).epsilon == 1e-5
    with pytest.raises(TypeError, match="`r_max`, `warmup`"):
        jaxrenorm.interop.sbx_batch_renorm(warmup=3, r_max=2.0)


# --- with sbx installed (the `rl` extra) -----------------------------------------


def _sbx_layers():
    return pytest.importorskip("sbx.common.jax_layers")


def test_sbx_checkpoint_evaluates_and_continues_in_jaxrenorm():
    sbx_layer = _sbx_layers().BatchRenorm(warmup_steps=WARMUP)
    xs = [jax.random.normal(jax.random.key(i), (32, 3)) * 2 + 1 for i in range(STEPS + 2)]
    variables = sbx_layer.init(jax.random.key(9), xs[0], use_running_average=False)
    for x in xs[:STEPS]:  # sbx trains past its warm-up
        _, updates = sbx_layer.apply(
            variables, x, use_running_average=False, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
    ours = jaxrenorm.interop.sbx_batch_renorm(warmup_steps=WARMUP)
    x = xs[STEPS]
    np.testing.assert_allclose(  # evaluation: the same function of the same variables
        ours.apply(variables, x, use_running_average=True),
        sbx_layer.apply(variables, x, use_running_average=True),
        rtol=1e-6,
        atol=1e-6,
    )
    y, updates = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["steps"]) == STEPS + 1  # the count carried over
    assert np.isfinite(y).all()
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(updates))


def test_crossq_trains_with_the_factory(monkeypatch):
    """A short CrossQ run on Pendulum-v1 with every sbx BatchRenorm replaced."""
    _sbx_layers()
    pytest.importorskip("gymnasium")
    from sbx import CrossQ
    from sbx.crossq import policies

    monkeypatch.setattr(policies, "BatchRenorm", jaxrenorm.interop.sbx_batch_renorm)
    model = CrossQ(
        "MlpPolicy",
        "Pendulum-v1",
        learning_starts=50,
        policy_kwargs={"renorm_warmup_steps": 40, "net_arch": {"pi": [32], "qf": [32]}},
        seed=0,
    )
    model.learn(total_timesteps=150)
    state = model.policy.qf_state
    assert "r_max" not in str(jax.tree_util.tree_structure(state.batch_stats))  # ours, not sbx's
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    assert all(np.isfinite(np.asarray(leaf, np.float64)).all() for leaf in leaves)
    steps = [s for path, s in jax.tree_util.tree_leaves_with_path(state.batch_stats)
             if jax.tree_util.keystr(path).endswith("['steps']")]  # fmt: skip
    assert steps and all(int(jnp.max(s)) >= 50 for s in steps)  # past the warm-up: renorm ran


def test_differences_from_sbx_are_those_documented():
    """Unclipped, jaxrenorm's training output is its inference output; sbx's is not.
    A feature constant over the batch gives sbx NaN input gradients, even in warm-up."""
    sbx_layer = _sbx_layers().BatchRenorm(warmup_steps=WARMUP)
    ours = jaxrenorm.interop.sbx_batch_renorm(warmup_steps=WARMUP)
    xs = [jax.random.normal(jax.random.key(i), (256, 8)) * 2 + 1 for i in range(12)]
    gaps = {}
    for name, layer in (("sbx", sbx_layer), ("jaxrenorm", ours)):
        variables = layer.init(jax.random.key(1), xs[0], use_running_average=False)
        for x in xs:  # past the warm-up, running statistics close to the batches'
            y, updates = layer.apply(
                variables, x, use_running_average=False, mutable=["batch_stats"]
            )
            inference = layer.apply(variables, x, use_running_average=True)
            variables = {**variables, **updates}
        gaps[name] = float(jnp.abs(y - inference).max())
        constant = xs[0].at[:, 0].set(1.0)
        fresh = layer.init(jax.random.key(1), constant, use_running_average=False)
        for state in (fresh, variables):  # in the warm-up and after it
            grad = jax.grad(
                lambda x, state=state, layer=layer: layer.apply(
                    state, x, use_running_average=False, mutable=["batch_stats"]
                )[0].sum()
            )(constant)
            assert np.isnan(grad).any() == (name == "sbx"), name
    assert gaps["jaxrenorm"] < 1e-5 < 1e-4 < gaps["sbx"], gaps
