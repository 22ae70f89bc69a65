"""batch_norm / batch_renorm / init_batch_stats against the float64 reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import jaxrenorm
from jaxrenorm import init_batch_stats as init_stats
from tests import reference
from tests.harness import assert_matches, data, run, run_affine

SHAPES_AXES = [
    ((16, 5), -1),
    ((4, 6, 6, 3), -1),
    ((4, 3, 5, 5), 1),  # NCHW
    ((6, 4, 5), (1, 2)),  # two feature axes
    ((3, 7, 2), (0, -1)),  # non-contiguous feature axes
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "two_pass"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_matches_reference(shape, axis, train, fast):
    x, scale, bias, mean, var, g = data(shape, axis, offset=3.0)
    got = run_affine(
        jaxrenorm.batch_norm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=not train,
        axis=axis,
        momentum=0.9,
        use_fast_variance=fast,
    )
    ref = reference.normalize(x, scale, bias, mean, var, g, axis=axis, train=train, momentum=0.9)
    assert_matches(got, ref)


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize(("r_max", "d_max"), [(1.0, 0.0), (1.2, 0.3), (3.0, 5.0), (100.0, 100.0)])
def test_batch_renorm_matches_reference(shape, axis, r_max, d_max):
    x, scale, bias, mean, var, g = data(shape, axis, seed=1, offset=1.0)
    got = run_affine(
        jaxrenorm.batch_renorm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        axis=axis,
        r_max=r_max,
        d_max=d_max,
    )
    ref = reference.normalize(
        x, scale, bias, mean, var, g, axis=axis, train=True, r_max=r_max, d_max=d_max
    )
    assert_matches(got, ref)


def test_renorm_clipping_is_exercised():
    """The parametrized cases above really mix clipped and unclipped features."""
    x, scale, bias, mean, var, g = data((16, 5), -1, seed=1, offset=1.0)
    ref = reference.normalize(x, scale, bias, mean, var, g, r_max=1.2, d_max=0.3)
    assert np.any(np.abs(ref.r - 1.2) < 1e-12) or np.any(np.abs(ref.r - 1 / 1.2) < 1e-12)
    assert np.any((ref.r > 1 / 1.2) & (ref.r < 1.2))
    assert np.any(np.abs(np.abs(ref.d) - 0.3) < 1e-12)
    assert np.any(np.abs(ref.d) < 0.3)


def test_renorm_unclipped_training_output_equals_inference_output():
    """With loose bounds, training already computes what inference will: (x - mu) / s."""
    x, scale, bias, mean, var, _ = data((32, 4), -1, seed=3)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    xj = jnp.asarray(x, jnp.float32)
    y_train, _ = jaxrenorm.batch_renorm(
        xj, params, stats, use_running_average=False, r_max=1e6, d_max=1e6
    )
    y_eval, _ = jaxrenorm.batch_renorm(xj, params, stats, use_running_average=True)
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)


def test_inference_returns_stats_unchanged():
    x, _scale, _bias, mean, var, _ = data((8, 3), -1)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    for fn in (jaxrenorm.batch_norm, jaxrenorm.batch_renorm):
        _, new = fn(jnp.asarray(x), {}, stats, use_running_average=True)
        assert new["mean"] is stats["mean"] and new["var"] is stats["var"]


def test_params_are_optional():
    x, _, _, mean, var, g = data((10, 3), -1)
    ones, zeros = np.ones(3), np.zeros(3)
    ref = reference.normalize(x, ones, zeros, mean, var, g)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    for params in (None, {}, {"scale": None, "bias": None}):
        y, _ = jaxrenorm.batch_norm(jnp.asarray(x), params, stats, use_running_average=False)
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)


def test_extra_batch_stats_keys_are_kept():
    stats = {**jaxrenorm.init_batch_stats(3), "steps": jnp.int32(7)}
    _, new = jaxrenorm.batch_renorm(jnp.ones((4, 3)), {}, stats, use_running_average=False)
    assert int(new["steps"]) == 7


# --- numerics -------------------------------------------------------------------


def test_offset_data_is_accurate_from_the_first_call():
    """x = 1e4 + N(0, 1) in float32: Flax's default variance is off by ~2,700%."""
    x = 1e4 + jax.random.normal(jax.random.key(0), (256, 16, 16, 8))
    true_var = np.asarray(x, np.float64).reshape(-1, 8).var(0)
    stats = jaxrenorm.init_batch_stats(8)
    for fast in (True, False):
        y, new = jaxrenorm.batch_norm(
            x, {}, stats, use_running_average=False, momentum=0.0, use_fast_variance=fast
        )
        rel = np.abs(np.asarray(new["var"], np.float64) - true_var) / true_var
        assert rel.max() <= 1e-3, rel.max()
        std = np.asarray(y, np.float64).reshape(-1, 8).std(0)
        np.testing.assert_allclose(std, 1.0, rtol=1e-2)
    # The renorm path is just as accurate: with identity bounds it is BatchNorm.
    y, new = jaxrenorm.batch_renorm(
        x, {}, stats, use_running_average=False, momentum=0.0, r_max=1.0, d_max=0.0
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8).std(0), 1.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
    x64 = np.random.default_rng(0).normal(size=(64, 8)) * 3 + 100
    x = jnp.asarray(x64, dtype)
    stats = jaxrenorm.init_batch_stats(8)
    y, new = jaxrenorm.batch_norm(x, {}, stats, use_running_average=False, momentum=0.0)
    assert y.dtype == dtype
    assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
    # Statistics of the rounded input, computed in float32, not in `dtype`.
    ref_mean, ref_var, _ = reference.moments(np.asarray(x, np.float64), (0,))
    np.testing.assert_allclose(new["var"], ref_var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(new["mean"], ref_mean.ravel(), rtol=1e-6)
    y32, _ = jaxrenorm.batch_norm(x, {}, stats, use_running_average=False, dtype=jnp.float32)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y32).std(0), 1.0, rtol=1e-3)


