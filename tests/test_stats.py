"""jaxrenorm.moments against the float64 reference, on one device and across devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxrenorm
from tests import reference

# Round-off-sensitive: .ci/run runs this file again with XLA:CPU limited to AVX2.
pytestmark = pytest.mark.roundoff

# One float32 ulp at 1e4 (2^-10): on offset data the mean is the shift plus a small
# correction, rounded once, so it is within half an ulp plus the correction's error.
ULP_1E4 = float(np.spacing(np.float32(1e4)))


def test_moments_on_offset_data():
    x = 1e4 + jax.random.normal(jax.random.key(1), (4096, 4))
    mean, var = jaxrenorm.moments(x, 0)
    ref_mean, ref_var, _ = reference.moments(np.asarray(x), (0,))
    np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=0, atol=ULP_1E4)


def test_masked_moments_match_reference():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4, 3)) + 7
    mask = rng.random((5, 4, 3)) < 0.5
    mask[0] = True
    for fast in (True, False):
        mean, var = jaxrenorm.moments(
            jnp.asarray(x, jnp.float32), (0, 1), mask=mask, use_fast_variance=fast
        )
        ref_mean, ref_var, _ = reference.moments(x, (0, 1), mask)
        np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-6)
        np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-4)


# --- transforms -----------------------------------------------------------------


def test_moments_of_rank_four_with_tuple_axes():
    x = np.random.default_rng(1).normal(size=(4, 3, 5, 6)) * 3 - 2
    for axes in [(0, 2), (0, 1, 2), (-1,)]:
        mean, var = jaxrenorm.moments(jnp.asarray(x, jnp.float32), axes)
        ref_mean, ref_var, _ = reference.moments(x, tuple(a % 4 for a in axes))
        np.testing.assert_allclose(mean, np.squeeze(ref_mean, axes), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, np.squeeze(ref_var, axes), rtol=1e-5)


def _pmap_moments(x, mask, **kw):
    fn = functools.partial(jaxrenorm.moments, axes=0, axis_name="d", **kw)
    return jax.pmap(lambda x, m: fn(x, mask=m), axis_name="d")(x, mask)


@pytest.mark.parametrize("fast", [True, False])
def test_masked_moments_across_devices_weight_by_count(fast):
    """Two devices with 6 and 2 valid rows: the mean is over all 8 valid rows.

    flax.linen.BatchNorm averages the per-device masked means here (and a device
    with no valid row gives NaN).
    """
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 3)) * 2 + 5
    x[1] += 4
    mask = np.zeros((2, 8, 1), bool)
    mask[0, :6] = True
    mask[1, :2] = True
    mean, var = _pmap_moments(jnp.asarray(x, jnp.float32), mask, use_fast_variance=fast)
    ref_mean, ref_var, _ = reference.moments(x.reshape(16, 3), (0,), mask.reshape(16, 1))
    for d in range(2):
        np.testing.assert_allclose(mean[d], ref_mean.ravel(), rtol=1e-5)
        np.testing.assert_allclose(var[d], ref_var.ravel(), rtol=1e-4)


def test_a_device_without_valid_elements_is_harmless():
    x = np.random.default_rng(3).normal(size=(4, 5, 2))
    x[2] = np.nan  # every row on device 2 is masked and holds NaN
    mask = np.ones((4, 5, 1), bool)
    mask[2] = False
    mean, var = _pmap_moments(jnp.asarray(x, jnp.float32), mask)
    ref_mean, ref_var, _ = reference.moments(np.delete(x, 2, 0).reshape(15, 2), (0,))
    np.testing.assert_allclose(mean[0], ref_mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[3], ref_var.ravel(), rtol=1e-4)


def test_moments_use_one_collective_in_both_modes():
    x = jnp.ones((8, 4, 3))
    mask = jnp.ones((4, 1), bool)  # closed over: the same on every device
    for kw in (dict(), dict(mask=mask), dict(use_fast_variance=False)):
        f = jax.pmap(lambda x, kw=kw: jaxrenorm.moments(x, 0, axis_name="d", **kw), axis_name="d")
        hlo = f.lower(x).as_text()
        ops = ("all_reduce", "all-reduce", "all_gather", "all-gather")
        assert sum(hlo.count(op) for op in ops) == 1, hlo


# --- the shift of the one-pass variance ----------------------------------------------


def test_left_padded_moments_shift_by_the_first_valid_element():
    """One device, offset data whose first rows are masked: as accurate as unmasked."""
    x = np.float32(1e4 + np.random.default_rng(4).normal(size=(64, 3))).astype(np.float64)
    mask = np.arange(64)[:, None] >= 16
    ref_mean, ref_var, _ = reference.moments(x, (0,), mask)
    mean, var = jaxrenorm.moments(jnp.asarray(x, jnp.float32), 0, mask=mask)
    np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-4)
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=0, atol=ULP_1E4)


@pytest.mark.parametrize("masked", [False, True])
def test_moments_across_devices_are_accurate_on_offset_data_whatever_the_shifts(masked):
    """shard_map over 8 devices on 1e4 + N(0, 1): each device shifts by a sample of
    its own data, or by a shift of its own that differs from the others', and the
    merge is exact: as accurate as on one device (E[x^2] - E[x]^2 loses every digit)."""
    rng = np.random.default_rng(5)
    x = np.float32(1e4 + rng.normal(size=(64, 3)) * rng.uniform(0.5, 2, 3)).astype(np.float64)
    mask = rng.random((64, 1)) < 0.7 if masked else np.ones((64, 1), bool)
    ref_mean, ref_var, _ = reference.moments(x, (0,), mask)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def across_devices(shift=None, **kw):
        def f(x, m):
            k = None if shift is None else shift + jax.lax.axis_index("d").astype(jnp.float32)
            return jaxrenorm.moments(x, 0, axis_name="d", mask=m, shift=k, **kw)

        f = jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P())
        return jax.jit(f)(jnp.asarray(x, jnp.float32), jnp.asarray(mask))

    def rel(var):
        return np.max(np.abs(np.asarray(var, np.float64) - ref_var.ravel()) / ref_var.ravel())

    for kw in (dict(), dict(shift=1e4), dict(use_fast_variance=False)):
        mean, var = across_devices(**kw)
        assert rel(var) <= 1e-4, kw
        np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=0, atol=ULP_1E4)


def test_shift_is_the_mean_where_nothing_is_valid_and_must_broadcast():
    x = jnp.ones((4, 3))
    mean, var = jaxrenorm.moments(x, 0, mask=jnp.zeros((4, 1), bool), shift=jnp.arange(3.0))
    np.testing.assert_array_equal(mean, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(var, 0.0)
    with pytest.raises(ValueError, match=r"`shift` of shape \(4,\) does not broadcast.*\(3,\)"):
        jaxrenorm.moments(x, 0, shift=jnp.ones(4))
