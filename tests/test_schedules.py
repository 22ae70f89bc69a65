"""The paper's r_max / d_max ramps (Ioffe 2017, section 4)."""

import numpy as np
import pytest

from jaxrenorm import schedules


def test_paper_r_max():
    s = schedules.PAPER_R_MAX
    steps = [0, 4_999, 5_000, 22_500, 40_000, 10**6]
    np.testing.assert_allclose([float(s(t)) for t in steps], [1, 1, 1, 2, 3, 3], rtol=1e-6)


def test_paper_d_max():
    s = schedules.PAPER_D_MAX
    steps = [0, 5_000, 15_000, 25_000, 10**6]
    np.testing.assert_allclose([float(s(t)) for t in steps], [0, 0, 2.5, 5, 5], atol=1e-6)


def test_custom_ramps():
    r = schedules.r_max_schedule(final=1.5, begin=10, end=20)
    assert float(r(15)) == pytest.approx(1.25)
    d = schedules.d_max_schedule(final=0.5, begin=0, end=0)
    assert float(d(0)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("factory", "kwargs", "pattern"),
    [
        (schedules.r_max_schedule, dict(final=0.5), "final.*>= 1"),
        (schedules.d_max_schedule, dict(final=-1.0), "final.*>= 0"),
        (schedules.r_max_schedule, dict(begin=10, end=5), "begin <= end"),
    ],
)
def test_bad_ramps(factory, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        factory(**kwargs)


def test_scaled_paper_schedules_keep_the_paper_proportions():
    r, d = schedules.scaled_paper_schedules(40_000)
    for t in (0, 5_000, 12_000, 25_000, 33_000, 40_000, 50_000):
        assert float(r(t)) == pytest.approx(float(schedules.PAPER_R_MAX(t)))
        assert float(d(t)) == pytest.approx(float(schedules.PAPER_D_MAX(t)))
    r, d = schedules.scaled_paper_schedules(800, r_max=2.0, d_max=1.0)
    assert [float(r(t)) for t in (0, 100, 450, 800)] == pytest.approx([1.0, 1.0, 1.5, 2.0])
    assert [float(d(t)) for t in (100, 300, 500, 900)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="total_steps"):
        schedules.scaled_paper_schedules(0)
