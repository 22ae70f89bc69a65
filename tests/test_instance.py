"""instance_renorm against the float64 reference: both ends of the gate, gradients, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm
from tests import reference
from tests.harness import assert_matches, run

CASES = [
    ((4, 5, 5, 3), -1),  # NHWC
    ((4, 3, 5, 6), 1),  # NCHW
    ((6, 7, 4), -1),  # one spatial axis (sequences)
]


def _data(shape, axis, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    fa, _ = reference.split_axes(len(shape), axis)
    fshape = tuple(shape[a] for a in fa)
    # Examples differ in offset and spread, so instance and batch statistics differ.
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    x = x + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) + offset
    params = {
        "scale": rng.uniform(0.5, 1.5, size=fshape),
        "bias": rng.normal(size=fshape),
        "rho": rng.uniform(0.0, 1.0, size=fshape),
    }
    stats = {"mean": rng.normal(size=fshape) + offset, "var": rng.uniform(0.5, 4.0, size=fshape)}
    g = rng.normal(size=shape)
    return x, params, stats, g


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _run(x, params, stats, g, **kw):
    return run(jaxrenorm.instance_renorm, x, params, stats, g, **kw)


def _reference(x, params, stats, g, **kw):
    p = params
    return reference.instance_renorm(
        x, p["scale"], p["bias"], p["rho"], stats["mean"], stats["var"], g, **kw
    )


@pytest.mark.parametrize(("shape", "axis"), CASES)
@pytest.mark.parametrize(
    "mode",
    ["eval", "train", "train_clipped", "two_pass", "no_grad_through_moments"],
)
def test_matches_reference(shape, axis, mode):
    x, params, stats, g = _data(shape, axis, seed=1, offset=2.0)
    bounds = {"r_max": 1.2, "d_max": 0.3} if mode == "train_clipped" else {"r_max": 5.0}
    bounds.setdefault("d_max", 5.0)
    kw = dict(axis=axis, momentum=0.9, **bounds)
    if mode == "no_grad_through_moments":
        kw["grad_through_batch_moments"] = False
    got = _run(
        x,
        params,
        stats,
        g,
        use_running_average=mode == "eval",
        use_fast_variance=mode != "two_pass",
        **kw,
    )
    ref = _reference(x, params, stats, g, train=mode != "eval", **kw)
    if mode == "train_clipped":  # the bounds really are active on some features
        assert np.any(np.abs(ref.d) == 0.3) or np.any(ref.r == 1.2) or np.any(ref.r == 1 / 1.2)
    assert_matches(got, ref)


def test_adaptive_moment_gradient_matches_reference():
    x, params, stats, g = _data((8, 3, 3, 4), -1, seed=3, offset=2.0)
    x = x + np.repeat([0.0, 4.0], 4).reshape(8, 1, 1, 1) * (np.arange(4) < 2)  # two kinds
    kw = dict(r_max=1.5, d_max=0.5, virtual_batch_size=4, grad_through_batch_moments="adaptive")
    got = _run(x, params, stats, g, use_running_average=False, **kw)
    assert_matches(got, _reference(x, params, stats, g, **kw))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_rho_one_is_batch_renorm_and_rho_zero_is_instance_norm(train):
    x, params, stats, g = _data((4, 5, 5, 3), -1, seed=2, offset=1.0)
    kw = dict(use_running_average=not train, r_max=1.5, d_max=0.5)
    ones = {**params, "rho": np.ones(3)}
    y, new, dx, _ = _run(x, ones, stats, g, **kw)
    brn = jax.vjp(
        lambda x: jaxrenorm.batch_renorm(
            x,
            {"scale": jnp.asarray(params["scale"], jnp.float32), "bias": params["bias"]},
            {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()},
            **kw,
        ),
        jnp.asarray(x, jnp.float32),
        has_aux=True,
    )
    np.testing.assert_allclose(y, brn[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["mean"], brn[2]["mean"], rtol=1e-6)
    np.testing.assert_allclose(new["var"], brn[2]["var"], rtol=1e-6)
    np.testing.assert_allclose(dx, brn[1](jnp.asarray(g, jnp.float32))[0], rtol=1e-5, atol=1e-6)

    # rho = 0: each example normalized over its own spatial positions, then scale and bias.
    zeros = {**params, "rho": np.zeros(3)}
    got = _run(x, zeros, stats, g, **kw)
    ref = _reference(x, zeros, stats, g, train=train, r_max=1.5, d_max=0.5)
    assert_matches(got, ref)
    mu, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    instance = (x - mu) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]
    np.testing.assert_allclose(got[0], instance, rtol=2e-5, atol=2e-5)


def test_inference_output_of_an_example_ignores_the_rest_of_the_batch():
    x, params, stats, _ = _data((6, 4, 4, 3), -1, seed=3)
    other = np.random.default_rng(4).normal(size=x.shape) * 10 + 5
    run = lambda x: jaxrenorm.instance_renorm(x, params, stats, use_running_average=True)[0]  # noqa: E731
    mixed = np.concatenate([x[:2], other[2:]])
    np.testing.assert_allclose(run(mixed)[:2], run(x)[:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("v", [2, 6])
def test_virtual_batches_match_reference(v):
    x, params, stats, g = _data((6, 4, 5, 3), -1, seed=5, offset=1.0)
    kw = dict(momentum=0.9, r_max=1.3, d_max=0.4, virtual_batch_size=v)
    got = _run(x, params, stats, g, use_running_average=False, **kw)
    assert_matches(got, _reference(x, params, stats, g, **kw))


def test_mask_with_non_finite_masked_values():
    """Masked positions (holding NaN/Inf) reach neither statistics nor gradients."""
    x, params, stats, g = _data((5, 4, 4, 2), -1, seed=6, offset=1.0)
    mask = np.random.default_rng(7).random((5, 4, 4, 1)) < 0.7
    mask[:, 0, 0] = False  # every example's first position: the shifts must not come from it
    x_bad = np.where(mask, x, np.nan)
    x_bad[1, 0, 0, 0] = np.inf
    g = g * mask
    kw = dict(r_max=1.5, d_max=0.5, mask=mask)
    got = _run(x_bad, params, stats, g, use_running_average=False, **kw)
    ref = _reference(x, params, stats, g, **kw)
    full = np.broadcast_to(mask, x.shape)
    y, new, dx, dparams = got
    np.testing.assert_allclose(np.asarray(y)[full], ref.y[full], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx)[full], ref.dx[full], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=2e-5, atol=2e-5)
    for name, want in [("scale", ref.dscale), ("bias", ref.dbias), ("rho", ref.drho)]:
        np.testing.assert_allclose(dparams[name], want, rtol=1e-4, atol=1e-4, err_msg=name)
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(leaf))


def test_an_example_without_valid_elements_takes_the_batch_branch():
    """Example 1 fully masked: its outputs are the batch branch's (the reference's
    definition), at the scale of the valid outputs in float32, bfloat16 and float16
    (not (x - k) / sqrt(epsilon), ~1,500 here), and a masked loss has finite
    gradients; the valid examples are unaffected."""
    x, params, stats, g = _data((4, 3, 3, 2), -1, seed=11)
    x = x * 3 + 40.0  # float16 overflows (x - k) / sqrt(epsilon) at this offset
    stats = {"mean": stats["mean"] + 40.0, "var": stats["var"] * 9}
    mask = np.ones((4, 1, 1, 1), bool)
    mask[1] = False
    g = g * mask
    kw = dict(r_max=1.5, d_max=0.5, mask=mask)
    for train in (True, False):
        ref = _reference(x, params, stats, g, train=train, **kw)
        y, *_ = _run(x, params, stats, g, use_running_average=not train, **kw)
        np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5, err_msg=f"train={train}")
    ref = _reference(x, params, stats, g, **kw)
    _, _, dx, dparams = _run(x, params, stats, g, use_running_average=False, **kw)
    np.testing.assert_allclose(dx, ref.dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["rho"], ref.drho, rtol=1e-4, atol=1e-4)

    valid_scale = np.max(np.abs(ref.y[mask[:, 0, 0, 0]]))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):

        def loss(x, p, dtype=dtype):
            y, _ = jaxrenorm.instance_renorm(x, p, _f32(stats), use_running_average=False, **kw)
            return jnp.sum(jnp.where(mask, y, 0).astype(jnp.float32) * g), y

        xd = jnp.asarray(x, dtype)
        (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(xd, _f32(params))
        assert y.dtype == dtype
        assert np.max(np.abs(np.asarray(y[1], np.float32))) <= 2 * valid_scale, dtype
        for leaf in jax.tree.leaves(grads):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32))), dtype


def test_offset_examples_with_small_instance_spread_are_accurate():
    """Per-example shifts: each example sits far from the others, with tiny spread.

    A shift common to the batch would put (mean_i - k)^2 / var_i ~ 1e7 into the
    instance variance's cancellation; each example's own shift does not.
    """
    rng = np.random.default_rng(8)
    x = 1e4 + 10.0 * rng.normal(size=(4, 1, 1, 2)) + 0.01 * rng.normal(size=(4, 6, 6, 2))
    params = {"rho": np.array([0.0, 0.3]), "scale": np.ones(2), "bias": np.zeros(2)}
    stats = {"mean": np.full(2, 1e4), "var": np.full(2, 100.0)}
    g = rng.normal(size=x.shape)
    y, new, _, _ = _run(x, params, stats, g, use_running_average=False, r_max=3.0, d_max=5.0)
    ref = _reference(x, params, stats, g, r_max=3.0, d_max=5.0)
    # float32 holds 1e4 to 1e-3: 10% of the spread, so the reference sees the rounded x.
    ref_rounded = _reference(np.float32(x), params, stats, g, r_max=3.0, d_max=5.0)
    np.testing.assert_allclose(y, ref_rounded.y, rtol=0, atol=2e-3)
    np.testing.assert_allclose(new["var"], ref.new_var, rtol=1e-5)
    np.testing.assert_allclose(new["mean"], ref.new_mean, rtol=1e-7)


def test_gate_is_clipped_and_its_gradient_never_sticks():
    x, params, stats, g = _data((4, 3, 3, 4), -1, seed=9)
    kw = dict(use_running_average=False, r_max=1.5, d_max=0.5)
    outside = {**params, "rho": np.array([1.3, -0.2, 1.0, 0.0])}
    inside = {**params, "rho": np.array([1.0, 0.0, 1.0, 0.0])}
    y_out, _, _, d_out = _run(x, outside, stats, g, **kw)
    y_in, _, _, d_in = _run(x, inside, stats, g, **kw)
    np.testing.assert_array_equal(y_out, y_in)
    # At the bounds the gradient is the unclipped one; outside it passes only inward.
    ref = _reference(x, inside, stats, g, r_max=1.5, d_max=0.5)
    np.testing.assert_allclose(d_in["rho"], ref.drho, rtol=1e-4, atol=1e-4)
    for i, rho in enumerate([1.3, -0.2]):
        descent_moves_inward = (rho > 1 and ref.drho[i] > 0) or (rho < 0 and ref.drho[i] < 0)
        want = ref.drho[i] if descent_moves_inward else 0.0
        np.testing.assert_allclose(d_out["rho"][i], want, rtol=1e-4, atol=1e-4)
    # Flipping the upstream gradient flips which side is "inward".
    _, _, _, d_flip = _run(x, outside, stats, -g, **kw)
    assert (d_out["rho"][:2] == 0).tolist() == (d_flip["rho"][:2] != 0).tolist()


def test_jit_and_forward_mode_in_x():
    x, params, stats, g = _data((4, 3, 3, 2), -1, seed=10, offset=1.0)
    ref = _reference(x, params, stats, g, r_max=1.5, d_max=0.5)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}

    @jax.jit
    def loss(x):
        y, _ = jaxrenorm.instance_renorm(
            x, params, stats, use_running_average=False, r_max=1.5, d_max=0.5
        )
        return jnp.sum(y * g)

    direction = np.random.default_rng(11).normal(size=x.shape)
    _, tangent = jax.jvp(loss, (jnp.asarray(x, jnp.float32),), (jnp.asarray(direction),))
    np.testing.assert_allclose(tangent, np.sum(ref.dx * direction), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "axis", "params", "pattern"),
    [
        ((8, 3), -1, {"rho": np.ones(3)}, r"spatial axis.*\(8, 3\)"),
        ((4, 5, 3), 0, {"rho": np.ones(4)}, r"axis 0 as the batch axis.*axis=0"),
        ((4, 5, 3), (0, -1), {"rho": np.ones((4, 3))}, r"spatial axis"),
        ((4, 5, 3), -1, {"rho": np.ones(5)}, r'params\["rho"\]` has shape \(5,\)'),
        ((4, 5, 3), -1, {"scale": np.ones(3)}, r'"rho"'),
    ],
)
def test_errors(shape, axis, params, pattern):
    stats = jaxrenorm.init_batch_stats(shape[axis] if isinstance(axis, int) else (4, 3))
    with pytest.raises(ValueError, match=pattern):
        jaxrenorm.instance_renorm(
            jnp.ones(shape), params, stats, use_running_average=False, axis=axis
        )