# --- masks ----------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(12, 1), (12, 4), (1, 4), (4,)])
@pytest.mark.parametrize("renorm", [False, True])
def test_mask_matches_reference(mask_shape, renorm):
    rng = np.random.default_rng(4)
    x, scale, bias, mean, var, g = data((12, 4), -1, seed=4, offset=2.0)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0] = True
    kw = {"r_max": 1.5, "d_max": 0.5} if renorm else {}
    fn = jaxrenorm.batch_renorm if renorm else jaxrenorm.batch_norm
    got = run_affine(fn, x, scale, bias, mean, var, g, use_running_average=False, mask=mask, **kw)
    ref = reference.normalize(x, scale, bias, mean, var, g, mask=mask, **kw)
    assert_matches(got, ref)


def test_jit_with_traced_bounds():
    """r_max / d_max may be traced scalars, e.g. a schedule evaluated inside jit."""
    x, scale, bias, mean, var, g = data((16, 5), -1, seed=7, offset=1.0)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    @jax.jit
    def step(x, params, stats, t):
        sched = jaxrenorm.schedules.r_max_schedule(final=1.2, begin=0, end=10)
        return jaxrenorm.batch_renorm(
            x, params, stats, use_running_average=False, r_max=sched(t), d_max=0.3 * t / 10
        )

    y, new = step(jnp.asarray(x, jnp.float32), params, stats, 10)
    ref = reference.normalize(x, scale, bias, mean, var, g, r_max=1.2, d_max=0.3)
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5)


def test_vmap_ensemble_keeps_separate_statistics():
    """vmap over a leading member axis: each member has its own batch and running stats."""
    x, scale, bias, mean, var, g = data((3, 12, 4), -1, seed=8, offset=1.0)
    stats = {
        "mean": jnp.asarray(np.stack([mean * (i + 1) for i in range(3)]), jnp.float32),
        "var": jnp.asarray(np.stack([var] * 3), jnp.float32),
    }
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    def member(x, stats):
        return jaxrenorm.batch_renorm(
            x, params, stats, use_running_average=False, r_max=1.5, d_max=0.5
        )

    y, new = jax.jit(jax.vmap(member))(jnp.asarray(x, jnp.float32), stats)
    for i in range(3):
        ref = reference.normalize(
            x[i], scale, bias, stats["mean"][i], var, g[i], r_max=1.5, d_max=0.5
        )
        np.testing.assert_allclose(y[i], ref.y, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new["mean"][i], ref.new_mean, rtol=2e-5, atol=2e-6)


