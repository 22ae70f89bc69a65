"""Ramps for Batch Renormalization's clipping bounds, as optax schedules.

Ioffe (2017, arXiv 1702.03275, section 4) trains as plain BatchNorm first
(r_max = 1, d_max = 0 for 5,000 steps), then relaxes the bounds gradually: r_max
reaches 3 at step 40,000 and d_max reaches 5 at step 25,000. "It was important
to increase r_max slowly": a fast ramp blew up the loss. Each ramp is an
`optax.linear_schedule`: constant before `transition_begin`, linear after it,
constant once it reaches its final value.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
import optax

from jaxrenorm._checks import check_positive_int, check_ramp, check_scalar, check_schedule
from jaxrenorm.typing import ArrayLike, Schedule

__all__ = [
    "PAPER_D_MAX",
    "PAPER_R_MAX",
    "d_max_schedule",
    "in_optimizer_steps",
    "r_max_schedule",
    "scaled_paper_schedules",
]


def _ramp(start: float, final: float, begin: int, end: int, name: str) -> Schedule:
    check_ramp(begin, end, name)
    if begin == end:  # a step, which linear_schedule would turn into a constant `start`
        ramp = optax.join_schedules(
            [optax.constant_schedule(start), optax.constant_schedule(final)], boundaries=[begin]
        )
    else:
        ramp = optax.linear_schedule(
            init_value=start, end_value=final, transition_steps=end - begin, transition_begin=begin
        )
    # optax types a schedule's value as ArrayLike; both of these return a jax.Array.
    return cast(Schedule, ramp)


def r_max_schedule(final: float = 3.0, begin: int = 5_000, end: int = 40_000) -> Schedule:
    """r_max held at 1 until step `begin`, then linear to `final` at step `end`.

    Defaults are the paper's: 1 for 5,000 steps, 3 at 40,000.

    Args:
      final: the value reached at `end` and kept after it, >= 1.
      begin: the last step at which r_max is 1 (plain BatchNorm), >= 0.
      end: the step at which r_max reaches `final`, >= `begin`.

    Returns:
      An optax schedule, `step -> r_max`, for `BatchRenorm(r_max=...)`.

    Examples:
      >>> from jaxrenorm import schedules
      >>> s = schedules.r_max_schedule()
      >>> [round(float(s(t)), 3) for t in (0, 5_000, 22_500, 40_000, 99_999)]
      [1.0, 1.0, 2.0, 3.0, 3.0]
    """
    check_scalar(final, "final", 1.0)
    return _ramp(1.0, final, begin, end, "r_max_schedule")


def d_max_schedule(final: float = 5.0, begin: int = 5_000, end: int = 25_000) -> Schedule:
    """d_max held at 0 until step `begin`, then linear to `final` at step `end`.

    Defaults are the paper's: 0 for 5,000 steps, 5 at 25,000.

    Args:
      final: the value reached at `end` and kept after it, >= 0.
      begin: the last step at which d_max is 0 (no shift correction), >= 0.
      end: the step at which d_max reaches `final`, >= `begin`.

    Returns:
      An optax schedule, `step -> d_max`, for `BatchRenorm(d_max=...)`.

    Examples:
      >>> from jaxrenorm import schedules
      >>> s = schedules.d_max_schedule()
      >>> [round(float(s(t)), 3) for t in (0, 5_000, 15_000, 25_000)]
      [0.0, 0.0, 2.5, 5.0]
    """
    check_scalar(final, "final", 0.0)
    return _ramp(0.0, final, begin, end, "d_max_schedule")


class _Named:
    """A schedule that shows its name, so that signatures and `help()` read `PAPER_R_MAX`."""

    def __init__(self, schedule: Schedule, name: str):
        self._schedule, self._name = schedule, name

    def __call__(self, count: ArrayLike) -> jax.Array:
        return self._schedule(count)

    def __repr__(self) -> str:
        return f"jaxrenorm.schedules.{self._name}"


PAPER_R_MAX: Schedule = _Named(r_max_schedule(), "PAPER_R_MAX")
"""The paper's r_max schedule: 1 until step 5,000, then linear to 3 at step 40,000.

