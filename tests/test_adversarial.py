"""Adversarial inputs: each a named test.

Outputs, gradients and running statistics stay finite unless the input itself is
not finite in a valid position; then the loss shows NaN but the running
statistics of the affected features keep their previous values.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm
from tests import reference
from tests.harness import data, run, run_affine

KINDS = {
    "bn": jaxrenorm.batch_norm,
    "brn": functools.partial(jaxrenorm.batch_renorm, r_max=3.0, d_max=5.0),
    "irn": functools.partial(jaxrenorm.instance_renorm, r_max=3.0, d_max=5.0),
}


def _train(fn, x, params, stats, g, **kw):
    """`run` of a training call."""
    return run(fn, x, params, stats, g, use_running_average=False, **kw)


def _params(c, kind):
    p = {"scale": jnp.ones(c), "bias": jnp.zeros(c)}
    return {**p, "rho": jnp.full(c, 0.5)} if kind == "irn" else p


def _assert_finite(*trees):
    for leaf in jax.tree.leaves(trees):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), leaf


@pytest.mark.parametrize("kind", KINDS)
def test_constant_features(kind):
    """Zero variance (per batch and per instance): finite output and gradients, var decays.

    BatchNorm outputs the bias; renorm adds d = clip((mean_B - mean) / s, +-d_max),
    here +-5 against the initial statistics, and InstanceRenorm half of that.
    """
    x = jnp.full((4, 3, 3, 2), 7.0).at[..., 1].set(-1e3)
    stats = jaxrenorm.init_batch_stats(2)
    y, new, *grads = _train(KINDS[kind], x, _params(2, kind), stats, jnp.ones(x.shape))
    _assert_finite(y, new, grads)
    d = {"bn": 0.0, "brn": 5.0, "irn": 2.5}[kind]
    np.testing.assert_allclose(y, jnp.broadcast_to(jnp.asarray([d, -d]), x.shape), atol=1e-6)
    np.testing.assert_allclose(new["mean"], [0.07, -10.0], rtol=1e-6)
    np.testing.assert_allclose(new["var"], 0.99, rtol=1e-6)


@pytest.mark.parametrize("magnitude", [1e15, 1e-20])
@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_extreme_magnitudes_in_float32(kind, magnitude):
    """1e15 (squares near 1e30, still finite) and 1e-20 (variance below float32's normals)."""
    x, scale, bias, mean, var, g = data((16, 3), -1, seed=3)
    x = x * magnitude
    stats = {"mean": mean * magnitude, "var": var * magnitude**2}
    kw = {"r_max": 3.0, "d_max": 5.0} if kind == "brn" else {}
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    y, new, dx, dparams = run_affine(
        fn, x, scale, bias, *stats.values(), g, use_running_average=False, **kw
    )
    _assert_finite(y, dx, dparams)
    ref = reference.normalize(x, scale, bias, *stats.values(), g, **kw)
    np.testing.assert_allclose(y, ref.y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=1e-5, atol=1e-45)
    if magnitude > 1:
        np.testing.assert_allclose(new["var"], ref.new_var, rtol=1e-4)
    else:  # ~1e-40 is subnormal in float32, and XLA flushes subnormals to 0
        np.testing.assert_allclose(new["var"], ref.new_var, rtol=0, atol=2e-40)


def test_bfloat16_with_offsets():
    """bf16 holds 100 + N(0, 1) to 0.5: statistics of the rounded data, computed in f32."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(100 + rng.normal(size=(64, 4)), jnp.bfloat16)
    xr = np.asarray(x, np.float64)  # what the layer actually sees
    stats = {"mean": jnp.full(4, 100.0), "var": jnp.ones(4)}
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    for kind in ("bn", "brn"):
        y, new, *grads = _train(KINDS[kind], x, _params(4, kind), stats, g)
        assert y.dtype == jnp.bfloat16 and new["var"].dtype == jnp.float32
        _assert_finite(y, new, grads)
        kw = {"r_max": 3.0, "d_max": 5.0} if kind == "brn" else {}
        ref = reference.normalize(xr, np.ones(4), np.zeros(4), *stats.values(), g, **kw)
        np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=1e-6)
        np.testing.assert_allclose(new["var"], ref.new_var, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref.y, atol=0.02)  # bf16 output


@pytest.mark.parametrize("kind", KINDS)
def test_zero_size_batch_leaves_stats_unchanged(kind):
    x = jnp.zeros((0, 3, 2))
    stats = {"mean": jnp.full(2, 0.5), "var": jnp.full(2, 2.0)}
    y, new, *grads = _train(KINDS[kind], x, _params(2, kind), stats, jnp.zeros(x.shape))
    assert y.shape == x.shape
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    np.testing.assert_array_equal(new["var"], stats["var"])
    _assert_finite(grads)


@pytest.mark.parametrize("kind", ["brn", "irn"])
def test_huge_bounds_make_training_equal_inference(kind):
    """r_max = d_max = 1e30: never clipped, so training's output is inference's."""
    x, scale, _, mean, var, g = data((8, 3, 4), -1, seed=5, offset=3.0)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    params = {**_params(4, kind), "scale": jnp.asarray(scale, jnp.float32)}
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.instance_renorm
    y, new, *grads = _train(
        functools.partial(fn, r_max=1e30, d_max=1e30), jnp.asarray(x), params, stats, g
    )
    _assert_finite(y, new, grads)
    y_eval, _ = fn(jnp.asarray(x), params, stats, use_running_average=True)
    np.testing.assert_allclose(y, y_eval, rtol=1e-5, atol=1e-5)


def test_virtual_batch_equal_to_the_batch_is_plain_batch_norm():
    x, scale, bias, mean, var, g = data((8, 3, 2), -1, seed=6, offset=1.0)
    for fn, kw in [(jaxrenorm.batch_norm, {}), (jaxrenorm.batch_renorm, {"r_max": 1.5})]:
        plain = run_affine(fn, x, scale, bias, mean, var, g, use_running_average=False, **kw)
        one_group = run_affine(
            fn, x, scale, bias, mean, var, g, use_running_average=False, virtual_batch_size=8, **kw
        )
        chex.assert_trees_all_equal(plain, one_group)


def test_renorm_with_identity_bounds_equals_batch_norm():
    x, scale, bias, mean, var, g = data((8, 4, 4, 6), -1, seed=2)
    bn = run_affine(jaxrenorm.batch_norm, x, scale, bias, mean, var, g, use_running_average=False)
    brn = run_affine(
        jaxrenorm.batch_renorm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        r_max=1.0,
        d_max=0.0,
    )
    chex.assert_trees_all_close(bn, brn, rtol=1e-6, atol=1e-6)


def test_one_valid_element_per_feature_is_finite():
    """A mask can leave one valid element (data: not refusable at trace time)."""
    x = jnp.asarray([[1.0, -2.0, 3.0], [7.0, 8.0, 9.0]])
    mask = jnp.asarray([[True], [False]])
    stats = jaxrenorm.init_batch_stats(3)
    params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    for fn in (jaxrenorm.batch_norm, functools.partial(jaxrenorm.batch_renorm, r_max=3.0)):

        def loss(x, params, fn=fn):
            y, _ = fn(x, params, stats, use_running_average=False, mask=mask)
            return jnp.sum(y * jnp.arange(1.0, 4.0))

        y, new = fn(x, params, stats, use_running_average=False, mask=mask)
        grads = jax.grad(loss, argnums=(0, 1))(x, params)
        for leaf in [y, *jax.tree.leaves(new), *jax.tree.leaves(grads)]:
            assert np.all(np.isfinite(leaf))
        np.testing.assert_allclose(new["var"], 0.99 * 1.0)  # var_B = 0


def test_non_finite_batch_keeps_previous_running_stats():
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    x[3, 1] = np.nan
    x[5, 2] = np.inf
    stats = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}
    for fn in (jaxrenorm.batch_norm, jaxrenorm.batch_renorm):
        y, new = fn(jnp.asarray(x), {}, stats, use_running_average=False)
        assert np.isnan(np.asarray(y)[:, 1]).all()  # the loss shows the problem
        np.testing.assert_array_equal(np.asarray(new["mean"])[[1, 2]], [0.5, 0.5])
        np.testing.assert_array_equal(np.asarray(new["var"])[[1, 2]], [2.0, 2.0])
        with np.errstate(invalid="ignore"):
            ref = reference.normalize(x, np.ones(4), np.zeros(4), stats["mean"], stats["var"], x)
        np.testing.assert_allclose(np.asarray(new["mean"])[[0, 3]], ref.new_mean[[0, 3]], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(new["var"])[[0, 3]], ref.new_var[[0, 3]], rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_masked_non_finite_values_do_not_leak(fast):
    x, scale, bias, mean, var, g = data((10, 3), -1, seed=5)
    mask = np.ones((10, 1), bool)
    mask[[0, 4, 7]] = False  # the first row too: the shift must not come from it
    x_bad = x.copy()
    x_bad[0, 0], x_bad[4, 1], x_bad[7] = np.nan, np.inf, -np.inf
    g = g * mask  # the loss ignores the masked rows
    for fn, kw in [
        (jaxrenorm.batch_norm, {}),
        (jaxrenorm.batch_renorm, {"r_max": 1.5, "d_max": 0.5}),
    ]:
        ref = reference.normalize(x, scale, bias, mean, var, g, mask=mask, **kw)
        y, new, dx, dparams = run_affine(
            fn,
            x_bad,
            scale,
            bias,
            mean,
            var,
            g,
            use_running_average=False,
            mask=mask,
            use_fast_variance=fast,
            **kw,
        )
        valid = mask[:, 0]
        np.testing.assert_allclose(np.asarray(y)[valid], ref.y[valid], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-5)
        np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5)
        for leaf in (y, dx, *dparams.values()):
            assert np.all(np.isfinite(leaf))
        np.testing.assert_allclose(dparams["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dparams["bias"], ref.dbias, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dx)[valid], ref.dx[valid], rtol=1e-4, atol=1e-4)


def test_everything_masked_leaves_stats_unchanged():
    x = jnp.full((6, 3), jnp.nan)
    stats = {"mean": jnp.full(3, 0.25), "var": jnp.full(3, 4.0)}
    for fn in (jaxrenorm.batch_norm, jaxrenorm.batch_renorm):
        y, new = fn(x, {}, stats, use_running_average=False, mask=jnp.zeros((6, 1), bool))
        np.testing.assert_array_equal(new["mean"], stats["mean"])
        np.testing.assert_array_equal(new["var"], stats["var"])
        assert np.all(np.isfinite(y))
    mean, var = jaxrenorm.moments(x, 0, mask=jnp.zeros((6, 3), bool))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 0.0)