def test_grad_under_jit_matches_reference():
    x, scale, bias, mean, var, g = data((6, 5, 5, 4), -1, seed=9, offset=-4.0)
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}

    @jax.jit
    def loss(x, params):
        y, _ = jaxrenorm.batch_renorm(
            x, params, stats, use_running_average=False, r_max=1.3, d_max=0.2
        )
        return jnp.sum(y * g)

    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    dx, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x, jnp.float32), params)
    ref = reference.normalize(x, scale, bias, mean, var, g, r_max=1.3, d_max=0.2)
    np.testing.assert_allclose(dx, ref.dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["bias"], ref.dbias, rtol=1e-4, atol=1e-4)


def test_running_update_carries_no_gradient():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    stats = jaxrenorm.init_batch_stats(3)

    def f(x):
        _, new = jaxrenorm.batch_norm(x, {}, stats, use_running_average=False)
        return new["mean"].sum() + new["var"].sum()

    np.testing.assert_array_equal(jax.grad(f)(x), 0.0)


# --- init_batch_stats -----------------------------------------------------------


def test_init_batch_stats():
    stats = jaxrenorm.init_batch_stats((2, 3))
    assert stats["mean"].shape == (2, 3) and stats["var"].shape == (2, 3)
    assert stats["mean"].dtype == jnp.float32
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)
    assert jaxrenorm.init_batch_stats(4, jnp.float16)["var"].dtype == jnp.float16


# --- virtual batches and grad_through_batch_moments -------------------------------


VIRTUAL_CASES = [
    ((8, 3), -1, 2),
    ((8, 3), -1, 4),
    ((8, 3), -1, 8),  # one group: plain BatchNorm
    ((12, 4, 4, 2), -1, 3),
    ((8, 3, 2, 2), 1, 4),  # NCHW
    ((8, 3, 5), (1, 2), 2),
]


@pytest.mark.parametrize(("shape", "axis", "v"), VIRTUAL_CASES)
@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_virtual_batches_match_reference(shape, axis, v, kind):
    x, scale, bias, mean, var, g = data(shape, axis, seed=11, offset=2.0)
    kw = {"r_max": 1.4, "d_max": 0.4} if kind == "brn" else {}
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    got = run_affine(
        fn,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        axis=axis,
        virtual_batch_size=v,
        momentum=0.9,
        **kw,
    )
    ref = reference.normalize(
        x, scale, bias, mean, var, g, axis=axis, momentum=0.9, virtual_batch_size=v, **kw
    )
    assert_matches(got, ref)


@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_virtual_batches_with_masks_per_group(kind):
    """Unequal valid counts per group, and one group with no valid row (holding NaN)."""
    x, scale, bias, mean, var, g = data((12, 3), -1, seed=12, offset=1.0)
    mask = np.ones((12, 1), bool)
    mask[[1, 2, 7]] = False
    mask[8:12] = False  # the last group of 4 is empty
    x_bad = x.copy()
    x_bad[8:12] = np.nan
    g = g * mask
    kw = {"r_max": 1.4, "d_max": 0.4} if kind == "brn" else {}
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    y, new, dx, dparams = run_affine(
        fn,
        x_bad,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        virtual_batch_size=4,
        mask=mask,
        **kw,
    )
    ref = reference.normalize(x, scale, bias, mean, var, g, mask=mask, virtual_batch_size=4, **kw)
    valid = mask[:, 0]
    np.testing.assert_allclose(np.asarray(y)[valid], ref.y[valid], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-5)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(dx)[valid], ref.dx[valid], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
    for leaf in (y, dx, *dparams.values(), new["mean"], new["var"]):
        assert np.all(np.isfinite(leaf))


def test_virtual_batches_have_no_effect_at_inference():
    x, scale, bias, mean, var, g = data((8, 3), -1, seed=13)
    a = run_affine(jaxrenorm.batch_norm, x, scale, bias, mean, var, g, use_running_average=True)
    b = run_affine(
        jaxrenorm.batch_norm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=True,
        virtual_batch_size=3,  # would not even divide
    )
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(virtual_batch_size=3), r"`virtual_batch_size`=3 does not divide the batch size 8"),
        (dict(virtual_batch_size=0), r"`virtual_batch_size` must be a positive int"),
        (dict(virtual_batch_size=2, axis=0), r"axis 0.*feature axis"),
    ],
)
def test_virtual_batch_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        jaxrenorm.batch_norm(
            jnp.ones((8, 4)),
            {},
            jaxrenorm.init_batch_stats(4 if "axis" not in kwargs else 8),
            use_running_average=False,
            **kwargs,
        )


