"""Bad input raises a clear ValueError / TypeError at trace time, naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxrenorm

X = jnp.ones((8, 4))
STATS = jaxrenorm.init_batch_stats(4)
FUNCTIONS = [jaxrenorm.batch_norm, jaxrenorm.batch_renorm]


def _call(fn, x=X, params=None, stats=STATS, **kw):
    kw.setdefault("use_running_average", False)
    return fn(x, params, stats, **kw)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            dict(params={"scale": jnp.ones(3)}),
            ValueError,
            r'params\["scale"\].*\(3,\).*\(8, 4\).*\(4,\)',
        ),
        (dict(params={"bias": jnp.ones((4, 1))}), ValueError, r'params\["bias"\].*\(4, 1\)'),
        (dict(params={"gamma": jnp.ones(4)}), ValueError, r"params.*gamma"),
        (dict(params=[jnp.ones(4)]), TypeError, r"params.*mapping"),
        (
            dict(stats={"mean": jnp.zeros(5), "var": jnp.ones(4)}),
            ValueError,
            r'batch_stats\["mean"\].*\(5,\)',
        ),
        (
            dict(stats={"mean": jnp.zeros(4), "var": jnp.ones(2)}),
            ValueError,
            r'batch_stats\["var"\].*\(2,\)',
        ),
        (dict(stats={"mean": jnp.zeros(4)}), ValueError, r"batch_stats.*'var'"),
        (dict(axis=2), ValueError, r"`axis`=2 is out of range.*rank 2"),
        (dict(axis=(0, 1)), ValueError, r"axis.*every axis"),
        (dict(axis=(1, -1)), ValueError, r"axis.*same axis twice"),
        (dict(axis=1.0), TypeError, r"axis"),
        (dict(x=jnp.ones((8, 4), jnp.int32)), TypeError, r"`x`.*floating.*int32.*\(8, 4\)"),
        (dict(x=jnp.ones((8, 4), bool)), TypeError, r"`x`.*floating"),
        (dict(mask=jnp.ones((3, 4), bool)), ValueError, r"`mask`.*\(3, 4\).*\(8, 4\)"),
        (dict(mask=jnp.ones((2, 8, 4), bool)), ValueError, r"`mask`.*\(2, 8, 4\)"),
        (dict(momentum=1.5), ValueError, r"`momentum`.*\[0.0, 1.0\].*1.5"),
        (dict(epsilon=-1e-5), ValueError, r"`epsilon`.*>= 0"),
        (dict(dtype=jnp.int32), TypeError, r"`dtype`"),
    ],
)
def test_bad_input(fn, kwargs, error, pattern):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=pattern):
        _call(fn, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(r_max=0.5), r"`r_max` must be >= 1.0, got 0.5"),
        (dict(d_max=-1.0), r"`d_max` must be >= 0.0, got -1.0"),
        (dict(r_max=jnp.ones(2)), r"`r_max` must be a scalar"),
    ],
)
def test_bad_renorm_bounds(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(jaxrenorm.batch_renorm, **kwargs)


def test_errors_are_raised_at_trace_time_under_jit():
    @jax.jit
    def f(x):
        return jaxrenorm.batch_norm(x, {"scale": jnp.ones(3)}, STATS, use_running_average=False)

    with pytest.raises(ValueError, match="scale"):
        jax.eval_shape(f, X)


def test_traced_bounds_are_not_checked_and_work():
    @jax.jit
    def f(r_max):
        return _call(jaxrenorm.batch_renorm, r_max=r_max)[0]

    assert f(2.0).shape == X.shape


def test_complex_renorm_is_refused():
    with pytest.raises(TypeError, match="complex"):
        _call(jaxrenorm.batch_renorm, x=X.astype(jnp.complex64))


def test_moments_errors():
    with pytest.raises(ValueError, match="`axes`=3 is out of range"):
        jaxrenorm.moments(X, 3)
    with pytest.raises(TypeError, match="floating"):
        jaxrenorm.moments(jnp.ones(4, jnp.int32), 0)
    with pytest.raises(ValueError, match="mask"):
        jaxrenorm.moments(X, 0, mask=jnp.ones(3, bool))


def test_init_batch_stats_errors():
    with pytest.raises(ValueError, match="feature_shape"):
        jaxrenorm.init_batch_stats(-1)
    with pytest.raises(TypeError, match="dtype"):
        jaxrenorm.init_batch_stats(3, jnp.int32)


def test_module_errors_name_the_argument():
    bn = jaxrenorm.linen.BatchNorm(use_running_average=False, axis=3)
    with pytest.raises(ValueError, match="`axis`=3 is out of range"):
        bn.init(jax.random.key(0), X)
    bn = jaxrenorm.linen.BatchRenorm(use_running_average=False, r_max=0.9)
    with pytest.raises(ValueError, match="r_max"):
        bn.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="floating"):
        jaxrenorm.linen.BatchNorm(use_running_average=False).init(
            jax.random.key(0), jnp.ones((4, 2), jnp.int32)
        )
