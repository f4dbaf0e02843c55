"""The dense route: the bucket's (compensated, active) values summed by the collective's
dense allreduce. Taken during the dense steps, mask regrowth, and wherever the cost model
prefers it; it empties error feedback, since everything is sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .route import BucketStep, Route, is_finite, register_route

if TYPE_CHECKING:
    from ..state import SparseHookState

__all__ = ["DenseRoute"]


@register_route("dense")
class DenseRoute(Route):
    """Sum everything. NaN/inf travel in the sum itself, so nothing is checked before."""

    checks_finite = False

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        return state.collective.reduce_dense(step.values, state.backend, failed=step.failure is not None)

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        feedback, enabled = state.feedback, state.options.error_feedback
        nothing_kept = not enabled or feedback.is_zero(step.plan.layout)
        finite = nothing_kept or is_finite(summed)  # the same bits, so the same verdict everywhere
        if finite and enabled:
            feedback.clear(step.plan.layout, step.region, step.scale, keep=step.idle)
        state.counters.selected += step.decision.work_numel
        return finite

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> torch.Tensor:
        averaged: torch.Tensor = summed.div_(state.backend.size)
        return averaged