@pytest.mark.parametrize(("shape", "axis", "v"), [((16, 5), -1, None), ((8, 3, 2, 2), 1, 4)])
def test_renorm_without_gradient_through_batch_moments(shape, axis, v):
    x, scale, bias, mean, var, g = data(shape, axis, seed=14, offset=1.0)
    kw = dict(r_max=1.4, d_max=0.4, axis=axis, virtual_batch_size=v)
    got = run_affine(
        jaxrenorm.batch_renorm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        grad_through_batch_moments=False,
        **kw,
    )
    ref = reference.normalize(x, scale, bias, mean, var, g, grad_through_batch_moments=False, **kw)
    assert_matches(got, ref)
    # The forward pass is that of the paper's version.
    paper = reference.normalize(x, scale, bias, mean, var, g, **kw)
    np.testing.assert_allclose(got.y, paper.y, rtol=2e-5, atol=2e-5)
    assert not np.allclose(ref.dx, paper.dx, atol=1e-3)


@pytest.mark.parametrize(("shape", "axis"), [((16, 6), -1), ((12, 4, 2, 2), 1)])
def test_adaptive_moment_gradient_matches_reference(shape, axis):
    x, scale, bias, mean, var, g = data(shape, axis, seed=15, offset=1.0)
    # Groups of 4 examples; on half the features each group has an offset of its own
    # (as when each group holds one class), the other half are i.i.d.
    fa, _ = reference.split_axes(len(shape), axis)
    spread = np.zeros(shape)
    own = np.repeat(np.random.default_rng(16).normal(size=shape[0] // 4) * 4, 4)
    index = [slice(None)] * len(shape)
    index[fa[0]] = slice(0, shape[fa[0]] // 2)
    spread[tuple(index)] = own.reshape((-1,) + (1,) * (len(shape) - 1))
    x = x + spread
    kw = dict(r_max=1.4, d_max=0.4, axis=axis, virtual_batch_size=4)
    got = run_affine(
        jaxrenorm.batch_renorm,
        x,
        scale,
        bias,
        mean,
        var,
        g,
        use_running_average=False,
        grad_through_batch_moments="adaptive",
        **kw,
    )
    weight = reference._adaptive_weight(x, None, 4, dict(axis=axis, eps=1e-5))
    assert weight.min() < 1e-3 and weight.max() > 0.2  # both kinds of groups are there
    ref = reference.normalize(
        x, scale, bias, mean, var, g, grad_through_batch_moments="adaptive", **kw
    )
    assert_matches(got, ref)


def test_adaptive_moment_gradient_is_the_paper_s_with_one_group():
    x, scale, bias, mean, var, g = data((16, 5), -1, seed=17, offset=1.0)
    kw = dict(r_max=1.4, d_max=0.4, use_running_average=False)
    fn = jaxrenorm.batch_renorm
    adaptive = run_affine(
        fn, x, scale, bias, mean, var, g, grad_through_batch_moments="adaptive", **kw
    )
    paper = run_affine(fn, x, scale, bias, mean, var, g, **kw)
    np.testing.assert_array_equal(adaptive.dx, paper.dx)


# --- forward mode ---------------------------------------------------------------


def _scalar_loss(kind, scale, bias, mean, var, g, **kw):
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    extra = {"r_max": 1.4, "d_max": 0.4} if kind == "brn" else {}
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    def loss(x):
        y, _ = fn(x, params, stats, use_running_average=False, **extra, **kw)
        return jnp.sum(y * jnp.asarray(g, jnp.float32))

    return loss, extra


@pytest.mark.parametrize("kind", ["bn", "brn"])
@pytest.mark.parametrize("kw", [{}, {"virtual_batch_size": 3}, {"use_fast_variance": False}])
def test_forward_mode_jvp_and_jacfwd_match_reference(kind, kw):
    x, scale, bias, mean, var, g = data((6, 4), -1, seed=15, offset=1.5)
    loss, extra = _scalar_loss(kind, scale, bias, mean, var, g, **kw)
    vsize = kw.get("virtual_batch_size")
    ref = reference.normalize(x, scale, bias, mean, var, g, virtual_batch_size=vsize, **extra)
    direction = np.random.default_rng(16).normal(size=x.shape)
    xj = jnp.asarray(x, jnp.float32)
    _, tangent = jax.jvp(loss, (xj,), (jnp.asarray(direction, jnp.float32),))
    np.testing.assert_allclose(tangent, np.sum(ref.dx * direction), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jacfwd(loss)(xj), ref.dx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_hessian_matches_finite_differences_of_the_reference_gradient(kind):
    x, scale, bias, mean, var, g = data((4, 2), -1, seed=17, offset=0.5)
    # r and d are constants for differentiation (stop_gradient); finite differences
    # of the reference see them move unless they are clipped, so clip them all.
    mean, var = mean + 10.0, var * 100.0
    loss, extra = _scalar_loss(kind, scale, bias, mean, var, g)
    hess = np.asarray(jax.hessian(loss)(jnp.asarray(x, jnp.float32))).reshape(8, 8)
    h = 1e-6
    fd = np.zeros((8, 8))
    for i in range(8):
        e = np.zeros(8)
        e[i] = h
        plus = reference.normalize(x + e.reshape(x.shape), scale, bias, mean, var, g, **extra)
        minus = reference.normalize(x - e.reshape(x.shape), scale, bias, mean, var, g, **extra)
        fd[:, i] = ((plus.dx - minus.dx) / (2 * h)).ravel()
    np.testing.assert_allclose(hess, fd, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_half_precision_gradients_match_reference(dtype, kind):
    """Gradients of a float16/bfloat16 input, against the reference on the rounded input."""
    x, scale, bias, mean, var, g = data((16, 4, 4, 3), -1, seed=18, offset=3.0)
    x_low = jnp.asarray(x, dtype)
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    kw = {"r_max": 1.4, "d_max": 0.4} if kind == "brn" else {}
    stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}

    def loss(x, params):
        y, _ = fn(x, params, stats, use_running_average=False, dtype=jnp.float32, **kw)
        return jnp.sum(y * jnp.asarray(g, jnp.float32))

    dx, dp = jax.grad(loss, argnums=(0, 1))(x_low, params)
    assert dx.dtype == dtype
    ref = reference.normalize(np.asarray(x_low, np.float64), scale, bias, mean, var, g, **kw)
    # The only rounding the float32 computation cannot undo is dx's own, to `dtype`.
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref.dx, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(dp["scale"], ref.dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["bias"], ref.dbias, rtol=1e-4, atol=1e-4)


# --- bessel_correction (PyTorch's running variance) ------------------------------


@pytest.mark.parametrize(
    "kw",
    [{}, {"virtual_batch_size": 4}, {"axis": 1}],
    ids=["plain", "virtual", "nchw"],
)
@pytest.mark.parametrize("kind", ["bn", "brn"])
def test_bessel_correction_matches_reference(kind, kw):
    shape = (8, 3, 2, 2) if kw.get("axis") == 1 else (8, 3)
    x, scale, bias, mean, var, g = data(shape, kw.get("axis", -1), seed=19, offset=1.0)
    mask = np.ones((8,) + (1,) * (len(shape) - 1), bool)
    mask[[2, 5, 6]] = False  # unequal valid counts per virtual group
    extra = {"r_max": 1.4, "d_max": 0.4} if kind == "brn" else {}
    fn = jaxrenorm.batch_renorm if kind == "brn" else jaxrenorm.batch_norm
    got = run_affine(
        fn,
        x,
        scale,
        bias,
        mean,
        var,
        g * mask,
        use_running_average=False,
        mask=mask,
        bessel_correction=True,
        momentum=0.9,
        **kw,
        **extra,
    )
    ref = reference.normalize(
        x,
        scale,
        bias,
        mean,
        var,
        g * mask,
        mask=mask,
        bessel_correction=True,
        momentum=0.9,
        **kw,
        **extra,
    )
    assert_matches(got, ref)
    plain = reference.normalize(x, scale, bias, mean, var, g * mask, mask=mask, momentum=0.9, **kw)
    assert not np.allclose(ref.new_var, plain.new_var)  # the option does something


def test_bessel_correction_with_one_valid_element_stays_finite():
    stats = jaxrenorm.init_batch_stats(2)
    mask = jnp.asarray([[True], [False]])  # n = 1: no n / (n - 1)
    _, new = jaxrenorm.batch_norm(
        jnp.ones((2, 2)), {}, stats, use_running_average=False, bessel_correction=True, mask=mask
    )
    np.testing.assert_allclose(new["var"], 0.99)


# --- one value per feature --------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kw"),
    [((1, 3), {}), ((1, 1, 1, 3), {}), ((8, 3), {"virtual_batch_size": 1})],
    ids=["dense", "1x1-conv", "virtual"],
)
@pytest.mark.parametrize("fn", [jaxrenorm.batch_norm, jaxrenorm.batch_renorm])
def test_one_value_per_feature_is_refused_in_training_only(fn, shape, kw):
    """Its statistics would be the value itself: y = bias, and the variance decays to 0."""
    x, stats = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape), init_stats(3)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: .*shape \({shape[0]}, .*one value"):
        jax.jit(lambda x: fn(x, {}, stats, use_running_average=False, **kw))(x)
    fn(x, {}, stats, use_running_average=True, **kw)  # inference: any batch


def test_one_value_per_feature_counts_devices_and_spatial_axes():
    stats = init_stats(3)
    x = jnp.arange(24.0).reshape(8, 1, 3)  # one example on each of 8 devices: 8 values
    y, new = jax.vmap(
        lambda x: jaxrenorm.batch_norm(x, {}, stats, use_running_average=False, axis_name="d"),
        axis_name="d",
    )(x)
    np.testing.assert_allclose(new["mean"][0], 0.01 * x.reshape(8, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(y.reshape(8, 3).mean(0), 0.0, atol=1e-5)  # global statistics
    images = jnp.arange(48.0).reshape(4, 2, 2, 3)  # groups of 1 image, 4 positions each
    jaxrenorm.batch_norm(images, {}, stats, use_running_average=False, virtual_batch_size=1)
    with pytest.raises(ValueError, match="one example on the 1 device along 'd'"):
        jax.vmap(
            lambda x: jaxrenorm.batch_norm(x, {}, stats, use_running_average=False, axis_name="d"),
            axis_name="d",
        )(jnp.ones((1, 1, 3)))
    # Groups of devices: the smallest decides (a group of one device holds one value).
    with pytest.raises(ValueError, match="one example on the 1 device along 'd'"):
        jax.pmap(
            lambda x: jaxrenorm.batch_norm(
                x,
                {},
                stats,
                use_running_average=False,
                axis_name="d",
                axis_index_groups=[[1, 2, 3, 4, 5, 6, 7], [0]],
            ),
            axis_name="d",
        )(x)


def test_modules_refuse_one_value_per_feature_but_linen_initializes_with_one():
    x = jnp.ones((1, 3))
    bn = jaxrenorm.linen.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)  # Flax models are built with a batch of one
    with pytest.raises(ValueError, match="BatchNorm: a training call"):
        bn.apply(variables, x, mutable=["batch_stats"])
    layer = jaxrenorm.nnx.BatchRenorm(3, r_max=1.5, d_max=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BatchRenorm: a training call"):
        layer(x)
    layer(x, use_running_average=True)


# --- the same numbers compiled and op by op ---------------------------------------


class JitAndEagerTest(chex.TestCase):
    """Each public function against the reference, under `jax.jit` and without it."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("bn", "brn", "irn")
    def test_training_and_inference_match_reference(self, kind):
        x, scale, bias, mean, var, g = data((6, 3, 3, 4), -1, seed=20, offset=1.5)
        mask = np.random.default_rng(21).random((6, 3, 3, 1)) < 0.8
        mask[0] = True
        rho = np.linspace(0.2, 0.9, 4)
        bounds = {} if kind == "bn" else {"r_max": 1.3, "d_max": 0.3}
        fn = {
            "bn": jaxrenorm.batch_norm,
            "brn": jaxrenorm.batch_renorm,
            "irn": jaxrenorm.instance_renorm,
        }[kind]
        params = {"scale": scale, "bias": bias} | ({"rho": rho} if kind == "irn" else {})
        params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
        stats = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
        for train in (True, False):
            call = self.variant(
                lambda x, mask, train=train: fn(
                    x, params, stats, use_running_average=not train, mask=mask, **bounds
                )
            )
            y, new = call(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
            kw = dict(train=train, mask=mask, **bounds)
            if kind == "irn":
                ref = reference.instance_renorm(x, scale, bias, rho, mean, var, g, **kw)
            else:
                ref = reference.normalize(x, scale, bias, mean, var, g, **kw)
            np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5, atol=2e-5)


# --- padded sequences: the shift is each group's first valid element --------------

PADDED_KINDS = {
    "bn": (jaxrenorm.batch_norm, {}),
    "brn": (jaxrenorm.batch_renorm, {"r_max": 1.5, "d_max": 0.5}),
    "irn": (jaxrenorm.instance_renorm, {"r_max": 1.5, "d_max": 0.5}),
}


def padded(padding: str, n: int = 8, length: int = 6, features: int = 3, seed: int = 30):
    """Offset sequences (1e4 + N(0, 1)), half of each row masked on the left or the right."""
    rng = np.random.default_rng(seed)
    x = np.float32(1e4 + rng.normal(size=(n, length, features))).astype(np.float64)
    positions = np.arange(length).reshape(1, length, 1)
    mask = positions >= length // 2 if padding == "left" else positions < length // 2
    mask = np.broadcast_to(mask, (n, length, 1))
    params = {"scale": rng.uniform(0.5, 1.5, features), "bias": rng.normal(size=features)}
    stats = {"mean": np.zeros(features), "var": np.ones(features)}  # a first call
    return x, mask, params, stats, rng.normal(size=x.shape) * mask


def padded_reference(kind, x, mask, params, stats, g, **kw):
    kw = PADDED_KINDS[kind][1] | kw
    if kind == "irn":
        p = params
        return reference.instance_renorm(
            x, p["scale"], p["bias"], p["rho"], *stats.values(), g, mask=mask, **kw
        )
    return reference.normalize(
        x, params["scale"], params["bias"], *stats.values(), g, mask=mask, **kw
    )


def assert_padded_matches(got, ref, mask, stats=slice(None)):
    """The variance to 1e-3 from the first call; y, dx and the param gradients.

    float32 holds 1e4 only to 1e-3, so where the shift is far from the data (the
    running mean across devices) y and dx are accurate to about 1e-3 of the std;
    the param gradients sum that over the valid elements. `stats` selects the new
    statistics to compare (per device, for local virtual groups).
    """
    valid = np.broadcast_to(mask, ref.y.shape)
    new_var = np.asarray(got.new["var"], np.float64)[stats]
    rel = np.abs(new_var - ref.new_var) / ref.new_var
    assert rel.max() <= 1e-3, rel.max()  # the textbook formula is off by thousands of %
    np.testing.assert_allclose(np.asarray(got.new["mean"])[stats], ref.new_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.y)[valid], ref.y[valid], atol=5e-3)
    np.testing.assert_allclose(np.asarray(got.dx)[valid], ref.dx[valid], atol=5e-3)
    sum_tol = 5e-3 * valid.sum() / valid.shape[-1]
    for name, grad in got.dparams.items():
        np.testing.assert_allclose(grad, getattr(ref, f"d{name}"), atol=sum_tol, err_msg=name)


@pytest.mark.parametrize("virtual", [None, 2], ids=["batch", "virtual"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", PADDED_KINDS)
def test_padded_sequences_keep_the_variance_accurate(kind, padding, virtual):
    x, mask, params, stats, g = padded(padding)
    if kind == "irn":
        params["rho"] = np.array([0.2, 0.5, 0.9])
    kw = dict(momentum=0.0, virtual_batch_size=virtual)
    fn, extra = PADDED_KINDS[kind]
    got = run(fn, x, params, stats, g, use_running_average=False, mask=mask, **kw, **extra)
    assert_padded_matches(got, padded_reference(kind, x, mask, params, stats, g, **kw), mask)
