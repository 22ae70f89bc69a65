"""The stages of the pure normalization (`jaxrenorm._norm`), each against tests/reference.py.

The public functions are the stages chained; testing each stage on its own says
which one is wrong when a public test fails, and lets a new option be tested
where it acts.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import jaxrenorm
from jaxrenorm import _norm
from jaxrenorm._checks import check_layout
from tests import reference, roundoff
from tests.harness import data

# Round-off-sensitive: .ci/run runs this file again with XLA:CPU limited to AVX2.
pytestmark = pytest.mark.roundoff

SHAPE, AXIS = (6, 4, 5, 3), -1  # (N, H, W, C): spatial axes for the instance branch


def _moments_close(got, want):
    """float32 moments against float64 ones: the round-off of sums of 6 x 4 x 5 values."""
    roundoff.assert_close(got, want, terms=6 * 4 * 5, ulps=1)


def _stage_inputs(instance=False, seed=0, **options):
    """A case's reference inputs and the records the stages take."""
    x, scale, bias, mean, var, g = data(SHAPE, AXIS, seed=seed, offset=2.0)
    rho = np.random.default_rng(seed).uniform(0, 1, size=SHAPE[-1])
    xj, layout = check_layout(jnp.asarray(x, jnp.float32), AXIS)
    options = _norm.Options(use_running_average=False, instance=instance, **options)
    plan = _norm._plan(layout, options, xj.dtype)
    values = _norm.PerFeature(
        *(jnp.asarray(v, jnp.float32) for v in (mean, var, scale, bias)),
        gate=jnp.asarray(rho, jnp.float32) if instance else None,
    )
    per_feature = _norm._broadcast(values, layout, plan.dtype)
    return (x, scale, bias, mean, var, g, rho), (xj, plan, values, per_feature)


def _mask(seed=1):
    mask = np.random.default_rng(seed).random((SHAPE[0], 4, 5, 1)) < 0.7
    mask[0, 0, 0] = True
    return mask


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_moments(fast, masked):
    (x, *_), (xj, plan, _, per_feature) = _stage_inputs(use_fast_variance=fast)
    mask = _mask() if masked else None
    moments, parts = _norm._batch_moments(plan, xj, per_feature.mean, mask)
    assert parts is None
    mean, var, count = reference.moments(x, (0, 1, 2), mask)
    _moments_close(moments.mean, mean)
    _moments_close(moments.var, var)
    np.testing.assert_array_equal(moments.count, count)


def test_batch_moments_merged_from_each_example():
    (x, *_), (xj, plan, _, per_feature) = _stage_inputs(instance=True)
    mask = _mask()
    moments, parts = _norm._batch_moments(plan, xj, per_feature.mean, mask)
    for got, axes in ((parts, (1, 2)), (moments, (0, 1, 2))):
        mean, var, count = reference.moments(x, axes, mask)
        _moments_close(got.mean, mean)
        _moments_close(got.var, var)
        np.testing.assert_array_equal(got.count, count)


@pytest.mark.parametrize("bounds", [None, (1.2, 0.3)], ids=["bn", "brn"])
def test_coefficients_and_affine_output(bounds):
    (x, scale, bias, mean, var, g, _), (xj, plan, _, pf) = _stage_inputs(seed=2)
    moments, _ = _norm._batch_moments(plan, xj, pf.mean, None)
    a, c, terms = _norm._coefficients(plan, moments, pf, bounds)
    r_max, d_max = (None, None) if bounds is None else bounds
    ref = reference.normalize(x, scale, bias, mean, var, g, r_max=r_max, d_max=d_max)
    y = _norm._affine_output(xj, None, moments.shift, a, c)
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)
    if bounds is None:
        assert terms is None
        return
    np.testing.assert_allclose(terms.r.ravel(), ref.r, rtol=1e-5)
    np.testing.assert_allclose(terms.d.ravel(), ref.d, rtol=1e-5, atol=1e-6)
    assert np.any(terms.r != terms.r_unclipped) or np.any(terms.d != terms.d_unclipped)


def test_mix_instance():
    (x, scale, bias, mean, var, g, rho), (xj, plan, _, pf) = _stage_inputs(instance=True, seed=3)
    moments, parts = _norm._batch_moments(plan, xj, pf.mean, None)
    a, c, _ = _norm._coefficients(plan, moments, pf, (1.5, 0.5))
    y = _norm._mix_instance(xj, None, moments.shift, a, c, parts, pf, plan)
    ref = reference.instance_renorm(x, scale, bias, rho, mean, var, g, r_max=1.5, d_max=0.5)
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("instance", [False, True])
def test_inference(instance):
    (x, scale, bias, mean, var, g, rho), (xj, plan, _, pf) = _stage_inputs(instance, seed=4)
    y = _norm._inference(plan, xj, pf, None)
    if instance:
        ref = reference.instance_renorm(x, scale, bias, rho, mean, var, g, train=False)
    else:
        ref = reference.normalize(x, scale, bias, mean, var, g, train=False)
    np.testing.assert_allclose(y, ref.y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bessel", [False, True])
def test_update_running(bessel):
    options = dict(momentum=0.8, bessel_correction=bessel)
    (x, scale, bias, mean, var, g, _), (xj, plan, values, pf) = _stage_inputs(seed=5, **options)
    mask = _mask(6)
    moments, _ = _norm._batch_moments(plan, xj, pf.mean, mask)
    opts = _norm.Options(use_running_average=False, **options)
    new = _norm._update_running({"steps": 3}, values, moments, opts, grouped=False)
    ref = reference.normalize(x, scale, bias, mean, var, g, mask=mask, **options)
    _moments_close(new["mean"], ref.new_mean)
    _moments_close(new["var"], ref.new_var)
    assert new["steps"] == 3  # other entries are carried over


@pytest.mark.parametrize("fn", [jaxrenorm.batch_norm, jaxrenorm.batch_renorm])
def test_every_public_keyword_is_an_option(fn):
    """The public functions hand their keywords to the pipeline as `Options.of(locals())`."""
    keywords = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert set(keywords) <= set(_norm.Options._fields)
    defaults = _norm.Options._field_defaults
    for p in inspect.signature(fn).parameters.values():
        if p.name in defaults and p.name not in ("r_max", "d_max"):
            assert p.default == defaults[p.name], p.name


def test_instance_renorm_takes_the_keywords_of_batch_renorm():
    ours = inspect.signature(jaxrenorm.instance_renorm).parameters
    assert list(ours) == list(inspect.signature(jaxrenorm.batch_renorm).parameters)
