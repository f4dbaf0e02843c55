"""When weight masks change: the pruning schedule and the regrowth cadence.

Pruning: one-shot at ``start_step``, or gradual with the cubic schedule of Zhu and Gupta
(2017) from ``start_step`` to ``end_step`` every ``frequency`` steps. Regrowth (RigL, SET):
every ``regrow_every`` steps after ``end_step``, until ``regrow_until``, swapping a fraction
of the active weights that decays with a cosine, as in RigL."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from gradsparse.checks import check_choice, check_int, check_probability

__all__ = ["SCHEDULES", "MaskSchedule"]

#: ``oneshot``: prune at ``start_step``; ``gradual``: the cubic ramp
SCHEDULES = ("oneshot", "gradual")


@dataclass(frozen=True)
class MaskSchedule:
    """The validated schedule of a :class:`~gradsparse.masking.WeightMasker`."""

    sparsity: float
    schedule: str = "oneshot"
    start_step: int = 0
    end_step: Optional[int] = None  # None: ``start_step``
    frequency: int = 100
    regrows: bool = False  # whether the criterion regrows (RigL, SET)
    regrow_every: int = 100
    regrow_fraction: float = 0.3
    regrow_until: Optional[int] = None

    def __post_init__(self) -> None:
        check_probability("sparsity", self.sparsity)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("start_step", self.start_step)
        if self.end_step is None:
            object.__setattr__(self, "end_step", self.start_step)
        elif check_int("end_step", self.end_step) < self.start_step:
            raise ValueError(f"Expected `end_step` >= `start_step` ({self.start_step}), but got {self.end_step}.")
        check_int("frequency", self.frequency, minimum=1)
        check_int("regrow_every", self.regrow_every, minimum=1)
        check_probability("regrow_fraction", self.regrow_fraction, closed_high=True)

    @property
    def last_prune(self) -> int:
        assert self.end_step is not None  # set in __post_init__
        return self.end_step

    def target_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step`` (Zhu & Gupta's cubic ramp)."""
        if step < self.start_step:
            return 0.0
        if self.schedule == "oneshot" or step >= self.last_prune:
            return self.sparsity
        progress = (step - self.start_step) / (self.last_prune - self.start_step)
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def prunes_at(self, step: int) -> bool:
        if self.schedule == "oneshot":
            return step == self.start_step
        return self.start_step <= step <= self.last_prune and (
            (step - self.start_step) % self.frequency == 0 or step == self.last_prune
        )

    def regrows_at(self, step: int) -> bool:
        if not self.regrows or step <= self.last_prune or self.sparsity == 0:
            return False
        if self.regrow_until is not None and step >= self.regrow_until:
            return False
        return step % self.regrow_every == 0

    def swap_fraction(self, step: int) -> float:
        """The fraction of active weights that a regrowth at ``step`` swaps."""
        end = self.regrow_until
        if end is None or end <= self.last_prune:
            return self.regrow_fraction
        return self.regrow_fraction / 2 * (1 + math.cos(math.pi * (step - self.last_prune) / (end - self.last_prune)))