The default `r_max` of the `BatchRenorm` and `InstanceRenorm` modules.
"""

PAPER_D_MAX: Schedule = _Named(d_max_schedule(), "PAPER_D_MAX")
"""The paper's d_max schedule: 0 until step 5,000, then linear to 5 at step 25,000.

The default `d_max` of the `BatchRenorm` and `InstanceRenorm` modules.
"""


def scaled_paper_schedules(
    total_steps: int, r_max: float = 3.0, d_max: float = 5.0, *, micro_batches: int = 1
) -> tuple[Schedule, Schedule]:
    """The paper's ramps, scaled to a run of `total_steps` steps.

    The paper trains for 40,000 steps between its milestones: BatchNorm until 5,000
    (1/8 of the way), d_max at its final value at 25,000 (5/8) and r_max at 40,000
    (the end). This keeps those proportions for a run of any length.

    A layer's schedule reads its `steps` counter, which counts training calls. With
    gradient accumulation, each optimizer step calls the layer once per micro-batch
    (`optax.MultiSteps` or a loop over micro-batches): pass `micro_batches` and the
    milestones fall at the same optimizer steps.

    Args:
      total_steps: the number of training (optimizer) steps of the run, >= 1.
      r_max: the final r_max, reached at the last step, >= 1.
      d_max: the final d_max, reached at 5/8 of the run, >= 0.
      micro_batches: training calls of each layer per step, >= 1.

    Returns:
      `(r_max_schedule, d_max_schedule)`, for `BatchRenorm(r_max=..., d_max=...)`.

    Examples:
      >>> from jaxrenorm import schedules
      >>> r, d = schedules.scaled_paper_schedules(800)
      >>> [round(float(r(t)), 3) for t in (0, 100, 450, 800)]
      [1.0, 1.0, 2.0, 3.0]
      >>> [round(float(d(t)), 3) for t in (100, 300, 500)]
      [0.0, 2.5, 5.0]
    """
    check_positive_int(total_steps, "total_steps")
    check_positive_int(micro_batches, "micro_batches")
    check_scalar(r_max, "r_max", 1.0)
    check_scalar(d_max, "d_max", 0.0)
    total_steps *= micro_batches
    begin = total_steps // 8
    return (
        r_max_schedule(r_max, begin=begin, end=total_steps),
        d_max_schedule(d_max, begin=begin, end=(5 * total_steps) // 8),
    )


def in_optimizer_steps(schedule: Schedule, micro_batches: int) -> Schedule:
    """`schedule`, laid out in optimizer steps, for a layer called `micro_batches` times
    per step.

    With gradient accumulation over k micro-batches a layer's `steps` counter
    advances k times per optimizer step; this schedule reads the counter t as
    optimizer step t // k, so that `PAPER_R_MAX`, an optax schedule or any
    function of the step keeps its milestones in optimizer steps.

    Args:
      schedule: a function of the (optimizer) step, e.g. `PAPER_R_MAX`.
      micro_batches: training calls of each layer per optimizer step, >= 1.

    Returns:
      The schedule of the layer's counter: `schedule(count // micro_batches)`.

    Examples:
      >>> from jaxrenorm import schedules
      >>> r = schedules.in_optimizer_steps(schedules.r_max_schedule(3.0, 0, 10), 4)
      >>> [round(float(r(t)), 2) for t in (0, 3, 4, 40)]
      [1.0, 1.0, 1.2, 3.0]
    """
    check_schedule(schedule, "schedule")
    check_positive_int(micro_batches, "micro_batches")

    def per_call(count: ArrayLike) -> jax.Array:
        return jnp.asarray(schedule(jnp.asarray(count) // micro_batches))

    return per_call
